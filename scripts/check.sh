#!/usr/bin/env bash
# Prints what a new user or CI would trip on before the README's two commands: missing tools,
# servers or ports in the way, an unclean tree, README commands that do not exist. It changes
# nothing and always exits 0; each line starts with ok, warn or MISSING.
cd "$(dirname "$0")/.."
ok() { echo "ok      $*"; }
warn() { echo "warn    $*"; }
missing() { echo "MISSING $*"; }
have() { command -v "$1" >/dev/null 2>&1; }
for t in cargo rustc python3 curl git; do
  if have "$t"; then ok "$t ($(command -v "$t"))"; else missing "$t: install it before scripts/quickstart.sh"; fi
done
python3 -c 'import venv' 2>/dev/null && ok "python3 venv" || missing "python3 venv: apt-get install python3-venv"
if have java; then ok "java (Pub/Sub emulator)"; else warn "java: the Pub/Sub emulator needs Java 17 (scripts/pubsub.sh says how)"; fi
if have gcloud || [ -n "${SLUICE_PUBSUB_EMULATOR:-}" ]; then ok "Pub/Sub emulator"; else warn "no gcloud: the Pub/Sub tests need google-cloud-cli-pubsub-emulator"; fi
if have chromium; then ok "chromium (the serve page test)"; elif [ "$(id -u)" = 0 ]; then warn "chromium not installed: scripts/test.sh installs it with apt"; else missing "chromium: not installed and not root (apt-get install chromium)"; fi
if have pg_ctlcluster || have psql; then ok "PostgreSQL"; elif [ "$(id -u)" = 0 ]; then warn "PostgreSQL not installed: scripts/pg.sh installs it with apt"; else missing "PostgreSQL: not installed and not root (scripts/pg.sh needs apt)"; fi
for p in 5432:postgres 19092:tansu 19093:tansu-persistent 19000:moto-s3 8085:pubsub 4443:fake-gcs; do
  port=${p%%:*}; name=${p#*:}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok "port $port answers ($name, or something else in its place)"; else ok "port $port free ($name starts there)"; fi
done
grep -q 'scripts/quickstart.sh' README.md && [ -x scripts/quickstart.sh ] && ok "README: scripts/quickstart.sh" || missing "README's first command"
grep -q 'scripts/test.sh' README.md && [ -x scripts/test.sh ] && ok "README: scripts/test.sh" || missing "README's second command"
grep -q 'scripts/test.sh' .ci/run && ok ".ci/run calls scripts/test.sh" || missing ".ci/run does not call the README's test command"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then warn "uncommitted changes: CI runs what is committed"; else ok "tree clean"; fi
cache="${SLUICE_CACHE:-$HOME/.cache/sluice}"
if [ -f "$cache/qa-gpu/model.fp16.onnx" ]; then ok "GPU variants of the QA model ($cache/qa-gpu)"; else ok "GPU variants of the QA model: scripts/test.sh makes them (installs onnx from PyPI, runs scripts/optimize_model.py)"; fi
if [ -e /proc/driver/nvidia/version ]; then
  ok "NVIDIA driver present: provider = \"cuda\" needs scripts/setup.sh --gpu"
else
  ok "no NVIDIA driver: provider = \"cuda\" is refused here with what is missing (README: On a GPU)"
fi
for t in topologies/*.toml; do
  grep -q "^name" "$t" || warn "$t has no name"
done
ok "checked $(ls topologies/*.toml | wc -l) topologies for a name"
exit 0
