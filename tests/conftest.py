"""Shared test settings and fixtures for lowering GPU programs on this CPU."""

from __future__ import annotations

import os

import pytest

# Tests compare float32 results to 1e-4..1e-5: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture
def cudnn_present(monkeypatch):
    """jax lowers cuDNN's fused attention for CUDA only after asking the local GPU for cuDNN's
    version and its compute capability: answer cuDNN 9.14 on a Hopper GPU, so that
    `.lower(lowering_platforms=("cuda",))` works here (lowering only: nothing runs)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91400)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda cc: True)
    monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda cc: False)


@pytest.fixture
def pretend_h100(monkeypatch, cudnn_present):
    """Lower the GPU programs here as for an H100: our code's platform choices (moe_impl "auto",
    Pallas' Triton path instead of its interpreter, scan tile rows) read `jax.default_backend()`
    at trace time, made "gpu"; Pallas' Triton lowering (jax >= 0.11) asks for the GPU's compute
    capability (9.0); tokamax (where installed) asks the device for its compute
    capability (9.0) and, for persistent kernels, its SM count (132)."""
    import importlib.util
    import types

    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    _pretend_triton_target(monkeypatch)
    if importlib.util.find_spec("tokamax") is not None:
        from tokamax._src import gpu_utils
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_kernel_sm90 as sm90

        monkeypatch.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
        h100 = types.SimpleNamespace(core_count=132)
        monkeypatch.setattr(sm90, "backend", types.SimpleNamespace(get_default_device=lambda: h100))


def _pretend_triton_target(monkeypatch):
    import types

    try:  # jax >= 0.11 asks the local GPU; 0.10 lowers for a default target
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        return
    h100 = types.SimpleNamespace(compute_capability=90, arch_name="9.0", gpu_version=None)
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)


@pytest.fixture
def triton_target(monkeypatch):
    """Pallas' Triton lowering for an H100 without one (see `pretend_h100`)."""
    _pretend_triton_target(monkeypatch)
