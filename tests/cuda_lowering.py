"""Helpers for tests that lower GPU programs for CUDA on this CPU (fixtures: conftest.py)."""

from __future__ import annotations

import jax
from flax import nnx

from zephyr_jax import bench
from zephyr_jax.config import MixtralConfig
from zephyr_jax.model import Mixtral, params_dict
from zephyr_jax.optim import make_optimizer, make_schedule
from zephyr_jax.train_step import create_train_state, make_train_step


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `jit(fn)` lowered for CUDA (kernels and custom calls included)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def bench_step_text(cfg: MixtralConfig) -> str:
    """The bench's train step for `cfg` at the GPU bench shape, lowered for CUDA from abstract
    parameters and batch: nothing of the 2.4B-parameter model is allocated."""
    pairs, seq = bench.default_shape("bench")
    batch = bench.make_batch(cfg.vocab_size, pairs, seq)
    schedule = make_schedule("constant", bench.LR, warmup_steps=0, total_steps=1)
    tx = make_optimizer(schedule, weight_decay=0.0, max_grad_norm=1.0)
    params = jax.eval_shape(lambda: params_dict(Mixtral(cfg, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    device_batch = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype) for k, v in batch.items()}
    return lower_for_cuda(make_train_step(cfg, tx, schedule, bench.BETA, bench.CHUNK_SIZE),
                          state, device_batch)
