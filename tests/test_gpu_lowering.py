"""Every GPU bench step docs/gpu_check.sh runs, lowered for CUDA on this CPU.

A GPU session is short and drawn by chance: a variant that fails to trace or lower there wastes
it. Lowering (jax's tracing, our Pallas kernels' Triton lowering, cuDNN's attention call, tokamax's
Mosaic kernels where installed) runs here as it would for an H100 (conftest's `pretend_h100`); XLA's
CUDA compilation and the run itself are left to the GPU. Abstract parameters: nothing is allocated.
"""

from __future__ import annotations

import pytest
from cuda_lowering import bench_step_text

from zephyr_jax import bench
from zephyr_jax.model import dispatch

TRITON = "custom_call @__gpu$xla.gpu.triton("
MOSAIC = "custom_call @mosaic_gpu_v2("
CUDNN_FWD = "custom_call @__cudnn$fmhaSoftmax("
CUDNN_BWD = "custom_call @__cudnn$fmhaSoftmaxBackward("


@pytest.mark.parametrize("impl", ["auto", "pallas", "scan", "dense", "ragged", "capacity"])
def test_gpu_bench_step_lowers_for_cuda(pretend_h100, impl):
    """The step gpu_check's `step` runs per MoE implementation (tokamax: tests/test_tokamax.py):
    bf16 bench model, cuDNN attention. Each implementation's expert GEMMs are its own: 9 Triton
    kernels for pallas (3 GEMMs x forward, dx, dw), ragged_dot only for ragged, tokamax's Mosaic
    kernels for auto where tokamax is installed (dense where not)."""
    _, cfg = bench.resolve_config("bench", "gpu", moe_impl=impl)
    assert (cfg.attention_impl, cfg.dtype) == ("cudnn", "bfloat16")
    text = bench_step_text(cfg)
    assert (text.count(CUDNN_FWD), text.count(CUDNN_BWD)) == (1, 1)
    assert text.count(TRITON) == (9 if impl == "pallas" else 0)
    assert ("chlo.ragged_dot" in text) == (impl == "ragged")
    tokamax = impl == "auto" and dispatch.auto_impl("gpu") == "tokamax"
    assert text.count(MOSAIC) == (9 if tokamax else 0)


@pytest.mark.parametrize("attention", ["xla", "dot_product_attention"])
def test_gpu_bench_step_lowers_with_each_attention(pretend_h100, attention):
    """gpu_check's `attention` step (its cuDNN correctness check): no cuDNN call in either."""
    _, cfg = bench.resolve_config("bench", "gpu", moe_impl="dense", attention_impl=attention)
    text = bench_step_text(cfg)
    assert text.count(CUDNN_FWD) == text.count(CUDNN_BWD) == 0


@pytest.mark.parametrize("policy", ["save_matmuls", "save_attention"])
def test_gpu_bench_step_lowers_under_named_remat(pretend_h100, policy):
    """gpu_check's `remat` step: the policies keep cuDNN's residuals (one attention forward)."""
    _, cfg = bench.resolve_config("bench", "gpu", moe_impl="pallas", remat=policy)
    text = bench_step_text(cfg)
    assert (text.count(CUDNN_FWD), text.count(CUDNN_BWD)) == (1, 1)
    # pallas's VJP keeps its inputs: save_matmuls recomputes no expert GEMM, save_attention the
    # three forwards
    assert text.count(TRITON) == {"save_matmuls": 9, "save_attention": 12}[policy]
