#!/usr/bin/env bash
# Installs what sluice needs outside Cargo into ~/.cache/sluice (override with SLUICE_CACHE):
#   a Python venv holding the `onnxruntime` wheel, whose libonnxruntime.so sluice loads at run time.
# With --test it also installs what the tests' Python reference needs (tokenizers, transformers, numpy).
# Safe to run again: it only installs what is missing.
set -euo pipefail
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
VENV="$CACHE/venv"
ORT_VERSION="1.31.1"
mkdir -p "$CACHE"
if ! command -v python3 >/dev/null; then
  echo "setup: python3 is missing; install it (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
need=()
"$VENV/bin/python" -c "import onnxruntime, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null || need+=("onnxruntime==$ORT_VERSION")
if [ "${1:-}" = "--test" ]; then
  "$VENV/bin/python" -c "import tokenizers, numpy, sys; sys.exit(tuple(map(int, tokenizers.__version__.split('.')[:3])) < (0, 23, 3))" 2>/dev/null || need+=("tokenizers>=0.23.3" "numpy")
  "$VENV/bin/python" -c "import transformers" 2>/dev/null || need+=("transformers")
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${need[@]}"
fi
lib=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1)
if [ -z "$lib" ]; then
  echo "setup: the onnxruntime wheel holds no libonnxruntime.so" >&2
  exit 1
fi
echo "setup: ONNX Runtime library at $lib"
