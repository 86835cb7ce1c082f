#!/usr/bin/env bash
# A real, single-node Apache Kafka broker (KRaft, broker + controller in one JVM) for tests and local runs.
#
#   broker.sh fetch              download the broker's jars from Maven Central once per machine (pom.xml here)
#   broker.sh start              fetch if needed, format storage, start detached, wait until it answers;
#                                the LAST line of stdout is the bootstrap address (127.0.0.1:39092)
#   broker.sh status             exit 0 and print the address if it runs and answers, non-zero otherwise
#   broker.sh stop [--keep-data] SIGTERM, SIGKILL after SPARC_KAFKA_STOP_TIMEOUT s; drops the data dir
#   broker.sh address            print the bootstrap address start would announce (checks nothing)
#   broker.sh client-config      secured mode: print the path of the JSON file that says how a client connects
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
#   SPARC_KAFKA_SECURITY=sasl_ssl secured mode: two more listeners beside the PLAINTEXT one (which stays as it is):
#                                SASL_SSL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; user "sparc") and SSL with client
#                                certificates required; a CA, the broker's and a client's certificates (openssl) and
#                                the user's password are made in $SPARC_KAFKA_DIR/tls on the first secured start
#   SPARC_KAFKA_SASL_SSL_PORT    SASL_SSL listener port (default PORT + 2)
#   SPARC_KAFKA_SSL_PORT         SSL listener port (default PORT + 3)
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
security="${SPARC_KAFKA_SECURITY:-plaintext}"
sasl_ssl_port="${SPARC_KAFKA_SASL_SSL_PORT:-$((port + 2))}"
ssl_port="${SPARC_KAFKA_SSL_PORT:-$((port + 3))}"
sasl_user=sparc

host=127.0.0.1
address="$host:$port"
key="$(sha256sum "$here/pom.xml" | cut -c1-16)"
dist="$cache/kafka-$key"      # one folder per pom version: libs/ + .complete marker
libs="$dist/libs"
pid_file="$state/broker.pid"
data_dir="$state/data"
log_dir="$state/logs"
server_log="$log_dir/server.log"   # written by log4j2 (see write_config)
tls="$state/tls"                   # secured mode: certificates, keys, the user's password, client.json
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
  local listeners="PLAINTEXT://$host:$port,CONTROLLER://$host:$controller_port"
  local advertised="PLAINTEXT://$address" protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  if secured; then
    listeners="$listeners,SASL_SSL://$host:$sasl_ssl_port,SSL://$host:$ssl_port"
    advertised="$advertised,SASL_SSL://$host:$sasl_ssl_port,SSL://$host:$ssl_port"
    protocols="$protocols,SASL_SSL:SASL_SSL,SSL:SSL"
  fi
  cat >"$state/server.properties" <<EOF
# Written by deploy/kafka/broker.sh start; rewritten on every fresh start.
# One node is both broker and controller (KRaft, static quorum), on loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$host:$controller_port
listeners=$listeners
advertised.listeners=$advertised
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=$protocols
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
  if secured; then
    cat >>"$state/server.properties" <<EOF

# Secured mode (SPARC_KAFKA_SECURITY=sasl_ssl): TLS from the PEM files make_tls wrote; SASL users on SASL_SSL
# (PLAIN from this JAAS line, SCRAM from the metadata log: StorageTool --add-scram at format); client
# certificates required on SSL.
ssl.keystore.type=PEM
ssl.keystore.location=$tls/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$sasl_user="$(cat "$tls/password")";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.ssl.ssl.client.auth=required
EOF
  fi

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

secured() {
  case "$security" in
    sasl_ssl) return 0 ;;
    plaintext) return 1 ;;
    *) die "SPARC_KAFKA_SECURITY must be plaintext or sasl_ssl, not '$security'" ;;
  esac
}

# The secured mode's TLS material and user, kept in the state dir across starts (so --keep-data keeps working): a
# CA; the broker's key and certificate for 127.0.0.1 and localhost (broker.pem: PKCS#8 key + chain, Kafka's PEM
# keystore); a client key and certificate (for SSL's required client auth), all remade when missing or within a
# day of expiring; the user's random password (made once: SCRAM credentials live in the metadata log); and
# client.json, which says how a client connects (listeners, files, user) for tests and tools.
make_tls() {
  command -v openssl >/dev/null || die "openssl not found: the secured mode makes its certificates with it"
  mkdir -p "$tls"
  (
    set -e
    cd "$tls"
    if [ ! -s password ]; then
      head -c 18 /dev/urandom | base64 | tr '+/' '-_' >password
      chmod 600 password
    fi
    if ! openssl x509 -checkend 86400 -noout -in broker.crt >/dev/null 2>&1 || [ ! -s client.pem ]; then
      echo "kafka: making a CA, the broker's and a client's certificates in $tls" >&2
      ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
      openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 365 -subj "/CN=sparc-test-ca" 2>/dev/null
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >broker.ext
      openssl req "${ec[@]}" -keyout broker.key -out broker.csr -subj "/CN=localhost" 2>/dev/null
      openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out broker.crt -days 365 \
        -extfile broker.ext 2>/dev/null
      openssl req "${ec[@]}" -keyout client.key -out client.csr -subj "/CN=sparc-client" 2>/dev/null
      openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 365 \
        2>/dev/null
      { openssl pkcs8 -topk8 -nocrypt -in broker.key; cat broker.crt ca.pem; } >broker.pem
      chmod 600 ./*.key broker.pem
    fi
    cat >client.json <<EOF
{"sasl_ssl": "$host:$sasl_ssl_port", "ssl": "$host:$ssl_port", "plaintext": "$address",
 "sasl_username": "$sasl_user", "sasl_password_file": "$tls/password",
 "sasl_mechanisms": ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
 "ssl_cafile": "$tls/ca.pem", "ssl_certfile": "$tls/client.pem", "ssl_keyfile": "$tls/client.key"}
EOF
  ) || die "making the certificates in $tls failed"
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
  local p ports=("$port" "$controller_port")
  if secured; then ports+=("$sasl_ssl_port" "$ssl_port"); make_tls; fi
  for p in "${ports[@]}"; do
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
  local scram=() mechanism
  if secured; then
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      scram+=(--add-scram "$mechanism=[name=$sasl_user,password=$(cat "$tls/password")]")
    done
  fi
  say "formatting storage in $data_dir"
  if ! java "${tool_opts[@]}" "${java_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
      -t "$(cluster_id)" -c "$state/server.properties" --ignore-formatted "${scram[@]}" >&2; then
    show_logs
    die "formatting the storage failed (StorageTool, see above); config in $state/server.properties"
  fi

  local extra=""
  if secured; then extra="; SASL_SSL $host:$sasl_ssl_port, SSL $host:$ssl_port (client certificates required)"; fi
  say "starting the broker on $address (controller $host:$controller_port$extra); logs in $log_dir"
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
  sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  status) status ;;
  address) echo "$address" ;;
  client-config)
    { secured && [ -f "$tls/client.json" ]; } || die "no secured broker here: start it with SPARC_KAFKA_SECURITY=sasl_ssl"
    echo "$tls/client.json" ;;
  stop) shift; stop "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
