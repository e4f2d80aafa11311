"""Shared test settings and fixtures for lowering GPU programs on this CPU (tests/cuda_lowering.py)."""

from __future__ import annotations

import os

import pytest

# Tests compare float32 results to 1e-4..1e-5: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture
def cudnn_present(monkeypatch):
    """cuDNN's fused attention lowers for CUDA here (`cuda_lowering.pretend_cudnn`)."""
    from cuda_lowering import pretend_cudnn

    pretend_cudnn(monkeypatch.setattr)


@pytest.fixture
def triton_target(monkeypatch):
    """Pallas' Triton kernels lower for an H100 here (`cuda_lowering.pretend_triton_target`)."""
    from cuda_lowering import pretend_triton_target

    pretend_triton_target(monkeypatch.setattr)


@pytest.fixture
def pretend_h100(monkeypatch):
    """Whole GPU programs lower as for an H100 here (`cuda_lowering.pretend_h100`)."""
    from cuda_lowering import pretend_h100

    pretend_h100(monkeypatch.setattr)
