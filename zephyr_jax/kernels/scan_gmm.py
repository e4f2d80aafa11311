"""Grouped GEMM as a loop of plain matmuls over (group, row tile) work items: the CPU path.

    scan_gmm(x_MK, w_GKN, group_sizes_G) == jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)

Why: XLA:CPU lowers `ragged_dot` to work proportional to every group on every row, so it ran 8x
(forward) to 11x (backward) slower than an einsum of the same FLOPs on the 2-core CPU
(docs/PERFORMANCE.md). Here each of the at most M / bm + G work items (`tiling.work_items`) is one
dense [bm, K] x [K, N] matmul against its group's weights, in a loop that stops after the last
group's items on CPU, so the FLOPs are the useful ones plus at most one partial tile per group,
at the CPU's dense matmul rate, however many rows past the groups the buffer has.

The VJP is written out rather than derived: autodiff of the forward scan would carry the whole
[G, K, N] weight cotangent through every iteration; here dx is the same loop against transposed
weights and dw[g] accumulates x_tile^T @ dy_tile in float32, one group slice per item.

Rows past `sum(group_sizes)` come out zero (and get zero dx), as with `ragged_dot`. It is not a GPU
kernel: the items run one after another.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zephyr_jax.kernels.tiling import check_operands, group_bounds, match_varying, work_items


def _block_rows(bm: int, M: int) -> int:
    """bm, shrunk for small M (decode steps) to the power of two >= M (at least 8)."""
    while bm > 8 and bm // 2 >= M:
        bm //= 2
    return bm


def scan_gmm(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
             bm: int = 256) -> jax.Array:
    """`jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)`, forward and gradients, as a matmul loop.

    `bm` rows per tile; `sum(group_sizes_G)` must not exceed M (as for ragged_dot; traced, so
    not checked). Output dtype is x's; products accumulate in float32.
    """
    check_operands(x_MK, w_GKN, group_sizes_G)
    if not isinstance(bm, int) or bm < 1:
        raise ValueError(f"scan_gmm: bm (rows per tile) must be a positive integer, got {bm!r}")
    M = x_MK.shape[0]
    bm = _block_rows(bm, M)
    Mp = -(-M // bm) * bm
    if Mp != M:
        x_MK = jnp.pad(x_MK, ((0, Mp - M), (0, 0)))
    x_MK, w_GKN = match_varying(x_MK, w_GKN)
    return _scan_gmm(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), bm)[:M]


def _items(group_sizes_G, Mp: int, bm: int):
    """(starts, ends, group_T, tile_T, n_real): the work items, of which the first n_real cover
    the groups' rows; the rest (rows past the groups, spare items) would only add zeros."""
    starts, ends = group_bounds(group_sizes_G, Mp)
    group_T, tile_T = work_items(starts, ends, Mp, bm)
    n_real = jnp.sum(group_T < group_sizes_G.shape[0]).astype(jnp.int32)  # items in group order
    return starts, ends, group_T, tile_T, n_real


def _over_real_items(item, init, items):
    """`item(carry, (g, t))` over the work items. On CPU over the real ones only: a loop whose
    trip count is the routed rows' (traced), so the expert-parallel receive buffers' empty tail
    (3/4 of their rows with 8 experts on 8 devices, top-2) costs no matmul. Elsewhere over all of
    them: XLA's GPU runtime reads a data-dependent loop's predicate back to the host every
    iteration, a sync per tile; a static trip count needs none. Not differentiated (the VJP is
    written out)."""
    group_T, tile_T, n_real = items[2:]
    if jax.default_backend() != "cpu":
        return jax.lax.scan(item, init, (group_T, tile_T))[0]

    def body(i, carry):
        return item(carry, (group_T[i], tile_T[i]))[0]

    return jax.lax.fori_loop(0, n_real, body, init)


def _tile(items, G: int, bm: int, g, t):
    """First row of tile t and which of its rows belong to group g (none for the tail groups)."""
    starts, ends = items[0], items[1]
    row0 = t * bm
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    return row0, (rows >= starts[g]) & (rows < ends[g]) & (g < G)


def _loop(lhs_MC, rhs, items, bm: int, *, transpose_rhs: bool):
    """out[r] = lhs[r] @ rhs[g(r)] (rhs [G, C, O]) or lhs[r] @ rhs[g(r)]^T (rhs [G, O, C])."""
    G = rhs.shape[0]
    n_out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    spec = "mc,oc->mo" if transpose_rhs else "mc,co->mo"

    def item(out_MO, gt):
        g, t = gt
        row0, mine_m = _tile(items, G, bm, g, t)
        lhs_mC = jax.lax.dynamic_slice_in_dim(lhs_MC, row0, bm)
        rhs_g = jax.lax.dynamic_index_in_dim(rhs, jnp.minimum(g, G - 1), keepdims=False)
        y_mO = jnp.einsum(spec, lhs_mC, rhs_g, preferred_element_type=jnp.float32)
        # a tile two groups share is written by both items: add this group's rows only
        cur_mO = jax.lax.dynamic_slice_in_dim(out_MO, row0, bm)
        new_mO = cur_mO + jnp.where(mine_m[:, None], y_mO, 0.0).astype(out_MO.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out_MO, new_mO, row0, 0), None

    # zeros_like keeps lhs's shard_map varying axes, which the carry must have (expert parallel)
    out_MO = jnp.zeros_like(lhs_MC, shape=(lhs_MC.shape[0], n_out))
    return _over_real_items(item, out_MO, items)


def _weight_grad(x_MK, dy_MN, items, G: int, bm: int):
    """dw[g] = x[rows of g]^T @ dy[rows of g], accumulated in float32."""

    def item(dw_GKN, gt):
        g, t = gt
        row0, mine_m = _tile(items, G, bm, g, t)
        x_mK = jnp.where(mine_m[:, None], jax.lax.dynamic_slice_in_dim(x_MK, row0, bm), 0)
        dy_mN = jax.lax.dynamic_slice_in_dim(dy_MN, row0, bm)
        gi = jnp.minimum(g, G - 1)  # tail items add zeros (their rows are all masked)
        cur_KN = jax.lax.dynamic_index_in_dim(dw_GKN, gi, keepdims=False)
        new_KN = cur_KN + jnp.einsum("mk,mn->kn", x_mK, dy_mN, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw_GKN, new_KN, gi, 0), None

    dw_GKN = jnp.zeros_like(x_MK, jnp.float32, shape=(G, x_MK.shape[1], dy_MN.shape[1]))
    return _over_real_items(item, dw_GKN, items)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan_gmm(x_MK, w_GKN, group_sizes_G, bm: int):
    return _loop(x_MK, w_GKN, _items(group_sizes_G, x_MK.shape[0], bm), bm, transpose_rhs=False)


def _scan_gmm_fwd(x_MK, w_GKN, group_sizes_G, bm):
    return _scan_gmm(x_MK, w_GKN, group_sizes_G, bm), (x_MK, w_GKN, group_sizes_G)


def _scan_gmm_bwd(bm, res, dy_MN):
    x_MK, w_GKN, group_sizes_G = res
    items = _items(group_sizes_G, x_MK.shape[0], bm)
    dx_MK = _loop(dy_MN, w_GKN, items, bm, transpose_rhs=True)
    dw_GKN = _weight_grad(x_MK, dy_MN, items, w_GKN.shape[0], bm)
    return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


_scan_gmm.defvjp(_scan_gmm_fwd, _scan_gmm_bwd)
