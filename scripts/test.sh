#!/usr/bin/env bash
# The test suite: installs what the tests need (ONNX Runtime, the Python reference's packages),
# makes sure the local Postgres (scripts/pg.sh) and Kafka-protocol broker (scripts/kafka.sh) are
# running, then runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/pg.sh
bash scripts/kafka.sh start
# A second broker whose topics survive a restart (Tansu over a local S3 store), for tests/restarts.rs.
SLUICE_KAFKA_PORT=19093 SLUICE_KAFKA_PERSIST=1 bash scripts/kafka.sh start
export SLUICE_PG_URL="${SLUICE_PG_URL:-postgres://sluice:sluice@127.0.0.1:5432/sluice}"
cargo build --benches
cargo test "$@"
