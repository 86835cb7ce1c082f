#!/usr/bin/env bash
# `make lock`: regenerates requirements.lock from pyproject.toml's ranges, with uv's resolver (installed into a
# throwaway virtualenv under ${TMPDIR:-/tmp}; it is not a dependency of the project).
#
#   make lock                                   # re-resolve; versions already in the lock are kept if they fit
#   make lock LOCK_ARGS=--upgrade               # newest versions within pyproject.toml's ranges
#   make lock LOCK_ARGS="--upgrade-package torch"
#
# The lock holds the extras `full` and `test` and the build backend of [build-system] (deploy/venv.sh installs
# the project editable with --no-build-isolation): every package, transitive ones included, pinned exactly with
# the sha256 of every file PyPI has for that version, resolved for CPython 3.11 on Linux x86_64 (glibc 2.28+).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv_version=0.13.10
tools="${TMPDIR:-/tmp}/sparc-lock-uv-$uv_version"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check "uv==$uv_version"
fi
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
if [ -f requirements.lock ]; then cp requirements.lock "$out"; fi   # uv prefers the versions already in its output file
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
  | "$tools/bin/uv" pip compile pyproject.toml - --extra full --extra test --generate-hashes \
      --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o "$out" "$@"
{
  cat <<'EOF'
# The exact versions of everything deploy/venv.sh installs (with pip --require-hashes; the virtualenv's cache key
# is this file's sha256). Generated, do not edit: `make lock` (deploy/lock.sh) resolves pyproject.toml's ranges
# (extras full + test, and the build backend) for CPython 3.11 on Linux x86_64 with uv. torch comes from PyPI,
# i.e. its CUDA build with the nvidia-* libraries; deploy/Dockerfile swaps in the CPU wheels for the image.
EOF
  cat "$out"
} > requirements.lock
