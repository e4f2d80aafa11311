"""Lowering GPU programs for CUDA on this CPU (lowering only: XLA's CUDA compilation and the run
are left to a GPU). Used by conftest.py's fixtures and by subprocess test bodies.

The pretend functions (zephyr_jax/gpu_aot.py) answer what jax, Pallas and tokamax ask the local GPU
while lowering, as a Hopper GPU would.
"""

from __future__ import annotations

import jax

from zephyr_jax import bench
from zephyr_jax.config import MixtralConfig
from zephyr_jax.gpu_aot import abstract_bench_step, pretend_cudnn, pretend_triton_target
from zephyr_jax.gpu_aot import pretend as pretend_h100

__all__ = ["bench_step_text", "lower_for_cuda", "pretend_cudnn", "pretend_h100",
           "pretend_triton_target"]


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `jit(fn)` lowered for CUDA (kernels and custom calls included)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def bench_step_text(cfg: MixtralConfig) -> str:
    """The bench's train step for `cfg` at the GPU bench shape, lowered for CUDA from abstract
    parameters and batch: nothing of the 2.4B-parameter model is allocated."""
    step, state, batch = abstract_bench_step(cfg, *bench.default_shape("bench"))
    return step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
