#!/usr/bin/env bash
# The test suite on the GPU image's software, without its GPU: Python 3.12, jax/jaxlib 0.11.2,
# flax 0.12.12, transformers 5.17.0, trl 1.16.0, tokamax 0.0.17 (which needs Python >= 3.12 and so
# never installs on CI's Python 3.11), and jax's CUDA plugin. Two test files run only here:
# tests/test_tokamax.py (tokamax's Mosaic-GPU kernels lowered for an H100: block configs, shared
# memory, the bench step under each remat policy; our VJP through tokamax's own ops) and
# tests/test_gpu_aot.py (the bench step and our Pallas kernels compiled for an H100 by XLA's GPU
# compiler, no GPU needed).
#
#     bash scripts/check_gpu_stack.sh            # torch-free tests (~6 min; ~4 GB venv)
#     WITH_TORCH=1 bash scripts/check_gpu_stack.sh   # everything; torch 2.11.0 from PyPI is a
#                                                    # CUDA build (~1 GB more)
#
# Needs a python3.12 (PYTHON312=/path/to/python3.12; pyenv's is found) and PyPI. The venv goes to
# ${VENV:-/tmp/zephyr-gpu-stack}; pytest's arguments may follow (default: the tests that need no
# torch, or with WITH_TORCH=1 the whole default suite).
set -euo pipefail
cd "$(dirname "$0")/.."

# a pyenv shim named python3.12 exists even when 3.12 is not the selected version, and then
# fails when run: take the first candidate that actually starts
PY=${PYTHON312:-}
if [ -z "$PY" ]; then
  for c in $(command -v python3.12 || true) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -x "$c" ] && "$c" -c "import sys" 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] && [ -x "$PY" ] || { echo "no working python3.12 found: set PYTHON312" >&2; exit 2; }
VENV=${VENV:-/tmp/zephyr-gpu-stack}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# the GPU image's versions (the device tool's KINDS.md), and tokamax for moe_impl=tokamax
# with jax's CUDA plugin and NVIDIA's libraries (~3 GB; they load without a GPU), for
# tests/test_gpu_aot.py: compiling for an H100 here
# (pytest-xdist: pyproject's addopts pass --dist, which plain pytest refuses)
"$VENV/bin/pip" install -q "jax[cuda13]==0.11.2" jaxlib==0.11.2 flax==0.12.12 \
  transformers==5.17.0 trl==1.16.0 tokamax==0.0.17 pytest pytest-xdist
if [ -n "${WITH_TORCH:-}" ]; then "$VENV/bin/pip" install -q torch==2.11.0; fi
# the project without its test extra (which pins CI's CPU torch 2.13.0)
"$VENV/bin/pip" install -q -e . nbclient nbformat ipykernel matplotlib ruff
"$VENV/bin/python" -c "import jax, flax, tokamax, transformers; print('jax', jax.__version__, \
'flax', flax.__version__, 'transformers', transformers.__version__, 'tokamax importable')"

# the tests run on the CPU: without this, jax tries the CUDA plugin at start-up on a machine
# with no GPU and prints the plugin's failed initialization (a traceback) on stderr, which tests
# that check a command's stderr for tracebacks count as failures
export JAX_PLATFORMS=cpu
if [ $# -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
elif [ -n "${WITH_TORCH:-}" ]; then
  exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" tests
else
  # the test files that never touch torch (nor the reference bench, nor HF conversion helpers)
  mapfile -t files < <(grep -L -E "torch|test_convert_helpers|reference" tests/test_*.py)
  exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" "${files[@]}"
fi
