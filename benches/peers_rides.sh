#!/usr/bin/env bash
# The ride drain side by side with the engines a user would pick instead (benches/peers/rides/README.md):
# the same 1M-ride backlog, Tansu broker (a fresh one per run), ride model and machine for every system,
# one system at a time, in interleaved rounds; then a table of rides/s, CPU-s per million rides (with and
# without the broker), peak RSS, lost and duplicate answers.
# Usage: benches/peers_rides.sh [ROUNDS=2] [COUNT=1000000]
#   SYSTEMS="sluice pw2 plain512" picks the systems (also plain1, bw1, bw2, pw1);
#   BEFORE_BIN=path/to/sluice adds another sluice build to every round, reported as `sluicebase`.
# The peers' Python environments are made once under $SLUICE_CACHE/peerbench (about 2 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
COUNT="${2:-1000000}"
SYSTEMS="${SYSTEMS:-sluice pw2 plain512}"
PB="${SLUICE_CACHE:-$HOME/.cache/sluice}/peerbench"
bash scripts/setup.sh >/dev/null
mkdir -p "$PB"
cp -r benches/peers/rides/. "$PB/"
need() { # venv extra-packages...
  local venv="$PB/$1"
  shift
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import onnxruntime, confluent_kafka" 2>/dev/null && return
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$@" onnxruntime numpy confluent-kafka
}
for s in $SYSTEMS; do
  case $s in
    sluice) ;;
    plain*) need plain ;;
    pw*) need pathway "pathway==0.33.0" ;;
    bw*) need bytewax "bytewax[kafka]==0.21.1" ;;
    *) echo "unknown system $s (sluice, plain512, plain1, pw1, pw2, bw1, bw2)" >&2; exit 2 ;;
  esac
done
need plain # verify.py reads both topics with it
cargo build --release --bin sluice 2>&1 | tail -n 1
BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/release/sluice"
if [ -n "${BEFORE_BIN:-}" ]; then
  # run_one.sh finds the worker by its process name, `sluice`.
  mkdir -p "$PB/before" && cp "$BEFORE_BIN" "$PB/before/sluice"
fi
rm -rf "$PB/results"
export PEERBENCH="$PB" PROJECT="$PWD"
for r in $(seq 1 "$ROUNDS"); do
  for s in $SYSTEMS; do
    SLUICE_BIN="$BIN" "$PB/run_one.sh" "$s" "r$r" "$COUNT"
  done
  if [ -n "${BEFORE_BIN:-}" ]; then
    SLUICE_BIN="$PB/before/sluice" "$PB/run_one.sh" sluice "b$r" "$COUNT"
    for f in "$PB/results/sluice_b$r".*; do mv "$f" "$PB/results/sluicebase_r$r.${f##*.}"; done
  fi
done
python3 "$PB/summarize.py"
