"""Row tiling shared by the grouped GEMMs: which (group, row tile) pairs a grouped matmul visits.

Rows are sorted by group: group g owns rows [start_g, end_g), groups back to back from row 0.
A work item is a (group, bm-aligned row tile) pair whose rows meet; a tile two groups share is
visited once per group and each visit keeps only its own rows, so there are at most M / bm + G
items whatever the group sizes (static, so they fit a grid or a scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes_G: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """Row ranges [start, end) of G + 2 groups: the G real ones, the tail past their total (rows
    that come out zero), and an empty one that spare work items point at."""
    ends_G = jnp.cumsum(group_sizes_G)
    total = ends_G[-1:]
    m = jnp.full((1,), M, jnp.int32)
    starts = jnp.concatenate([ends_G - group_sizes_G, total, m])
    ends = jnp.concatenate([ends_G, m, m])
    return starts.astype(jnp.int32), ends.astype(jnp.int32)


def work_items(starts: jax.Array, ends: jax.Array, M: int, bm: int) -> tuple[jax.Array, jax.Array]:
    """(group, row tile) of each of the M / bm + G work items of `_gmm`, in group order.

    Group g covers aligned tiles first_g .. last_g - 1; spare items (past the real ones) get the
    empty group G + 1 and tile 0.
    """
    n_groups = starts.shape[0]  # G + 2
    n_items = M // bm + n_groups - 2
    first = starts // bm
    tiles = jnp.where(ends > starts, (ends + bm - 1) // bm - first, 0)
    item_end = jnp.cumsum(tiles)
    t = jnp.arange(n_items, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(item_end, t, side="right"), n_groups - 1).astype(jnp.int32)
    tile = first[group] + t - (item_end - tiles)[group]
    return group, jnp.where(group < n_groups - 1, tile, 0).astype(jnp.int32)


def _varying(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; later versions call it vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def match_varying(*arrays: jax.Array) -> list[jax.Array]:
    """Each array cast to vary over every shard_map axis any of them varies over.

    Inside shard_map (the expert-parallel MoE) tokens vary over the token and expert axes, the
    weights only over the expert axis. A custom VJP must return cotangents typed like its inputs,
    and the weight cotangent varies over the token axes until summed: casting the weights first
    makes the types agree, and the cast's transpose is that sum. Outside shard_map: a no-op.
    """
    axes = frozenset().union(*(_varying(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - _varying(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def vary_like(a: jax.Array, like: jax.Array) -> jax.Array:
    """`a` cast to vary over the shard_map axes `like` varies over (a custom VJP's cotangent typed
    like its primal, where a kernel outside our control typed it less varying). Outside
    shard_map: a no-op."""
    missing = tuple(sorted(_varying(like) - _varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel's output type, varying over the same shard_map axes as `like` (which
    `match_varying` made the union of its inputs'): shard_map requires it of Pallas outputs."""
    aval = jax.typeof(like)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)
    if vma:  # the jax versions that name it vma
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def check_operands(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array) -> None:
    """The shapes `jax.lax.ragged_dot` accepts, checked before tracing (a wrong group count would
    otherwise misassign rows silently)."""
    if x_MK.ndim != 2 or w_GKN.ndim != 3 or w_GKN.shape[1] != x_MK.shape[1]:
        raise ValueError(f"grouped GEMM: x {x_MK.shape} must be [M, K] and w {w_GKN.shape} "
                         f"[G, K, N] with the same K")
    if group_sizes_G.shape != (w_GKN.shape[0],) or not jnp.issubdtype(group_sizes_G.dtype,
                                                                       jnp.integer):
        raise ValueError(f"grouped GEMM: group_sizes {group_sizes_G.shape} {group_sizes_G.dtype} "
                         f"must be integers, one per group of w {w_GKN.shape}")
