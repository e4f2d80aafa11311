#!/usr/bin/env bash
# Every GPU measurement docs/PERFORMANCE.md lists as "not yet measured": one prepared run, < 10 min.
#
# 1. Here (any machine with pip and the internet, in the repository root), once: fetch the wheels
#    the GPU image lacks into .whl/ (git ignores it; ~9 MB): TRL for the reference loss (and
#    datasets, dill, multiprocess), tokamax 0.0.17 for moe_impl=tokamax (and einshape, pydantic,
#    pydantic-core, annotated-types, typing-inspection, typing-extensions, qwix, immutabledict,
#    tensorboardX):
#        bash docs/gpu_check.sh prepare
# 2. On the GPU machine (the device tool: carry [".whl"], timeout_s 600):
#        bash docs/gpu_check.sh run
#    Every result is a JSON line in $OUT (default ./gpu_check_out): gemm.json, step.json,
#    attention.json, and the full log gpu_check.log. Steps run in priority order, each under its
#    own time cap and all within BUDGET_S (default 570 s), so a slow or failing step still leaves
#    the others' results. STEPS=step,unrolled (names from the list below) runs only those, e.g. to
#    rerun one that failed without spending the session's minutes on the rest; a name that is not
#    a step is refused before anything runs. Smoke test of the script on a CPU (tiny model, ~2 min):
#        PLATFORM=cpu CONFIG=tiny BENCH_ARGS="--batch-pairs 1 --seq-len 32 --steps 2 --warmup 1" \
#            STEP_IMPLS=scan,dense UNROLLED_IMPLS=scan ATTENTION=xla bash docs/gpu_check.sh run
#
# What it measures (bench model: configs/model/bench.yaml, 4 pairs x 2048 tokens, bf16):
#   gemm       the expert grouped GEMM, 32,768 rows 2048 -> 5632, 8 experts: a dense matmul of the
#              same FLOPs, the equal-capacity batched einsum, jax.lax.ragged_dot, our scan_gmm,
#              our Pallas kernel at 6 tile configurations, tokamax's Mosaic ragged_dot; forward
#              and backward (dx, dw) TFLOP/s and each one's error against ragged_dot on the GPU
#   step       our ORPO step with cuDNN attention and each MoE implementation (tokamax, pallas, scan,
#              dense, ragged) against ONE transformers + PyTorch run in the same invocation
#              (grouped_mm experts, sdpa, torch.compile when it works): tokens/s, MFU, peak
#              memory, ratio ours / reference per implementation, step-0 loss and grad norm
#   unrolled   tokamax and pallas with the layers unrolled (scan_layers: false): no per-layer
#              residual copies into and out of the scan's stacks (roofline of the H100 build:
#              137 -> 112 ms; docs/PERFORMANCE.md): tokens/s vs step's scanned rows
#   attention  our step (dense experts) with XLA attention and jax's dot_product_attention: their
#              step-0 loss / grad norm against step's cuDNN one is the cuDNN correctness check
#   tokamax_tiles  (if time is left) tokamax's Mosaic ragged_dot at each of bench.TOKAMAX_TILES
#              against its heuristics and the dense matmul, dx and dw timed apart
#   remat      (if time is left) the default step under the named remat policies save_matmuls and
#              save_attention: their cost in tokens/s and their memory (step's rows: no remat)
#   loss_chunk (if time is left) the default step with the loss in one 2048-position chunk: its
#              float32 logits kept for the backward pass instead of recomputed per 512-position
#              chunk (one LM-head GEMM of four saved; XLA's H100 plan +0.3-0.9 GiB): tokens/s vs step's row
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        tokamax==0.0.17 einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 qwix==0.1.8 immutabledict==4.3.1
        tensorboardx==2.6.5)

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
}

# every step run() calls, in its order: what STEPS is checked against (step() refuses a name
# missing here, so a new step cannot be added without it)
STEP_NAMES=(gemm step unrolled attention tokamax_tiles remat loss_chunk)
SELECTED=""  # " name name " when STEPS is set (commas or spaces between names): only those run

