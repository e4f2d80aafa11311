"""Shared fixtures: tiny HF Mixtral models saved by transformers, for parity tests."""

from __future__ import annotations

import os

# Tests compare float32 results to 1e-4..1e-5: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
