#!/usr/bin/env bash
# Prints the path of a helm binary for the chart's tests (helm lint / helm template), building it on first use.
#
# helm is built from its Go module with `go install` (the Go toolchain and the module proxy are all it needs) into
# ${SPARC_CACHE:-~/.cache/sparc-stream}/helm-<version>/, outside the clone, once per machine: CI and every clone
# reuse it. A build that was interrupted has no .complete marker and is redone. Fails (non-zero, the reason on
# stderr) when go is missing or the build fails: the chart's tests must not pass without helm.
set -euo pipefail
version="${SPARC_HELM_VERSION:-v4.3.2}"
cache="${SPARC_CACHE:-$HOME/.cache/sparc-stream}"
dir="$cache/helm-$version"
mkdir -p "$cache"

exec 9>"$cache/helm-$version.lock"
flock 9   # one builder at a time; others wait and then reuse
if [ ! -f "$dir/.complete" ]; then
  command -v go >/dev/null || { echo "helm.sh: go not found: Go 1.24+ is needed to build helm $version" >&2; exit 1; }
  echo "sparc: building helm $version with go install into $dir (first run on this machine; a few minutes)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  if ! GOBIN="$dir" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "helm.sh/helm/v4/cmd/helm@$version" >&2; then
    echo "helm.sh: go install helm.sh/helm/v4/cmd/helm@$version failed (module proxy reachable?)" >&2
    exit 1
  fi
  touch "$dir/.complete"
fi
echo "$dir/helm"
