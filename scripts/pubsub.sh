#!/usr/bin/env bash
# Manages Google's Pub/Sub emulator for tests and demos, on loopback, and the project's topics and
# subscriptions on it.
#
#   scripts/pubsub.sh start    find the emulator, start it (unless it answers already), create the
#                              project's topics and subscriptions, and wait until it is ready
#   scripts/pubsub.sh stop     stop the emulator this script started (pid file)
#   scripts/pubsub.sh init     wait for an emulator started elsewhere (docker compose) and create
#                              the project's topics and subscriptions on it
#   scripts/pubsub.sh status   say whether it runs and answers
#   scripts/pubsub.sh topic NAME                create topic NAME (short name) in the project
#   scripts/pubsub.sh subscription NAME TOPIC   create pull subscription NAME on TOPIC
#
# The emulator is Google's own (Debian package google-cloud-cli-pubsub-emulator, which needs Java
# 17+); it keeps everything in memory, so `stop` loses every topic and message. Clients reach it with
# PUBSUB_EMULATOR_HOST=127.0.0.1:PORT (sluice honours it, or an `endpoint` field in a topology).
#
# Environment:
#   SLUICE_CACHE            cache directory (default ~/.cache/sluice); pubsub.pid, pubsub.log live here
#   SLUICE_PUBSUB_HOST      host of the emulator (default 127.0.0.1; `start` always binds loopback)
#   SLUICE_PUBSUB_PORT      port (default 8085)
#   SLUICE_PUBSUB_PROJECT   project of the created resources (default sluice-local)
#   SLUICE_PUBSUB_EMULATOR  path to the emulator's start script, when it is not where gcloud says
#
# Created by `start` (the rides_pubsub topology's flow): topics rides, ride-durations and
# ride-dead-letters; subscription rides-sluice on rides (what sluice reads) and ride-durations-backend
# on ride-durations (what a backend that does not make its own reads).
set -euo pipefail

CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
HOST="${SLUICE_PUBSUB_HOST:-127.0.0.1}"
PORT="${SLUICE_PUBSUB_PORT:-8085}"
PROJECT="${SLUICE_PUBSUB_PROJECT:-sluice-local}"
if [ "$PORT" = "8085" ]; then TAG="pubsub"; else TAG="pubsub-$PORT"; fi
PIDFILE="$CACHE/$TAG.pid"
LOG="$CACHE/$TAG.log"
API="http://$HOST:$PORT/v1/projects/$PROJECT"

say() { echo "pubsub: $*"; }
die() { echo "pubsub: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The emulator answers its REST API (a topic listing) once it is ready.
ready() { curl -sf -o /dev/null --max-time 2 "$API/topics"; }

find_emulator() {
  if [ -n "${SLUICE_PUBSUB_EMULATOR:-}" ]; then
    [ -x "$SLUICE_PUBSUB_EMULATOR" ] || die "SLUICE_PUBSUB_EMULATOR=$SLUICE_PUBSUB_EMULATOR is not executable"
    echo "$SLUICE_PUBSUB_EMULATOR"; return
  fi
  local roots=() root
  if command -v gcloud >/dev/null 2>&1; then
    roots+=("$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)")
  fi
  roots+=(/usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk /opt/google-cloud-sdk "$HOME/google-cloud-sdk")
  for root in "${roots[@]}"; do
    if [ -n "$root" ] && [ -x "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ]; then
      echo "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"; return
    fi
  done
  cat >&2 <<'EOF'
pubsub: Google's Pub/Sub emulator is not installed. Install it with one of:
  sudo apt-get install google-cloud-cli-pubsub-emulator default-jre-headless
      (after adding Google's apt repository: https://cloud.google.com/sdk/docs/install#deb)
  gcloud components install pubsub-emulator     (a gcloud installed from Google's archive)
or point SLUICE_PUBSUB_EMULATOR at its bin/cloud-pubsub-emulator. It needs Java 17 or newer.
With docker: `docker compose up pubsub` starts it from docker-compose.yml.
EOF
  exit 1
}

put() {
  # PUT creates; 409 (already exists) is fine.
  local code
  code=$(curl -s -o /tmp/pubsub-put.$$ -w '%{http_code}' -X PUT -H 'content-type: application/json' --data "${2:-{\}}" "$1")
  case "$code" in
    200|409) rm -f /tmp/pubsub-put.$$ ;;
    *) cat /tmp/pubsub-put.$$ >&2; rm -f /tmp/pubsub-put.$$; die "PUT $1 answered $code" ;;
  esac
}

topic() { put "$API/topics/$1"; }
subscription() { put "$API/subscriptions/$1" "{\"topic\": \"projects/$PROJECT/topics/$2\", \"ackDeadlineSeconds\": 60}"; }

start() {
  mkdir -p "$CACHE"
  if ready; then
    say "already running on $HOST:$PORT"
  else
    port_open "$PORT" && die "port $PORT is taken by something that is not a Pub/Sub emulator; set SLUICE_PUBSUB_PORT"
    command -v java >/dev/null 2>&1 || die "the emulator needs Java 17+: sudo apt-get install default-jre-headless"
    local emulator
    emulator=$(find_emulator)
    say "starting $emulator on $HOST:$PORT (log $LOG)"
    setsid nohup "$emulator" --host="$HOST" --port="$PORT" >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 120); do
      ready && break
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$LOG" >&2; die "the emulator exited; see $LOG"; }
      sleep 0.5
    done
    ready || { tail -20 "$LOG" >&2; die "the emulator did not answer within 60 s; see $LOG"; }
  fi
  create
}

create() {
  topic rides
  topic ride-durations
  topic ride-dead-letters
  subscription rides-sluice rides
  subscription ride-durations-backend ride-durations
  say "ready: PUBSUB_EMULATOR_HOST=$HOST:$PORT, project $PROJECT"
}

init() {
  for _ in $(seq 1 120); do ready && break; sleep 0.5; done
  ready || die "no emulator answers on $HOST:$PORT"
  create
}

stop() {
  if [ -f "$PIDFILE" ]; then
    local pid
    pid=$(cat "$PIDFILE")
    # The start script runs java as a child: stop the whole process group.
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    rm -f "$PIDFILE"
    say "stopped"
  else
    say "not started by this script"
  fi
}

case "${1:-start}" in
  start) start ;;
  init) init ;;
  stop) stop ;;
  status) if ready; then say "running on $HOST:$PORT"; else say "not running"; exit 1; fi ;;
  topic) [ -n "${2:-}" ] || die "usage: pubsub.sh topic NAME"; topic "$2" ;;
  subscription) [ -n "${3:-}" ] || die "usage: pubsub.sh subscription NAME TOPIC"; subscription "$2" "$3" ;;
  *) die "usage: pubsub.sh start|init|stop|status|topic NAME|subscription NAME TOPIC" ;;
esac
