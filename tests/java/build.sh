#!/usr/bin/env bash
# Builds the Java codebook-updates reader once per machine and prints the folder that holds it: classes/ and
# libs/ (kafka-clients and its dependencies). Cached in ${SPARC_CACHE:-~/.cache/sparc-stream}/java-reader-<hash>,
# keyed by the sha256 of pom.xml and the sources, like deploy/kafka/broker.sh's jars; Maven runs on a copy in
# the cache, so nothing is written into the clone. Needs Java 17+ and Maven (Maven Central reachable once).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SPARC_CACHE:-$HOME/.cache/sparc-stream}"
key="$( (cd "$here" && cat pom.xml $(find src -type f | sort)) | sha256sum | cut -c1-16)"
dist="$cache/java-reader-$key"
mkdir -p "$cache"
(
  flock 8   # concurrent callers wait here, then find the marker and reuse the build
  if [ ! -f "$dist/.complete" ]; then
    command -v mvn >/dev/null || { echo "java-reader: mvn not found: Maven 3.8+ builds the reader" >&2; exit 1; }
    command -v java >/dev/null || { echo "java-reader: java not found: Java 17+ runs the reader" >&2; exit 1; }
    echo "java-reader: building into $dist (once per machine)" >&2
    rm -rf "$dist"
    mkdir -p "$dist"
    cp -r "$here/pom.xml" "$here/src" "$dist/"
    if ! mvn -B -q -f "$dist/pom.xml" compile dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$dist/libs" >"$dist/build.log" 2>&1; then
      cat "$dist/build.log" >&2
      echo "java-reader: mvn failed (network to Maven Central? see above)" >&2
      exit 1
    fi
    mv "$dist/target/classes" "$dist/classes"
    touch "$dist/.complete"
  fi
) 8>"$cache/java-reader-$key.lock"
echo "$dist"
