"""Grouped GEMM for the MoE expert layer as Pallas kernels (Triton lowering), with its own VJP.

    gmm(x_MK, w_GKN, group_sizes_G) == jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)

Why: PERF.md measured XLA's GPU lowering of `ragged_dot` at 105 TFLOP/s forward and 85 backward on
the bench expert shapes (32,768 rows, 2048 -> 5632, 8 experts, bf16) against 823 for a dense matmul
of the same FLOPs; the dropless MoE step spends most of its time there. This is a plain tiled GEMM
per (group, row tile), the layout of megablox's `gmm` / `tgmm`:

- Rows of x are sorted by group: group g owns rows [start_g, end_g), groups back to back from row 0.
  Rows past `sum(group_sizes)` belong to no group and come out zero, as in `ragged_dot` (the MoE
  dispatch relies on that for "no expert" rows).
- `_gmm` (forward, and dx = dy @ w[g]^T): grid (work item, output column block). A work item is a
  (group, bm-aligned row tile) pair whose rows meet; a tile two groups share is visited once per
  group and each visit stores only its own rows (masked store), so the rows written are disjoint.
  There are at most M / bm + G items; spare items have no rows and store nothing.
- `_tgmm` (dw[g] = x_g^T @ dy_g): grid (group, K block, N block); each program walks its group's
  aligned row tiles, loading other groups' rows of x as zeros (a masked load, so both MMA operands
  stay in shared memory and the loop pipelines: `python -m zephyr_jax.kernel_audit`).

Every array is padded to whole blocks first (rows to bm, K and N to max(bk, bn)); the bench shapes
need none. Accumulation is float32; outputs take the input dtype, like `ragged_dot`. float32 inputs
run on TF32 tensor cores on a GPU. `interpret=True` runs the same kernels through Pallas' interpreter
(any backend, slow): that is how the CPU tests check them against `ragged_dot`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zephyr_jax.kernels.tiling import (
    check_operands,
    group_bounds,
    match_varying,
    out_struct,
    work_items,
)


class Tiles(NamedTuple):
    """Block sizes (powers of two, >= 16 for Triton's dot) and Triton launch parameters.

    (bm, bk, bn) tile the forward and dx kernels (rows, contraction, output columns: in dx the
    contraction runs over N and the output over K); (dw_bm, dw_bk, dw_bn) the dw kernel, whose
    output is a [dw_bk, dw_bn] block and whose loop runs over dw_bm-row tiles.

    `l2_order`: the launch order of the programs (CUDA runs the first grid axis fastest). True:
    the forward / dx kernels walk a row tile's output-column blocks first, so the ~one wave of
    programs in flight shares a few lhs row tiles and one group's weights in L2 (lhs read from
    HBM about once); the dw kernel walks one group's (K, N) blocks before the next group. False:
    row tiles first and groups first, which re-reads lhs once per output-column block. Unmeasured
    on a GPU: `bench --gemm` times both."""

    bm: int
    bk: int
    bn: int
    num_warps: int
    num_stages: int
    interpret: bool
    dw_bm: int
    dw_bk: int
    dw_bn: int
    l2_order: bool


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit(block: int, dim: int) -> int:
    """The block, shrunk (to a power of two >= 16) for dimensions smaller than it."""
    while block > 16 and block // 2 >= dim:
        block //= 2
    return block


def gmm(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *, bm: int = 128,
        bk: int = 64, bn: int = 128, num_warps: int = 8, num_stages: int = 3,
        dw_tiles: tuple[int, int, int] | None = None, l2_order: bool = True,
        interpret: bool | None = None) -> jax.Array:
    """`jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)` (forward and gradients) as Pallas kernels.

    (bm, bk, bn): rows, contraction and output columns per block of the forward and dx kernels;
    `dw_tiles` = (rows, K, N) per block of the dw kernel (default: the same three); `l2_order`:
    the programs' launch order (`Tiles`).
    `interpret=None` means the Triton kernels on a GPU and Pallas' interpreter elsewhere.
    `sum(group_sizes_G)` must not exceed M (as for ragged_dot; not checked, it is traced).
    """
    check_operands(x_MK, w_GKN, group_sizes_G)
    M, K = x_MK.shape
    N = w_GKN.shape[2]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dw_bm, dw_bk, dw_bn = dw_tiles or (bm, bk, bn)
    for name, b in (("bm", bm), ("bk", bk), ("bn", bn), ("dw_tiles[0]", dw_bm),
                    ("dw_tiles[1]", dw_bk), ("dw_tiles[2]", dw_bn)):
        if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
            raise ValueError(f"gmm: block {name}={b!r} must be a power of two >= 16 (Triton's dot)")
    bm, bk, bn = _fit(bm, M), _fit(bk, K), _fit(bn, N)
    dw_bm, dw_bk, dw_bn = _fit(dw_bm, M), _fit(dw_bk, K), _fit(dw_bn, N)
    tiles = Tiles(bm, bk, bn, num_warps, num_stages, bool(interpret), dw_bm, dw_bk, dw_bn,
                  bool(l2_order))
    # blocks are powers of two, so padding to the largest one fits every kernel's blocks; K and N
    # are both contraction and output dims across forward / dx
    kn = max(bk, bn, dw_bk, dw_bn)
    Mp, Kp, Np = _round_up(M, max(bm, dw_bm)), _round_up(K, kn), _round_up(N, kn)
    if (Mp, Kp) != (M, K):
        x_MK = jnp.pad(x_MK, ((0, Mp - M), (0, Kp - K)))
    if (Kp, Np) != (K, N):
        w_GKN = jnp.pad(w_GKN, ((0, 0), (0, Kp - K), (0, Np - N)))
    x_MK, w_GKN = match_varying(x_MK, w_GKN)
    out = _gmm_vjp(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), tiles)
    return out[:M, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_vjp(x_MK, w_GKN, group_sizes_G, tiles: Tiles):
    return _gmm(x_MK, w_GKN, group_sizes_G, tiles, transpose_rhs=False)


def _gmm_fwd(x_MK, w_GKN, group_sizes_G, tiles):
    # the output through the custom-VJP function, not the kernel itself: jax.checkpoint then sees
    # one custom_vjp_call whose output a remat policy can keep by name; a bare pallas_call here was
    # recomputed in the backward pass under every policy (tests/test_gpu_lowering.py)
    return _gmm_vjp(x_MK, w_GKN, group_sizes_G, tiles), (x_MK, w_GKN, group_sizes_G)


def _gmm_bwd(tiles, res, dy_MN):
    x_MK, w_GKN, group_sizes_G = res
    dx_MK = _gmm(dy_MN, w_GKN, group_sizes_G, tiles, transpose_rhs=True)
    dw_GKN = _tgmm(x_MK, dy_MN, group_sizes_G, tiles)
    return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


# ----------------------------------------------------------------------------- kernels


def _compiler_params(tiles: Tiles):
    if tiles.interpret:
        return None
    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _gmm(lhs_MC, rhs, group_sizes_G, tiles: Tiles, *, transpose_rhs: bool):
    """out[r] = lhs[r] @ rhs[g(r)] (rhs [G, C, O]), or lhs[r] @ rhs[g(r)]^T (rhs [G, O, C])."""
    M, C = lhs_MC.shape
    G = rhs.shape[0]
    n_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm = tiles.bm
    # dx blocks like the forward (contraction bk, output columns bn), not the forward's weight
    # tile transposed (contraction bn, output bk): the wgmma instruction's N is the output block,
    # and at 64 Hopper's MMA reads shared memory twice per FLOP what it does at 128
    # (`python -m zephyr_jax.kernel_audit` shows m64n64k16 before, m64n128k16 now; the speed is
    # unmeasured until `bench --gemm` times dx on a GPU)
    bc, bo = tiles.bk, tiles.bn
    starts, ends = group_bounds(group_sizes_G, M)
    group_T, tile_T = work_items(starts, ends, M, bm)

    # (work item, output-column block) -> program ids: see Tiles.l2_order
    t_axis, o_axis = (1, 0) if tiles.l2_order else (0, 1)

    def kernel(group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
        t, o = pl.program_id(t_axis), pl.program_id(o_axis)
        g = group_ref[t]
        row0 = tile_ref[t] * bm
        rows = row0 + jnp.arange(bm, dtype=jnp.int32)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        g_w = jnp.minimum(g, G - 1)  # the tail and spare items read group G-1's weights, 0 times

        def body(i, acc):
            c0 = pl.multiple_of(i * bc, bc)
            a = lhs_ref[pl.ds(row0, bm), pl.ds(c0, bc)]
            if transpose_rhs:
                b = rhs_ref[g_w, pl.ds(o * bo, bo), pl.ds(c0, bc)]
                return acc + plgpu.dot(a, b, trans_b=True)
            b = rhs_ref[g_w, pl.ds(c0, bc), pl.ds(o * bo, bo)]
            return acc + plgpu.dot(a, b)

        # not jnp.where(g < G, C // bc, 0): jax 0.11's Triton lowering types a select of two
        # literals as i1, which Triton's verifier rejects (found compiling for an H100 deviceless)
        steps = (g < G).astype(jnp.int32) * (C // bc)
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bo), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(o * bo, bo)], acc.astype(out_ref.dtype),
                    mask=mine[:, None])

    return pl.pallas_call(
        kernel,
        out_shape=out_struct((M, n_out), lhs_MC.dtype, like=lhs_MC),
        grid=((n_out // bo, group_T.shape[0]) if tiles.l2_order else (group_T.shape[0], n_out // bo)),
        compiler_params=_compiler_params(tiles),
        interpret=tiles.interpret,
        name="gmm_t" if transpose_rhs else "gmm",
    )(group_T, tile_T, starts, ends, lhs_MC, rhs)


def _tgmm(x_MK, dy_MN, group_sizes_G, tiles: Tiles):
    """dw[g] = x[rows of g]^T @ dy[rows of g], [G, K, N] (zeros for empty groups)."""
    M, K = x_MK.shape
    N = dy_MN.shape[1]
    G = group_sizes_G.shape[0]
    bm, bk, bn = tiles.dw_bm, tiles.dw_bk, tiles.dw_bn
    starts, ends = group_bounds(group_sizes_G, M)

    # (group, K block, N block) -> program ids: groups last (slowest) with l2_order
    axes = (2, 0, 1) if tiles.l2_order else (0, 1, 2)
    grid = (K // bk, N // bn, G) if tiles.l2_order else (G, K // bk, N // bn)

    def kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref):
        g, kb, nb = (pl.program_id(a) for a in axes)
        start, end = starts_ref[g], ends_ref[g]
        first = start // bm
        steps = jnp.where(end > start, (end + bm - 1) // bm - first, 0)

        def body(i, acc):
            row0 = pl.multiple_of((first + i) * bm, bm)
            rows = row0 + jnp.arange(bm, dtype=jnp.int32)
            mine = (rows >= start) & (rows < end)
            # masked in the load, not by a `where` after it: a `where` put the tile in registers,
            # and Triton then fed wgmma from registers and waited for each MMA (kernel_audit)
            a = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(kb * bk, bk)], mask=mine[:, None],
                           other=0)
            b = dy_ref[pl.ds(row0, bm), pl.ds(nb * bn, bn)]
            return acc + plgpu.dot(a, b, trans_a=True)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=out_struct((G, K, N), x_MK.dtype, like=x_MK),
        grid=grid,
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((None, bk, bn),
                               lambda *ids: tuple(ids[a] for a in axes)),
        compiler_params=_compiler_params(tiles),
        interpret=tiles.interpret,
        name="tgmm",
    )(starts, ends, x_MK, dy_MN)