run() {
  if [[ -n "${STEPS+set}" ]]; then
    local s
    SELECTED=" "
    for s in ${STEPS//,/ }; do
      if [[ " ${STEP_NAMES[*]} " != *" $s "* ]]; then
        echo "error: STEPS names '$s', which is not a step (steps: ${STEP_NAMES[*]})" >&2
        exit 2
      fi
      SELECTED+="$s "
    done
    if [[ "$SELECTED" == " " ]]; then
      echo "error: STEPS='$STEPS' names no step (steps: ${STEP_NAMES[*]}); unset it to run all" >&2
      exit 2
    fi
  fi
  OUT=${OUT:-gpu_check_out}
  mkdir -p "$OUT"
  BUDGET_S=${BUDGET_S:-570}
  export PYTHONUNBUFFERED=1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # tokamax's benchmarking module imports xprof (a profiler, not used here) at import time; the
  # image has none, so give it an empty one (as ../shared/bench/tokamax_gpu.py did)
  if ! python3 -c "import xprof" 2>/dev/null; then
    mkdir -p /tmp/site/xprof/cli
    touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
    echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|torch |transformers|trl|triton|tokamax) '
    python3 -c "from zephyr_jax.model import dispatch; print('tokamax importable:', dispatch.tokamax_available())"
  } 2>&1 | tee "$OUT/gpu_check.log"

  # in priority order: name, time cap (s), arguments
  local att=${ATTENTION:-cudnn}
  step gemm 120 --gemm --gemm-skip tokamax_tuned
  step step 330 --moe-impl "${STEP_IMPLS:-tokamax,pallas,scan,dense,ragged}" --attention-impl "$att" \
    --reference hf
  step unrolled 100 --moe-impl "${UNROLLED_IMPLS:-tokamax,pallas}" --attention-impl "$att" \
    --scan-layers false
  step attention 110 --moe-impl dense --attention-impl xla,dot_product_attention
  step tokamax_tiles 100 --gemm --gemm-only dense_matmul,tokamax_mosaic,tokamax_tuned
  step remat 100 --moe-impl auto --attention-impl "$att" --remat save_matmuls,save_attention
  step loss_chunk 100 --moe-impl auto --attention-impl "$att" --loss-chunk-size 2048
}

step() {
  local name=$1 cap=$2
  shift 2
  if [[ " ${STEP_NAMES[*]} " != *" $name "* ]]; then
    echo "error: step '$name' is missing from STEP_NAMES" >&2
    exit 3
  fi
  if [[ -n "${SELECTED:-}" && "$SELECTED" != *" $name "* ]]; then
    echo "== $name: not in STEPS=$STEPS" | tee -a "$OUT/gpu_check.log"
    return
  fi
  local left=$((BUDGET_S - SECONDS))
  if ((left < 60)); then
    echo "== $name: skipped, ${left}s left of ${BUDGET_S}s" | tee -a "$OUT/gpu_check.log"
    return
  fi
  local limit=$((left < cap ? left : cap))
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  # PLATFORM: the bench stops at once if jax is not on it (the CPU smoke test sets cpu)
  set -- --config "${CONFIG:-bench}" --require-platform "${PLATFORM:-gpu}" "$@" ${BENCH_ARGS:-}
  echo "== $name (at ${SECONDS}s, limit ${limit}s): python3 -m zephyr_jax.bench $*" \
    | tee -a "$OUT/gpu_check.log"
  # the bench prints a JSON line of what it has measured after each variant / GEMM case (marked
  # "partial") and the whole result last: the last JSON line survives a step its cap kills
  timeout "$limit" python3 -m zephyr_jax.bench "$@" 2>&1 | tee -a "$OUT/gpu_check.log" \
    | { grep '^{' || true; } | tail -n 1 > "$OUT/$name.json"
  echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUT/gpu_check.log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash docs/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
