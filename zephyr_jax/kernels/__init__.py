"""Hand-written GPU kernels (Pallas, Triton lowering). Each has a pure-JAX oracle it is tested against
on CPU in Pallas interpret mode; see the module docstrings."""

from zephyr_jax.kernels.grouped_gemm import gmm, ragged_dispatch

__all__ = ["gmm", "ragged_dispatch"]
