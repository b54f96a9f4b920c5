#!/usr/bin/env bash
# First run: installs the ONNX Runtime library (scripts/setup.sh), builds sluice, and answers the
# bundled sample questions with the bundled model, writing JSON lines to out/qa_csv/. No server needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bin sluice
# CARGO_TARGET_DIR, when set, is where cargo put the binary.
"${CARGO_TARGET_DIR:-target}/debug/sluice" run topologies/qa_csv.toml "$@"
echo
echo "first answers (out/qa_csv/answers.w0.jsonl):"
head -n 3 out/qa_csv/answers.w0.jsonl
echo "dead letters: out/qa_csv/dead_letters.w0.jsonl"
