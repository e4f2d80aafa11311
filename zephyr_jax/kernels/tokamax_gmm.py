"""tokamax's Mosaic-GPU grouped GEMM (Hopper), with a block config per kernel and our own VJP.

Optional: tokamax needs Python >= 3.12 and jax >= 0.11.1, and its kernels run on NVIDIA GPUs. Its
op classes are private, pinned here to tokamax 0.0.17, and used directly for two reasons:

- block configs: its public `ragged_dot` takes none (it runs its heuristics, 64 x 64 output tiles,
  block_k 128 and 2 stages on Hopper), and its VJP builds default ops for dx and dw;
- remat: its op keeps the forward output as a VJP residual, which no remat policy can keep (it is
  neither a dot nor named), so under every policy but "none" the forward kernel ran again in the
  backward pass, even where its output was saved by name (tests/test_tokamax.py counts the
  kernels). Our VJP keeps only the inputs, as `gmm` and `scan_gmm` do.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp

from zephyr_jax.kernels.tiling import match_varying, vary_like


@functools.cache
def available() -> bool:
    """Whether tokamax imports here (installed is not enough: it imports optional packages)."""
    if importlib.util.find_spec("tokamax") is None:
        return False
    try:
        import tokamax  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def _modules():
    try:
        from tokamax._src.ops.ragged_dot import base
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as mgpu
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as common
    except ImportError as e:
        raise ImportError(
            "moe_impl='tokamax' needs the optional tokamax package (pip install tokamax==0.0.17; "
            "it needs Python >= 3.12 and jax >= 0.11.1); moe_impl='auto' picks another "
            "implementation when it is missing") from e
    return base, mgpu, common


def mosaic_op(kernel: str, fields: dict | None):
    """tokamax's Mosaic-GPU ragged-dot op with the block config `fields` (tokamax's `Config` field
    names; `grid_minor_dim` may be "M" / "N"), or its heuristics for None. `kernel` names the
    forward / dx / dw kernel the config is for, in errors."""
    _, mgpu, common = _modules()
    config = None
    if fields is not None:
        known = {f.name for f in dataclasses.fields(mgpu.Config)}
        if unknown := sorted(set(fields) - known):
            raise ValueError(f"tokamax block config for the {kernel} kernel: unknown field(s) "
                             f"{unknown}; tokamax's Config has {sorted(known)}")
        fields = dict(fields)
        if isinstance(fields.get("grid_minor_dim"), str):
            fields["grid_minor_dim"] = common.MatmulDimension[fields["grid_minor_dim"]]
        config = mgpu.Config(**fields)
    # tokamax checks the device only for the ops it picks itself; the op runs on NVIDIA GPUs and
    # lowers for CUDA anywhere (which tests/test_tokamax.py does without a GPU)
    return mgpu.PallasMosaicGpuRaggedDot(config=config, bypass_device_check=True)


def _rows_in_groups(a_MX: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    # rows past the groups ("no expert" slots of the expert-parallel buffers) come out zero, as
    # ragged_dot's do; tokamax leaves them unwritten
    rows_M = jnp.arange(a_MX.shape[0]) < jnp.sum(group_sizes_G)
    return jnp.where(rows_M[:, None], a_MX, 0).astype(a_MX.dtype)


def ops_matmul(fwd_op, dx_op, dw_op):
    """`ragged_dot(x_MK, w_GKN, group_sizes_G)` through three tokamax ragged-dot ops: `fwd_op` for
    y = x w, `dx_op` for dy w^T, `dw_op` for x^T dy per group. Any tokamax `RaggedDot` op works
    (its XLA one is how the tests check this off a GPU). Residuals: the inputs only."""
    base, _, _ = _modules()

    @jax.custom_vjp
    def matmul(x_MK, w_GKN, group_sizes_G):
        y_MN = fwd_op(x_MK, w_GKN, group_sizes=group_sizes_G,
                      ragged_dot_dimension_numbers=base.DEFAULT_RAGGED_DOT_DIM_NUMS,
                      preferred_element_type=x_MK.dtype)
        return _rows_in_groups(y_MN, group_sizes_G)

    def matmul_fwd(x_MK, w_GKN, group_sizes_G):
        return matmul(x_MK, w_GKN, group_sizes_G), (x_MK, w_GKN, group_sizes_G)

    def matmul_bwd(res, dy_MN):
        x_MK, w_GKN, group_sizes_G = res
        dy_MN = _rows_in_groups(dy_MN, group_sizes_G)
        # inside shard_map (expert parallelism) each cotangent must vary over the mesh axes its
        # primal does: tokamax's ops take `manual_axis_type` for that (as its own VJP passes it),
        # but its dw kernel's output comes out less varying, hence `vary_like` below
        dx_MK = dx_op(dy_MN, w_GKN, group_sizes=group_sizes_G,  # [M, N] x [G, K, N]^T
                      ragged_dot_dimension_numbers=base.TRANS_RHS_RAGGED_DOT_DIM_NUMS,
                      preferred_element_type=x_MK.dtype,
                      manual_axis_type=jax.typeof(x_MK).manual_axis_type.to_ct_mat())
        dw_GKN = dw_op(x_MK, dy_MN, group_sizes=group_sizes_G,  # contracts the ragged rows
                       ragged_dot_dimension_numbers=base.RAGGED_CONTRACTING_DOT_DIM_NUMS,
                       preferred_element_type=w_GKN.dtype,
                       manual_axis_type=jax.typeof(w_GKN).manual_axis_type.to_ct_mat())
        return (vary_like(_rows_in_groups(dx_MK, group_sizes_G), x_MK),
                vary_like(dw_GKN, w_GKN), None)

    matmul.defvjp(matmul_fwd, matmul_bwd)
    return matmul


def tokamax_matmul(fwd: dict | None = None, dx: dict | None = None, dw: dict | None = None):
    """tokamax's Mosaic-GPU `ragged_dot` with block configs for its forward, dx and dw kernels:
    dicts of tokamax's `Config` fields (`block_m`, `block_n`, `block_k`, `num_stages`, `split_k`,
    `persistent`, `grid_minor_dim` "M" / "N", `grid_tile_width`); None runs tokamax's heuristics
    for that kernel. tokamax is imported when the matmul is traced, not before."""

    def matmul(x_MK, w_GKN, group_sizes_G):
        ops = (mosaic_op("forward", fwd), mosaic_op("dx", dx), mosaic_op("dw", dw))
        # under shard_map: the weights cast to vary like the tokens (see `match_varying`)
        x_MK, w_GKN = match_varying(x_MK, w_GKN)
        return ops_matmul(*ops)(x_MK, w_GKN, group_sizes_G)

    return matmul
