#!/usr/bin/env bash
# The test suite: installs what the tests need (ONNX Runtime, the Python reference's packages, the
# GPU variants of the QA model),
# makes sure the local Postgres (scripts/pg.sh), Kafka-protocol broker (scripts/kafka.sh) and
# Google's Pub/Sub emulator (scripts/pubsub.sh) and a GCS emulator (scripts/gcs.sh) are running,
# then runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test --models
# The GPU variants of the QA model (dequantized fp32, fused fp16) for the fidelity tests' fp16 and
# shape checks; made once, in about ten seconds.
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
if [ ! -f "$CACHE/qa-gpu/model.fp16.onnx" ] || [ ! -f "$CACHE/qa-gpu/model.fp32.onnx" ]; then
  "$CACHE/venv/bin/python" scripts/optimize_model.py --out "$CACHE/qa-gpu"
fi
bash scripts/pg.sh
bash scripts/kafka.sh start
# A second broker whose topics survive a restart (Tansu over a local S3 store), for tests/restarts.rs.
SLUICE_KAFKA_PORT=19093 SLUICE_KAFKA_PERSIST=1 bash scripts/kafka.sh start
bash scripts/pubsub.sh start
# A Google Cloud Storage emulator for the live file source's gs:// tests (tests/files_live.rs).
bash scripts/gcs.sh start
# Headless Chromium renders `sluice serve`'s page in tests/serve.rs, as a person sees it.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "test: installing chromium from apt (for the page test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "test: chromium is missing and this is not root: sudo apt-get install chromium" >&2
  fi
fi
export SLUICE_PG_URL="${SLUICE_PG_URL:-postgres://sluice:sluice@127.0.0.1:5432/sluice}"
cargo build --workspace --benches
log=$(mktemp)
set +e
cargo test --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "%d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
