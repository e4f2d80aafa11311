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

moe_exchange="ragged" (opt-in; the default is the padded exchange above) sends only the routed
rows, with `jax.lax.ragged_all_to_all`: each device's m = n*K sorted rows go out as one ragged
array (its per-destination counts and offsets exchanged first by three [X] all_to_alls), arrive
packed at the front of the receiver's [X*P, D] buffer (still the static worst case: what may
arrive), and come back the same way. Traffic is the routed rows (on 4 x 8 for Mixtral-8x22B
about 1/4 of the padded exchange's 126 GiB per device per step), and the send side holds [m, D]
instead of [X, P, D]. XLA:CPU cannot run the primitive, so on CPU the same offsets drive
`emulated_ragged_all_to_all` (the primitive's documented semantics on padded all_to_alls),
which the tests check against the documentation's example and the padded exchange; on GPUs it is
unmeasured, and `check_exchange` compares it with the padded exchange on the real mesh before a
run relies on it (the trainer does).

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
import numpy as np
from jax.sharding import PartitionSpec as P

from zephyr_jax.config import MOE_EXCHANGES
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
                    w1_EDF, w3_EDF, w2_EFD, capacity_factor: float | None = None,
                    exchange: str = "padded"):
    """Expert-parallel dispatch over `plan`'s mesh for moe_impl `impl`, exchanging tokens the
    `exchange` way ("padded" or "ragged"; "capacity" always pads: its blocks are the cap)."""
    if impl not in LOCAL_IMPLS:
        raise ValueError(f"moe_impl={impl!r} has no expert-parallel path; have {sorted(LOCAL_IMPLS)}")
    if exchange not in MOE_EXCHANGES:
        raise ValueError(f"moe_exchange={exchange!r}: must be one of {MOE_EXCHANGES}")
    ragged = exchange == "ragged" and impl != "capacity"
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

    def by_expert(expert_nK):
        """(order_m, inverse_m, sorted_m): the n*K assignments sorted by expert, hence by
        destination device."""
        flat_m = expert_nK.reshape(-1)
        order_m = jnp.argsort(flat_m, stable=True)
        return order_m, inverse_permutation(order_m), flat_m[order_m]

    def per_device_ragged(x_nD, expert_nK, weight_nK, w1_LDF, w3_LDF, w2_LFD):
        m, D = n * K, x_nD.shape[-1]
        R = X * P_rows  # what may arrive: every sender's worst case
        order_m, inverse_m, sorted_m = by_expert(expert_nK)
        send_X = jnp.bincount(sorted_m // E_loc, length=X).astype(jnp.int32)
        start_X = jnp.cumsum(send_X) - send_X  # where each destination's rows start here
        recv_X = jax.lax.all_to_all(send_X, ex_axes, 0, 0, tiled=True)  # from each sender
        recv_start_X = jnp.cumsum(recv_X) - recv_X  # where each sender's rows land here
        # where this device's rows land on each receiver, and (for the way back) where each
        # sender's rows started in its own buffer
        land_X = jax.lax.all_to_all(recv_start_X, ex_axes, 0, 0, tiled=True)
        home_X = jax.lax.all_to_all(start_X, ex_axes, 0, 0, tiled=True)
        a2a = ragged_all_to_all_fn()

        rows_mD = take_rows(K, x_nD, order_m, inverse_m)
        recv_RD = a2a(rows_mD, jnp.zeros_like(rows_mD, shape=(R, D)), start_X, send_X, land_X,
                      recv_X, ex_axes)
        ids_m1 = (sorted_m % E_loc).astype(jnp.int32)[:, None]
        recv_R = a2a(ids_m1, jnp.full_like(ids_m1, E_loc, shape=(R, 1)), start_X, send_X,
                     land_X, recv_X, ex_axes)[:, 0]  # unfilled rows: "no expert"

        out_RD, _ = local_fn(recv_RD, recv_R[:, None], jnp.ones((R, 1), jnp.float32),
                             w1_LDF, w3_LDF, w2_LFD)
        out_sorted_mD = a2a(out_RD, jnp.zeros_like(out_RD, shape=(m, D)), recv_start_X, recv_X,
                            home_X, send_X, ex_axes)
        y_nD = _combine(out_sorted_mD, order_m, inverse_m, weight_nK, x_nD.dtype)
        return y_nD, jnp.zeros((), jnp.int32)

    def per_device(x_nD, expert_nK, weight_nK, w1_LDF, w3_LDF, w2_LFD):
        m, D = n * K, x_nD.shape[-1]
        order_m, inverse_m, sorted_m = by_expert(expert_nK)
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
    fn = jax.shard_map(per_device_ragged if ragged else per_device, mesh=plan.mesh,
                       in_specs=(tok, tok, tok, w, w, w), out_specs=(tok, P()))
    y_ND, dropped = fn(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD)
    return y_ND[:N], dropped


def ragged_all_to_all_fn():
    """`jax.lax.ragged_all_to_all`, or on CPU (XLA:CPU cannot run it) its emulation. Read at
    trace time, like the other platform choices (`jax.default_backend()`)."""
    if jax.default_backend() == "cpu":
        return emulated_ragged_all_to_all
    return _ragged_all_to_all


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                       axis_name):
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, axis_name):
    """What `jax.lax.ragged_all_to_all` computes (its docstring's pseudocode, one slice per
    device), on a padded `all_to_all`: slice j (`send_sizes[j]` rows of `operand` from
    `input_offsets[j]`) goes to device j, which writes it into its `output` at the offset this
    device's `output_offsets[j]` names; received rows past `recv_sizes` are not written.
    Differentiable (gathers, a scatter and all_to_alls). Sends operand-sized blocks: for tests
    and CPU runs, not for speed."""
    X = send_sizes.shape[0]
    m = operand.shape[0]
    r = jnp.arange(m, dtype=jnp.int32)
    rows_Xm = input_offsets[:, None] + r  # slice j's rows, padded to m
    sent_Xm = r < send_sizes[:, None]
    blocks = jnp.take(operand, jnp.where(sent_Xm, rows_Xm, 0), axis=0)
    blocks = jnp.where(sent_Xm.reshape(X, m, *([1] * (operand.ndim - 1))), blocks, 0)
    got = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # block i: from sender i
    at_X = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    M = output.shape[0]
    # rows past recv_sizes go to distinct out-of-bounds slots (dropped by the scatter), so its
    # indices are unique: the slices of a correct call do not overlap
    dest_Xm = jnp.where(r < recv_sizes[:, None], at_X[:, None] + r,
                        M + r + m * jnp.arange(X, dtype=jnp.int32)[:, None])
    return output.at[dest_Xm.reshape(X * m)].set(got.reshape(X * m, *operand.shape[1:]),
                                                 mode="drop", unique_indices=True)


