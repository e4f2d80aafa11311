"""Expert-parallel MoE: tokens travel to the devices holding their experts and back (dropless).

Used by `dispatch.get_dispatch(...)` when the ambient mesh splits the experts
(`sharding.expert_parallel_plan()` is not None). Same interface as the local implementations:

    (x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor) -> (y_ND, dropped)

Inside one `jax.shard_map` over the whole mesh, each device holds n = N / token_shards tokens
and E_loc = E / X experts (X = expert-axis size; the weights' FSDP shards are all-gathered at the
shard_map boundary, and their gradients reduce-scattered back):

1. sort its m = n*K (token, slot) assignments by expert, i.e. by destination device;
2. pack them into a send buffer [X, P, D], row block j for expert-device j, where
   P = n * min(K, E_loc) is the worst case that one device can receive from one sender (a token's
   top-k experts are distinct, so at most min(K, E_loc) of its K copies share a device) -- with
   static shapes this bound is what makes the exchange dropless;
3. `all_to_all` over the expert axes: now block i holds what sender i routed here;
4. run the existing local implementation (`ragged` grouped matmul or `dense`) on the X*P
   received rows with their local expert ids; empty slots carry id E_loc ("no expert"), which
   the local implementations skip (ragged) or weigh by zero (dense);
5. `all_to_all` back, unpack, and combine with the routing weights in float32 at the source.

Memory/traffic cost of the static worst case: the buffers are X*P*D per device, X/K times the
expected n*K*D when E_loc == 1 (e.g. 4x for 8 experts on 8 devices, top-2). `jax.lax.ragged_all_to_all`
would send only the filled rows but XLA:CPU cannot run it (UNIMPLEMENTED in jax 0.10.2), so it
cannot be tested here; the padded exchange runs everywhere.

`dropped` counts assignments that did not fit P, which happens only if a token names the same
expert twice (never for top-k routing); it is reported, not hidden.

moe_impl="capacity" is the memory knob: it caps the per-(sender, expert-device) block at
P = ceil(capacity_factor * n*K / X) (at most the dropless bound), runs the ragged grouped matmul
on what fits, and counts the rest in `dropped`. Its drops differ from the single-device
`capacity` (which caps each expert over the whole batch): both are capacity-limited, neither
is the recipe's dropless MoE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zephyr_jax.model.dispatch import DISPATCH, _combine, inverse_permutation, resolve, take_rows
from zephyr_jax.sharding import ExpertParallelPlan

# moe_impl -> the local implementation run on the received rows (it must treat ids >= E_loc as
# "no expert"): each dropless one runs itself; "capacity" shrinks the exchange buffers (see module
# docstring) and runs the platform's dropless choice on them (None below).
LOCAL_IMPLS = {"dense": "dense", "ragged": "ragged", "scan": "scan", "pallas": "pallas",
               "tokamax": "tokamax", "capacity": None}


def exchange_rows(n: int, K: int, E_loc: int, X: int, impl: str,
                  capacity_factor: float | None) -> int:
    """Rows P of one (sender, expert-device) block for n local tokens with top-K routing."""
    dropless = n * min(K, E_loc)
    if impl != "capacity":
        return dropless
    return max(1, min(dropless, math.ceil(capacity_factor * n * K / X)))


def expert_parallel(impl: str, plan: ExpertParallelPlan, x_ND, expert_NK, weight_NK,
                    w1_EDF, w3_EDF, w2_EFD, capacity_factor: float | None = None):
    """Expert-parallel dispatch over `plan`'s mesh for moe_impl `impl`."""
    if impl not in LOCAL_IMPLS:
        raise ValueError(f"moe_impl={impl!r} has no expert-parallel path; have {sorted(LOCAL_IMPLS)}")
    local = LOCAL_IMPLS[impl] or resolve("auto", dtype=x_ND.dtype)
    local_fn = DISPATCH[local]
    E = w1_EDF.shape[0]
    N, K = expert_NK.shape
    X = plan.expert_size
    if E % X:
        raise ValueError(f"num_local_experts={E} is not divisible by the expert mesh axes "
                         f"{plan.expert_axes} (size {X})")
    # Token counts that do not split evenly (e.g. a decode step of a small batch) are padded
    # with zero tokens routed to experts 0..K-1 (distinct, as the buffer bound needs) at weight 0;
    # their rows are sliced off again.
    pad = -N % plan.token_shards
    if pad:
        x_ND = jnp.concatenate([x_ND, jnp.zeros((pad, x_ND.shape[1]), x_ND.dtype)])
        expert_NK = jnp.concatenate(
            [expert_NK, jnp.broadcast_to(jnp.arange(K, dtype=expert_NK.dtype), (pad, K))])
        weight_NK = jnp.concatenate([weight_NK, jnp.zeros((pad, K), weight_NK.dtype)])
    E_loc = E // X
    n = (N + pad) // plan.token_shards
    P_rows = exchange_rows(n, K, E_loc, X, impl, capacity_factor)
    ex_axes = plan.expert_axes if len(plan.expert_axes) > 1 else plan.expert_axes[0]

    def per_device(x_nD, expert_nK, weight_nK, w1_LDF, w3_LDF, w2_LFD):
        m, D = n * K, x_nD.shape[-1]
        flat_m = expert_nK.reshape(m)
        order_m = jnp.argsort(flat_m, stable=True)  # by expert, hence by destination device
        inverse_m = inverse_permutation(order_m)
        sorted_m = flat_m[order_m]
        dest_m = sorted_m // E_loc
        count_X = jnp.bincount(dest_m, length=X)
        slot_m = jnp.arange(m) - (jnp.cumsum(count_X) - count_X)[dest_m]
        overflow_m = slot_m >= P_rows
        # out of bounds, each its own slot: dropped by the scatters (read back as zeros), and
        # every (dest, slot) pair distinct, so the scatters can promise unique indices (their
        # JVP is then a plain scatter, not jax's duplicate-tracking one)
        slot_m = jnp.where(overflow_m, P_rows + jnp.arange(m), slot_m)

        send_XPD = jnp.zeros((X, P_rows, D), x_nD.dtype).at[dest_m, slot_m].set(
            take_rows(K, x_nD, order_m, inverse_m), mode="drop", unique_indices=True)
        send_XP = jnp.full((X, P_rows), E_loc, jnp.int32).at[dest_m, slot_m].set(
            (sorted_m % E_loc).astype(jnp.int32), mode="drop", unique_indices=True)

        recv_RD = jax.lax.all_to_all(send_XPD, ex_axes, 0, 0, tiled=True).reshape(X * P_rows, D)
        recv_R = jax.lax.all_to_all(send_XP, ex_axes, 0, 0, tiled=True).reshape(X * P_rows)

        # weight 1: the routing weights are applied once, at the source, in float32
        out_RD, _ = local_fn(recv_RD, recv_R[:, None], jnp.ones((X * P_rows, 1), jnp.float32),
                             w1_LDF, w3_LDF, w2_LFD)

        back_XPD = jax.lax.all_to_all(out_RD.reshape(X, P_rows, D), ex_axes, 0, 0, tiled=True)
        out_sorted_mD = back_XPD.at[dest_m, slot_m].get(mode="fill", fill_value=0,
                                                         unique_indices=True)
        y_nD = _combine(out_sorted_mD, order_m, inverse_m, weight_nK, x_nD.dtype)
        dropped = jax.lax.psum(jnp.sum(overflow_m).astype(jnp.int32), plan.token_axes)
        return y_nD, dropped

    tok = P(plan.token_axes, None)
    w = P(plan.expert_axes, None, None)
    fn = jax.shard_map(per_device, mesh=plan.mesh, in_specs=(tok, tok, tok, w, w, w),
                       out_specs=(tok, P()))
    y_ND, dropped = fn(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD)
    return y_ND[:N], dropped
