#!/usr/bin/env bash
# Prints the path of a ready virtualenv for this project, building it on first use.
#
# The environment lives OUTSIDE the clone, in ${SPARC_CACHE:-~/.cache/sparc-stream}/venv-<hash>, keyed by the
# sha256 of requirements.lock: CI and every clone on this machine reuse it until the pins change. The lock pins
# every package with its hashes (`make lock` makes it), so pip installs exactly those files (--require-hashes),
# wheels only (an sdist's build dependencies would escape the hashes).
# A build that was interrupted has no .complete marker and is redone. The project itself is installed
# editable (no dependencies) into the venv, pointing at the calling clone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SPARC_CACHE:-$HOME/.cache/sparc-stream}"
key="$(sha256sum "$root/requirements.lock" | cut -c1-16)"
venv="$cache/venv-$key"
mkdir -p "$cache"

exec 9>"$cache/venv-$key.lock"
flock 9   # one builder at a time; others wait and then reuse
if [ ! -f "$venv/.complete" ]; then
  echo "sparc: building the virtualenv in $venv (first run on this machine; torch is large)" >&2
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --only-binary :all: \
    -r "$root/requirements.lock" >&2
  touch "$venv/.complete"
fi
# redone when the clone or its pyproject.toml (packages, the `sparc` entry point) changes
project="$root $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$venv/.project-root" 2>/dev/null)" != "$project" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$root" >&2
  echo "$project" > "$venv/.project-root"
fi
echo "$venv"
