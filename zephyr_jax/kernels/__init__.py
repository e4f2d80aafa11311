"""Grouped GEMMs for the MoE expert layer, each equal to `jax.lax.ragged_dot` (forward and VJP):

- `gmm`: Pallas kernels lowered through Triton (NVIDIA GPUs; Pallas' interpreter elsewhere, which is
  how the CPU tests check it);
- `scan_gmm`: a loop of dense matmuls over (group, row tile) items (XLA:CPU, where `ragged_dot`
  is slow);
- `tokamax_gmm.tokamax_matmul`: tokamax's Mosaic-GPU kernels (Hopper; optional, Python >= 3.12),
  imported only when used.
"""

from zephyr_jax.kernels.grouped_gemm import gmm
from zephyr_jax.kernels.scan_gmm import scan_gmm

__all__ = ["gmm", "scan_gmm"]
