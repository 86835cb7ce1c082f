#!/usr/bin/env bash
# A real, single-node Apache Kafka broker (KRaft, broker + controller in one JVM) for tests and local runs.
#
#   broker.sh fetch              download the broker's jars from Maven Central once per machine (pom.xml here)
#   broker.sh start              fetch if needed, format storage, start detached, wait until it answers;
#                                the LAST line of stdout is the bootstrap address (127.0.0.1:39092)
#   broker.sh status             exit 0 and print the address if it runs and answers, non-zero otherwise
#   broker.sh stop [--keep-data] SIGTERM, SIGKILL after SPARC_KAFKA_STOP_TIMEOUT s; drops the data dir
#   broker.sh address            print the bootstrap address start would announce (checks nothing)
#
# Environment (all optional):
#   SPARC_CACHE                  cache root (default ~/.cache/sparc-stream); jars go to kafka-<pom sha>/libs
#   SPARC_KAFKA_DIR              state dir: config, pid, logs, data (default $SPARC_CACHE/kafka-run)
#   SPARC_KAFKA_PORT             PLAINTEXT listener port (default 39092)
#   SPARC_KAFKA_CONTROLLER_PORT  CONTROLLER listener port (default 39093)
#   SPARC_KAFKA_NUM_PARTITIONS   partitions of auto-created topics (default 1)
#   SPARC_KAFKA_START_TIMEOUT    seconds to wait for readiness (default 120)
#   SPARC_KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL (default 20)
#   SPARC_KAFKA_KEEP_DATA=1      stop keeps the data dir (same as --keep-data)
#
# Progress goes to stderr so that stdout carries only what callers parse (the address).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SPARC_CACHE:-$HOME/.cache/sparc-stream}"
state="${SPARC_KAFKA_DIR:-$cache/kafka-run}"
port="${SPARC_KAFKA_PORT:-39092}"
controller_port="${SPARC_KAFKA_CONTROLLER_PORT:-39093}"
num_partitions="${SPARC_KAFKA_NUM_PARTITIONS:-1}"
start_timeout="${SPARC_KAFKA_START_TIMEOUT:-120}"
stop_timeout="${SPARC_KAFKA_STOP_TIMEOUT:-20}"

host=127.0.0.1
address="$host:$port"
key="$(sha256sum "$here/pom.xml" | cut -c1-16)"
dist="$cache/kafka-$key"      # one folder per pom version: libs/ + .complete marker
libs="$dist/libs"
pid_file="$state/broker.pid"
data_dir="$state/data"
log_dir="$state/logs"
server_log="$log_dir/server.log"   # written by log4j2 (see write_config)
stdout_log="$log_dir/stdout.log"   # the JVM's own stdout/stderr (crashes before logging starts)

say() { echo "kafka: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------- fetch

fetch() {
  [ -f "$dist/.complete" ] && return 0
  mkdir -p "$cache"
  (
    flock 8   # concurrent callers wait here, then find the marker and reuse the jars
    if [ ! -f "$dist/.complete" ]; then
      command -v mvn >/dev/null || die "mvn not found: Maven 3.8+ is needed to fetch the Kafka jars"
      say "fetching the Kafka broker jars into $libs (once per machine)"
      rm -rf "$dist"
      mkdir -p "$dist"
      # Run Maven on a copy of the pom inside the cache so nothing (target/) is written into the clone.
      cp "$here/pom.xml" "$dist/pom.xml"
      if ! mvn -B -q -f "$dist/pom.xml" dependency:copy-dependencies \
          -DincludeScope=runtime -DoutputDirectory="$libs" >"$dist/fetch.log" 2>&1; then
        cat "$dist/fetch.log" >&2
        die "mvn could not fetch the Kafka jars (network to Maven Central? see above)"
      fi
      ls "$libs"/kafka_2.13-*.jar >/dev/null 2>&1 || die "the fetch finished without kafka_2.13 in $libs"
      touch "$dist/.complete"
    fi
  ) 8>"$cache/kafka-$key.lock"
}

# ------------------------------------------------------------------------------------------- helpers

# The pid of OUR broker if it is alive, else nothing. Checking the command line guards against a pid that
# the kernel has since given to another process.
running_pid() {
  local pid
  [ -f "$pid_file" ] || return 0
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"kafka.Kafka $state/server.properties"* ]]; then
    echo "$pid"
  fi
}

