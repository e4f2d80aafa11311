#!/usr/bin/env bash
# The GPU measurements docs/PERFORMANCE.md lists as "not yet measured": one prepared run, < 10 min.
#
# 1. Here (any machine with pip and the internet, in the repository root), once: fetch the few wheels
#    the GPU image lacks (TRL, for the reference loss, and what it imports: datasets, dill,
#    multiprocess; ~2 MB) into .whl/, which git ignores:
#        bash docs/gpu_check.sh prepare
# 2. On the GPU machine (the device tool: carry [".whl"], timeout_s 600):
#        bash docs/gpu_check.sh run
#    Every result is a JSON line in $OUT (default ./gpu_check_out): step_*.json, gemm.json, and
#    the full log gpu_check.log. Steps run in priority order, each under its own time cap and all
#    within BUDGET_S (default 570 s), so a slow or failing step still leaves the others' results.
#    Smoke test of the script on a CPU (tiny model, seconds):
#        CONFIG=tiny BENCH_ARGS="--batch-pairs 1 --seq-len 32 --steps 2 --warmup 1" \
#            bash docs/gpu_check.sh run
#
# What it measures (bench model: configs/model/bench.yaml, 4 pairs x 2048 tokens, bf16):
#   gemm        expert grouped GEMM, 32,768 rows 2048 -> 5632, 8 experts: dense matmul of the same
#               FLOPs, batched einsum, jax.lax.ragged_dot, and our Pallas kernel (4 tile configs),
#               forward and backward (dx, dw)
#   step_ragged our ORPO step (ragged dispatch, cuDNN attention) and, in the same invocation,
#               transformers + PyTorch (grouped_mm experts, sdpa, torch.compile when it works):
#               tokens/s, MFU, peak memory, ratio ours / reference
#   step_pallas the same step of ours with the Pallas grouped GEMM in place of ragged_dot
#   step_xla_attention, step_capacity   our step with XLA attention; with the capacity dispatch
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
}

run() {
  OUT=${OUT:-gpu_check_out}
  mkdir -p "$OUT"
  BUDGET_S=${BUDGET_S:-570}
  export PYTHONUNBUFFERED=1
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|torch |transformers|trl|triton) '
  } 2>&1 | tee "$OUT/gpu_check.log"

  # in priority order: name, time cap (s), arguments
  step step_ragged 330 --moe-impl ragged --attention-impl dot_product_attention --reference hf
  step gemm 150 --gemm --grouped-gemm pallas
  step step_pallas 150 --moe-impl ragged --attention-impl dot_product_attention --grouped-gemm pallas
  step step_capacity 120 --moe-impl capacity --attention-impl dot_product_attention
  step step_xla_attention 120 --moe-impl ragged
}

step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 60)); then
    echo "== $name: skipped, ${left}s left of ${BUDGET_S}s" | tee -a "$OUT/gpu_check.log"
    return
  fi
  local limit=$((left < cap ? left : cap))
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  set -- --config "${CONFIG:-bench}" "$@" ${BENCH_ARGS:-}
  echo "== $name (at ${SECONDS}s, limit ${limit}s): python3 -m zephyr_jax.bench $*" \
    | tee -a "$OUT/gpu_check.log"
  timeout "$limit" python3 -m zephyr_jax.bench "$@" 2>&1 | tee -a "$OUT/gpu_check.log" \
    | tail -n 1 > "$OUT/$name.json"
  echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUT/gpu_check.log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash docs/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