def check_exchange(mesh, rules=None, *, tol: float = 1e-5) -> float | None:
    """Compare the ragged exchange with the padded one on `mesh` and raise if they differ.

    `jax.lax.ragged_all_to_all` has run in no test of this project on a GPU (XLA:CPU cannot run
    it; the tests check its CPU emulation), so a run with moe_exchange "ragged" first checks it on
    its own devices: a small float32 expert layer (two experts per expert device, top-2) on
    random routing and on routing that sends every token to one device's experts (the buffers'
    worst case), output and input gradient, against the padded exchange. Inputs are made and
    errors reduced inside one jitted function, so every process of a multi-host mesh runs it
    as is. Returns the largest relative error (None where the mesh does not split the experts:
    no exchange runs); raises RuntimeError above `tol`.
    """
    from jax.sharding import NamedSharding

    from zephyr_jax import sharding
    from zephyr_jax.model.dispatch import get_dispatch

    rules = sharding.DEFAULT_RULES if rules is None else rules
    with sharding.use_mesh(mesh, rules):
        plan = sharding.expert_parallel_plan()
        if plan is None:
            return None
        X, shards = plan.expert_size, plan.token_shards
    E, K, D, F, N = 2 * X, 2, 8, 16, 8 * shards
    routings = ("random", "one device")

    def errors():  # [routing, (output, input gradient)] relative errors
        ks = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(ks[0], (N, D))
        w1, w3 = (jax.random.normal(k, (E, D, F)) * 0.3 for k in ks[1:3])
        w2 = jax.random.normal(ks[3], (E, F, D)) * 0.3
        weight = jax.nn.softmax(jax.random.normal(ks[4], (N, K)), -1)
        experts = (jnp.argsort(jax.random.uniform(ks[5], (N, E)), -1)[:, :K],
                   jnp.tile(jnp.array([[E - 1, E - 2]]), (N, 1)))

        def out_and_grad(exchange, expert):
            fn = get_dispatch("dense", exchange)

            def loss(x):
                y, _ = fn(x, expert, weight, w1, w3, w2)
                return jnp.sum(jnp.sin(y)), y

            (_, y), dx = jax.value_and_grad(loss, has_aux=True)(x)
            return y, dx

        rows = []
        for expert in experts:
            got, want = out_and_grad("ragged", expert), out_and_grad("padded", expert)
            rows.append([jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))
                         for a, b in zip(got, want, strict=True)])
        return jnp.array(rows)

    with sharding.use_mesh(mesh, rules):
        errs = jax.jit(errors, out_shardings=NamedSharding(mesh, P()))()
    errs = np.asarray(errs)  # replicated: every process holds it whole
    r, what = np.unravel_index(np.argmax(errs), errs.shape)
    worst = float(errs[r, what])
    if not worst <= tol:
        raise RuntimeError(
            f"moe_exchange 'ragged' disagrees with the padded exchange on this mesh "
            f"({dict(mesh.shape)}): relative error {worst:.3g} > {tol:g} "
            f"({('output', 'input gradient')[what]}, {routings[r]} routing); "
            "use moe_exchange: padded")
    return worst
