#!/usr/bin/env bash
# Installs what sluice needs outside Cargo into ~/.cache/sluice (override with SLUICE_CACHE):
#   a Python venv holding the `onnxruntime` wheel, whose libonnxruntime.so sluice loads at run time.
# With --test it also installs what the tests' Python reference needs (tokenizers, transformers, numpy)
#   and the Open Inference Protocol's reference client (tritonclient[http]).
# With --models it also installs what scripts/optimize_model.py needs to make the GPU variants of a
#   model (onnx; sympy for onnxruntime.transformers' symbolic shape inference; tokenizers, numpy).
# With --gpu it also makes a second venv, $SLUICE_CACHE/venv-gpu, holding the `onnxruntime-gpu` wheel
#   (CUDA 13, cuDNN 9) and, unless the machine already has them (ldconfig, or the folders in
#   SLUICE_CUDA_LIBS), the CUDA 13 and cuDNN 9 libraries as nvidia-* wheels (its [cuda,cudnn] extras,
#   about 2.5 GB of downloads). --test and --models then install their packages there too.
# Flags combine (e.g. --test --models --gpu). Safe to run again: it only installs what is missing.
set -euo pipefail
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
VENV="$CACHE/venv"
GPU_VENV="$CACHE/venv-gpu"
ORT_VERSION="1.31.1"
# The libraries libonnxruntime_providers_cuda.so loads (the same list as src/execution.rs checks).
CUDA_LIBS=(libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcurand.so.10 libcufft.so.12 libcudnn.so.9)
test=0 models=0 gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) test=1 ;;
    --models) models=1 ;;
    --gpu) gpu=1 ;;
    -h | --help)
      sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup: unknown option '$arg' (known: --test, --models, --gpu)" >&2
      exit 2
      ;;
  esac
done
mkdir -p "$CACHE"
if ! command -v python3 >/dev/null; then
  echo "setup: python3 is missing; install it (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi

# ensure_venv DIR: creates the venv DIR if it does not exist.
ensure_venv() {
  if [ ! -x "$1/bin/python" ]; then
    echo "setup: creating $1"
    python3 -m venv "$1"
  fi
}

# extra_packages PYTHON: prints (one a line) the --test/--models packages PYTHON lacks.
extra_packages() {
  local py="$1"
  if [ "$test" = 1 ] || [ "$models" = 1 ]; then
    "$py" -c "import tokenizers, numpy, sys; sys.exit(tuple(map(int, tokenizers.__version__.split('.')[:3])) < (0, 23, 3))" 2>/dev/null || printf '%s\n' "tokenizers>=0.23.3" "numpy"
  fi
  if [ "$test" = 1 ]; then
    "$py" -c "import transformers" 2>/dev/null || echo "transformers"
    # The reference Open Inference Protocol client, for tests/online.rs.
    "$py" -c "import tritonclient.http" 2>/dev/null || echo "tritonclient[http]"
  fi
  if [ "$models" = 1 ]; then
    "$py" -c "import onnx" 2>/dev/null || echo "onnx"
    "$py" -c "import sympy" 2>/dev/null || echo "sympy"
  fi
  return 0
}

# install VENV PACKAGE...: pip-installs the packages into VENV (nothing when none are given).
install() {
  local venv="$1"
  shift
  if [ $# -gt 0 ]; then
    echo "setup: installing $* into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$@"
  fi
}

# The CPU venv: always.
ensure_venv "$VENV"
need=()
"$VENV/bin/python" -c "import onnxruntime, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null || need+=("onnxruntime==$ORT_VERSION")
while IFS= read -r p; do need+=("$p"); done < <(extra_packages "$VENV/bin/python")
install "$VENV" ${need[@]+"${need[@]}"}
lib=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1)
if [ -z "$lib" ]; then
  echo "setup: the onnxruntime wheel holds no libonnxruntime.so" >&2
  exit 1
fi
echo "setup: ONNX Runtime library at $lib"

[ "$gpu" = 1 ] || exit 0

# --gpu: the onnxruntime-gpu venv. onnxruntime and onnxruntime-gpu share the `onnxruntime` module
# name, so they cannot live in one venv.
ensure_venv "$GPU_VENV"
# lib_folder LIB: prints the folder holding LIB, looked for in SLUICE_CUDA_LIBS, the GPU venv's
# nvidia-* wheels, then the loader's cache (ldconfig -p); fails when it is nowhere.
ldcache=$( (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null || true)
lib_folder() {
  local d f
  local IFS=:
  for d in ${SLUICE_CUDA_LIBS:-}; do
    [ -n "$d" ] && [ -e "$d/$1" ] && { echo "$d"; return 0; }
  done
  for f in "$GPU_VENV"/lib/python3*/site-packages/nvidia/*/lib/"$1" "$GPU_VENV"/lib/python3*/site-packages/nvidia/*/*/lib/"$1"; do
    [ -e "$f" ] && { dirname "$f"; return 0; }
  done
  f=$(printf '%s\n' "$ldcache" | awk -v lib="$1" '$1 == lib { print $NF; exit }')
  [ -n "$f" ] && { dirname "$f"; return 0; }
  return 1
}
missing=()
for l in "${CUDA_LIBS[@]}"; do
  lib_folder "$l" >/dev/null || missing+=("$l")
done
need=()
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: CUDA 13/cuDNN 9 libraries not found on this machine: ${missing[*]}; installing them as nvidia-* wheels"
  need+=("onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION")
else
  "$GPU_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('onnxruntime-gpu') != '$ORT_VERSION')" 2>/dev/null || need+=("onnxruntime-gpu==$ORT_VERSION")
fi
while IFS= read -r p; do need+=("$p"); done < <(extra_packages "$GPU_VENV/bin/python")
install "$GPU_VENV" ${need[@]+"${need[@]}"}
capi=$(ls -d "$GPU_VENV"/lib/python3*/site-packages/onnxruntime/capi 2>/dev/null | head -n1 || true)
gpu_lib=$(ls "$capi"/libonnxruntime.so* 2>/dev/null | head -n1 || true)
cuda_provider="$capi/libonnxruntime_providers_cuda.so"
if [ -z "$gpu_lib" ] || [ ! -f "$cuda_provider" ]; then
  echo "setup: the onnxruntime-gpu wheel in $GPU_VENV holds no libonnxruntime.so or libonnxruntime_providers_cuda.so" >&2
  exit 1
fi
echo "setup: ONNX Runtime GPU library at $gpu_lib"
echo "setup: CUDA execution provider at $cuda_provider"
for l in "${CUDA_LIBS[@]}"; do
  if d=$(lib_folder "$l"); then
    echo "setup: $l in $d"
  else
    echo "setup: $l still not found (set SLUICE_CUDA_LIBS to the folder that holds it)" >&2
    exit 1
  fi
done
