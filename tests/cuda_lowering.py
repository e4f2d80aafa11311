"""Lowering GPU programs for CUDA on this CPU (lowering only: XLA's CUDA compilation and the run
are left to a GPU). Used by conftest.py's fixtures and by subprocess test bodies.

The pretend functions answer the questions jax, Pallas and tokamax ask the local GPU while
lowering, as an H100 with cuDNN 9.14 would; `setattr_` is `monkeypatch.setattr` in a test (undone
after it) or plain `setattr` in a subprocess.
"""

from __future__ import annotations

import importlib.util
import types

import jax
from flax import nnx

from zephyr_jax import bench
from zephyr_jax.config import MixtralConfig
from zephyr_jax.model import Mixtral, params_dict
from zephyr_jax.optim import make_optimizer, make_schedule
from zephyr_jax.train_step import create_train_state, make_train_step


def pretend_cudnn(setattr_=setattr) -> None:
    """jax lowers cuDNN's fused attention only after asking for cuDNN's version and the GPU's
    compute capability."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    setattr_(cudnn_attention, "check_cudnn_version", lambda: 91400)
    setattr_(cudnn_attention, "check_compute_capability", lambda cc: True)
    setattr_(cudnn_attention, "is_cuda_compute_capability_equal", lambda cc: False)


def pretend_triton_target(setattr_=setattr) -> None:
    """Pallas' Triton lowering asks for the GPU's compute capability (jax >= 0.11; 0.10 lowers
    for a default target)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        return
    h100 = types.SimpleNamespace(compute_capability=90, arch_name="9.0", gpu_version=None)
    setattr_(gpu_info, "get_gpu_info", lambda: h100)


def pretend_h100(setattr_=setattr) -> None:
    """All of the above, plus: our code's platform choices (moe_impl "auto", Pallas' Triton path
    instead of its interpreter, scan tile rows) read `jax.default_backend()` at trace time, made
    "gpu"; tokamax (where installed) asks for the compute capability (9.0) and, for persistent
    kernels, the SM count (132)."""
    pretend_cudnn(setattr_)
    pretend_triton_target(setattr_)
    setattr_(jax, "default_backend", lambda: "gpu")
    if importlib.util.find_spec("tokamax") is not None:
        from tokamax._src import gpu_utils
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_kernel_sm90 as sm90

        setattr_(gpu_utils, "_compute_capability", lambda device=None: 9.0)
        h100 = types.SimpleNamespace(core_count=132)
        setattr_(sm90, "backend", types.SimpleNamespace(get_default_device=lambda: h100))


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