# JVM flags for the short-lived tools (probe, StorageTool): C1 only and a serial GC start faster.
tool_opts=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC)

# A client call that answers (describe cluster + list topics), made with Kafka's own Admin client.
probe() {
  java "${tool_opts[@]}" -Dlog4j2.level=OFF -cp "$libs/*" "$here/KafkaProbe.java" "$address" "${1:-5000}"
}

port_in_use() {
  (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null
}

# The last log lines, without the indented config dump Kafka logs at startup (it would fill the tail).
show_logs() {
  local f
  for f in "$server_log" "$stdout_log"; do
    [ -s "$f" ] || continue
    say "last lines of $f:"
    grep -v $'^\t' "$f" | tail -n 25 >&2 || true
  done
}

# The cluster id of the data dir when it holds one (kept by stop --keep-data, or left by a crash: formatting
# must then use the same id), else a new 22-character base64url id of 16 random bytes, not starting with '-'
# (as Kafka's Uuid.randomUuid).
cluster_id() {
  local id
  id="$(sed -n 's/^cluster\.id=//p' "$data_dir/meta.properties" 2>/dev/null || true)"
  [ -n "$id" ] && { echo "$id"; return; }
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [ "${id:0:1}" != "-" ] && { echo "$id"; return; }
  done
}

write_config() {
  cat >"$state/server.properties" <<EOF
# Written by deploy/kafka/broker.sh start; rewritten on every fresh start.
# One node is both broker and controller (KRaft, static quorum), on loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$host:$controller_port
listeners=PLAINTEXT://$host:$port,CONTROLLER://$host:$controller_port
advertised.listeners=PLAINTEXT://$address
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data_dir

# One node: every internal topic has one replica (and one partition, it is small and fast).
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast and small for tests.
num.partitions=$num_partitions
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
log.cleaner.dedupe.buffer.size=8388608
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF

  # The jars carry no log4j2 config. INFO is needed for "Kafka Server started" (kafka.server.KafkaRaftServer).
  cat >"$state/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by deploy/kafka/broker.sh start. -->
<Configuration status="warn">
  <Appenders>
    <File name="server" fileName="$server_log" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="warn"/>
    <Root level="info">
      <AppenderRef ref="server"/>
    </Root>
  </Loggers>
</Configuration>
EOF
}

# Wait until the log says "Kafka Server started" AND the probe answers. Fails if the JVM dies on the way.
wait_ready() {
  local pid="$1" deadline=$((SECONDS + start_timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_logs
      rm -f "$pid_file"
      die "the broker (pid $pid) exited during startup; logs in $log_dir"
    fi
    if grep -q "Kafka Server started" "$server_log" 2>/dev/null && probe 5000 >&2; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

# ------------------------------------------------------------------------------------------- commands

start() {
  command -v java >/dev/null || die "java not found: the broker needs Java 17+ on PATH"
  fetch
  mkdir -p "$state"
  exec 9>"$state/broker.lock"
  flock 9   # one start/stop at a time per state dir

  local pid
  pid="$(running_pid)"
  if [ -n "$pid" ]; then
    # Already started (by an earlier call, maybe one that was interrupted): it only has to answer.
    wait_ready "$pid" || die "a broker (pid $pid) is running but does not answer on $address; run: $0 stop"
    say "already running (pid $pid)"
    echo "$address"
    return 0
  fi
  if [ -f "$pid_file" ]; then
    say "removing a stale pid file ($(cat "$pid_file" 2>/dev/null))"
    rm -f "$pid_file"
  fi
  local p
  for p in "$port" "$controller_port"; do
    if port_in_use "$p"; then
      die "port $p on $host is in use by another process (set SPARC_KAFKA_PORT / SPARC_KAFKA_CONTROLLER_PORT)"
    fi
  done

  mkdir -p "$log_dir" "$data_dir"
  local f
  for f in "$server_log" "$stdout_log"; do   # readiness is read from this run's log only
    if [ -f "$f" ]; then mv -f "$f" "$f.prev"; fi
  done
  write_config

  local java_opts=(-Xms128m -Xmx512m -XX:+UseSerialGC -Djava.awt.headless=true
                   "-Dlog4j2.configurationFile=$state/log4j2.xml")
  say "formatting storage in $data_dir"
  if ! java "${tool_opts[@]}" "${java_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
      -t "$(cluster_id)" -c "$state/server.properties" --ignore-formatted >&2; then
    show_logs
    die "formatting the storage failed (StorageTool, see above); config in $state/server.properties"
  fi

  say "starting the broker on $address (controller $host:$controller_port); logs in $log_dir"
  # setsid: its own session, so the caller's Ctrl-C or exit does not take it down. The inner shell writes
  # its own pid, then execs java in place (so the pid is the JVM's). 9>&-: the broker must not inherit the
  # start/stop lock, or it would hold it for its whole life.
  # shellcheck disable=SC2016  # $$ and "$@" are for the inner shell
  setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pid_file" \
    java "${java_opts[@]}" -cp "$libs/*" kafka.Kafka "$state/server.properties" \
    >"$stdout_log" 2>&1 </dev/null 9>&- &
  local launcher=$!
  local waited=0
  while [ ! -s "$pid_file" ] && [ "$waited" -lt 50 ]; do sleep 0.1; waited=$((waited + 1)); done
  pid="$(cat "$pid_file" 2>/dev/null || echo "$launcher")"

  if ! wait_ready "$pid"; then
    show_logs
    say "no answer within ${start_timeout}s; stopping it"
    stop_pid "$pid"
    rm -f "$pid_file"
    die "the broker did not become ready on $address within ${start_timeout}s (SPARC_KAFKA_START_TIMEOUT)"
  fi
  say "ready (pid $pid)"
  echo "$address"
}

status() {
  local pid
  pid="$(running_pid)"
  [ -n "$pid" ] || { say "not running (no live broker for $state)"; return 1; }
  [ -d "$libs" ] || { say "pid $pid is running but the jars are missing ($libs)"; return 1; }
  if probe 5000 >&2; then
    say "running (pid $pid)"
    echo "$address"
  else
    say "pid $pid is running but does not answer on $address"
    return 1
  fi
}

# SIGTERM (Kafka shuts down in order), then SIGKILL after stop_timeout seconds.
stop_pid() {
  local pid="$1" deadline=$((SECONDS + stop_timeout))
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "still running after ${stop_timeout}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
}

stop() {
  local keep_data="${SPARC_KAFKA_KEEP_DATA:-0}"
  case "${1:-}" in
    --keep-data) keep_data=1 ;;
    "") ;;
    *) die "unknown option for stop: $1 (usage: $0 stop [--keep-data])" ;;
  esac
  mkdir -p "$state"
  exec 9>"$state/broker.lock"
  flock 9

  local pid
  pid="$(running_pid)"
  if [ -n "$pid" ]; then
    say "stopping the broker (pid $pid)"
    stop_pid "$pid"
  else
    say "not running"
  fi
  rm -f "$pid_file"
  if [ "$keep_data" = 1 ]; then
    say "keeping the data in $data_dir"
  else
    rm -rf "$data_dir"   # the next start is a fresh, empty broker
  fi
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  status) status ;;
  address) echo "$address" ;;
  stop) shift; stop "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
