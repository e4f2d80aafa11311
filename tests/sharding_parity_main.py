"""Subprocess body for tests/test_sharding_multidevice.py: sharded vs single-device Mixtral.

XLA's simulated CPU device count is fixed when jax is imported, so each device count runs in
its own process:

    python tests/sharding_parity_main.py --devices 8 --mesh 2x4 --impls ragged,dense

For each MoE implementation it computes loss and gradients of a tiny 8-expert model once on one
device (no mesh: the local dispatch) and once sharded on the mesh under `use_mesh` (the
expert-parallel dispatch), and prints one JSON line prefixed `RESULT ` with the errors and the
sharding facts the test asserts on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--impls", default="ragged")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--unrolled", action="store_true", help="scan_layers false")
    ap.add_argument("--ragged-exchange", action="store_true",
                    help="also check the dispatch with moe_exchange 'ragged'")
    args = ap.parse_args(argv)

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    # fp32 parity needs full-precision matmuls on both sides
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from zephyr_jax import Mixtral, MixtralConfig
    from zephyr_jax import sharding as zs

    assert jax.device_count() == args.devices, jax.devices()
    mesh = zs.make_mesh(zs.parse_mesh(args.mesh))
    n_batch = np.prod([mesh.shape[a] for a in zs.batch_axes(mesh)])
    B, T = int(n_batch), args.seq  # one sequence per device: the recipe's per-device batch 1

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(B, T))
    labels = rng.integers(0, 128, size=(B, T))
    mask = np.ones((B, T), bool)
    mask[::3, T - 3:] = False  # some right padding, so masked reductions are exercised

    def loss_fn(model, ids, labels, mask):
        logits, stats = model(ids, mask, return_stats=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
        ce = jnp.sum(nll * mask) / jnp.sum(mask)
        return ce + 0.01 * stats.aux_loss, stats.dropped

    result = {"devices": jax.device_count(), "mesh": dict(mesh.shape), "batch": [B, T], "impls": {}}
    for impl in args.impls.split(","):
        cfg = MixtralConfig.preset("tiny", num_local_experts=8, num_experts_per_tok=2,
                                   moe_impl=impl, remat=args.remat,
                                   scan_layers=not args.unrolled)
        zs.validate(mesh, cfg, global_batch=B)
        model = Mixtral(cfg, rngs=nnx.Rngs(0))
        if "init_sharded" not in result:  # built directly on the mesh: same draws, same layout
            built = zs.init_sharded(lambda cfg=cfg: Mixtral(cfg, rngs=nnx.Rngs(0)), mesh)
            w1 = built.layers["w1"][...]
            result["init_sharded"] = {
                "spec": [list(a) if isinstance(a, tuple) else a for a in w1.sharding.spec],
                "max_abs_diff": float(np.max(np.abs(np.asarray(w1)
                                                    - np.asarray(model.layers["w1"][...])))),
            }
        step = nnx.value_and_grad(loss_fn, has_aux=True)

        t0 = time.perf_counter()
        (ref_loss, _), ref_grads = jax.jit(step)(model, ids, labels, mask)
        ref_grads = jax.device_get(nnx.state(ref_grads))
        t_ref = time.perf_counter() - t0

        zs.shard_model(model, mesh, zs.DEFAULT_RULES)
        bs = zs.batch_sharding(mesh)
        batch = [jax.device_put(a, bs) for a in (ids, labels, mask)]
        with zs.use_mesh(mesh, zs.DEFAULT_RULES):
            t0 = time.perf_counter()
            lowered = jax.jit(step).lower(model, *batch)
            compiled = lowered.compile()  # once: run, and read, the same executable
            (loss, dropped), grads = compiled(model, *batch)
            jax.block_until_ready(grads)
            t_sharded = time.perf_counter() - t0
            lowered_text, compiled_text = lowered.as_text(), compiled.as_text()

        grad_err = {}
        for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(grads)),
                                     jax.tree_util.tree_leaves_with_path(ref_grads), strict=True):
            g, r = np.asarray(g), np.asarray(r)
            grad_err[jax.tree_util.keystr(path)] = float(np.max(np.abs(g - r)) / np.max(np.abs(r)))

        experts = {}
        for name in ("w1", "w2", "w3"):
            arr = model.layers[name][...]
            shards = arr.addressable_shards
            experts[name] = {
                "spec": [list(s) if isinstance(s, tuple) else s for s in arr.sharding.spec],
                "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
                # which experts each device holds: the [start, stop) of dim 1 of its shard
                "expert_ranges": sorted({(s.index[1].start or 0,
                                          s.index[1].stop or arr.shape[1]) for s in shards}),
                "global_shape": list(arr.shape),
            }
        result["impls"][impl] = {
            "loss": float(loss), "ref_loss": float(ref_loss),
            "loss_rel_err": float(abs(loss - ref_loss) / abs(ref_loss)),
            "grad_rel_err": grad_err, "dropped": int(dropped),
            "all_to_all_in_lowered": lowered_text.count("all_to_all"),
            "shard_map_in_lowered": "shard_map" in lowered_text or "sdy.manual_computation"
                                    in lowered_text,
            "experts": experts,
            # result shapes of the compiled step's all-gathers (e.g. "f32[64,8]")
            "all_gathers": sorted(set(re.findall(
                r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", compiled_text))),
            "seconds": {"reference": round(t_ref, 2), "sharded_compile_and_run": round(t_sharded, 2)},
        }
    result["dispatch"] = _dispatch_checks(mesh, args.impls.split(","), args.ragged_exchange)
    result["emulated_ragged_all_to_all_example"] = _emulated_ragged_all_to_all_example()
    if args.ragged_exchange:
        result["check_exchange"] = _check_exchange_catches_a_bad_exchange(mesh)
    print("RESULT " + json.dumps(result))
    return 0


def _dispatch_checks(mesh, impls, with_ragged_exchange: bool):
    """The dispatch alone, expert-parallel vs the local dense oracle, on routings that stress the
    static buffers: every token to the same two experts (the worst case the buffers are sized
    for), to the last device, and random routing. Also moe_impl="capacity" (capacity_factor 1),
    against the dense oracle with exactly the assignments it must drop zero-weighted.
    Returns {routing/impl: [y rel err, max grad rel err, dropped, expected dropped]}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from zephyr_jax import sharding as zs
    from zephyr_jax.model import dispatch
    from zephyr_jax.model.expert_parallel import exchange_rows

    dispatch_impls = sorted({*impls, "dense", "ragged", "scan", "auto"})

    E, K, D, F = 8, 2, 16, 24
    shards = int(np.prod([mesh.shape[a] for a in zs.batch_axes(mesh)]))
    X = mesh.shape["expert"]
    N, n = 4 * shards, 4
    ks = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(ks[0], (N, D))
    w1 = jax.random.normal(ks[1], (E, D, F)) * 0.3
    w3 = jax.random.normal(ks[2], (E, D, F)) * 0.3
    w2 = jax.random.normal(ks[3], (E, F, D)) * 0.3
    weight = jax.nn.softmax(jax.random.normal(ks[4], (N, K)), -1)
    routings = {
        "all_to_experts_0_1": jnp.tile(jnp.array([[0, 1]]), (N, 1)),
        "all_to_last_device": jnp.tile(jnp.array([[E - 1, E - 2]]), (N, 1)),
        "random": jnp.argsort(jax.random.uniform(ks[5], (N, E)), -1)[:, :K],
    }

    def capacity_kept(expert_NK, P):
        """Which assignments the capacity exchange keeps: per sending device (n consecutive
        tokens), the first P of each destination in stable expert order."""
        e = np.asarray(expert_NK).reshape(shards, n * K)
        kept = np.zeros_like(e, bool)
        for s_ in range(shards):
            order = np.argsort(e[s_], kind="stable")
            dest = e[s_][order] // (E // X)
            rank = np.arange(n * K) - np.searchsorted(dest, dest, side="left")
            kept[s_, order] = rank < P
        return kept.reshape(N, K)

    def loss(fn, cf, x, weight, w1, w3, w2, expert):
        y, dropped = fn(x, expert, weight, w1, w3, w2, cf)
        return jnp.sum(jnp.sin(y)), (y, dropped)

    grad = jax.value_and_grad(loss, argnums=(2, 3, 4, 5, 6), has_aux=True)
    # one jitted function per implementation: the routings share its compilation
    steps = {"oracle": jax.jit(functools.partial(grad, dispatch.dense, None))}
    steps.update({impl: jax.jit(functools.partial(grad, dispatch.get_dispatch(impl), 1.0))
                  for impl in [*dispatch_impls, "capacity"]})
    # the GPUs' backward pass of the token permutations (a gather through the inverse), run here
    gathered = jax.jit(functools.partial(grad, dispatch.get_dispatch("ragged"), 1.0))

    def ragged_gather_backward(*args):
        saved = dispatch.GATHER_BACKWARD
        dispatch.GATHER_BACKWARD = {"cpu": True}  # read when the first call traces
        try:
            return gathered(*args)
        finally:
            dispatch.GATHER_BACKWARD = saved

    steps["ragged_gather_backward"] = ragged_gather_backward
    # moe_exchange "ragged" (ragged_all_to_all, emulated on CPU) around three local impls
    ragged_exchange = [f"{impl}/ragged_exchange" for impl in ("dense", "ragged", "scan")
                       if with_ragged_exchange]
    steps.update({name: jax.jit(functools.partial(
        grad, dispatch.get_dispatch(name.split("/")[0], "ragged"), 1.0)) for name in ragged_exchange})
    P_cap = exchange_rows(n, K, E // X, X, "capacity", 1.0)
    out = {}
    for rname, expert in routings.items():
        for impl in [*dispatch_impls, "capacity", "ragged_gather_backward", *ragged_exchange]:
            w_ref = weight
            if impl == "capacity":
                kept = capacity_kept(expert, P_cap)
                w_ref = jnp.where(kept, weight, 0.0)
            (_, (ref_y, _)), ref_g = steps["oracle"](x, w_ref, w1, w3, w2, expert)
            with zs.use_mesh(mesh):
                (_, (y, dropped)), g = steps[impl](x, weight, w1, w3, w2, expert)
            if impl == "capacity":  # a dropped assignment's weight has no effect (the oracle's has)
                ref_g = (ref_g[0], jnp.where(kept, ref_g[1], 0.0), *ref_g[2:])
            g_err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                        for a, b in zip(g, ref_g, strict=True))
            y_err = float(jnp.max(jnp.abs(y - ref_y)) / jnp.max(jnp.abs(ref_y)))
            want_dropped = int(np.sum(~kept)) if impl == "capacity" else 0
            out[f"{rname}/{impl}"] = [y_err, g_err, int(dropped), want_dropped]
    # a token count that the token shards do not divide (a decode step): padded inside
    odd = slice(0, N - 3)
    args = (x[odd], weight[odd], w1, w3, w2, routings["random"][odd])
    (_, (ref_y, _)), ref_g = steps["oracle"](*args)
    for impl in ["ragged"] + (["ragged/ragged_exchange"] if with_ragged_exchange else []):
        with zs.use_mesh(mesh):
            (_, (y, dropped)), g = steps[impl](*args)
        g_err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(g, ref_g, strict=True))
        y_err = float(jnp.max(jnp.abs(y - ref_y)) / jnp.max(jnp.abs(ref_y)))
        out[f"random_N_not_divisible/{impl}"] = [y_err, g_err, int(dropped), 0]
    return out


def _check_exchange_catches_a_bad_exchange(mesh):
    """`check_exchange` on this mesh: its error with the exchange as it is, and its message with
    the outbound trips' receive sizes one short (the last row from each sender not written: a
    wrong exchange it must refuse)."""
    from zephyr_jax.model import expert_parallel as ep

    good = ep.check_exchange(mesh)
    emulated = ep.emulated_ragged_all_to_all

    def off_by_one(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis):
        return emulated(operand, output, input_offsets, send_sizes, output_offsets,
                        recv_sizes - (operand.shape[0] < output.shape[0]), axis)

    ep.emulated_ragged_all_to_all = off_by_one
    try:
        ep.check_exchange(mesh)
        caught = None
    except RuntimeError as e:
        caught = str(e)
    finally:
        ep.emulated_ragged_all_to_all = emulated
    return {"error": good, "caught": caught}


def _emulated_ragged_all_to_all_example():
    """The example of `jax.lax.ragged_all_to_all`'s docstring (axis of size 2) through our CPU
    emulation of it: returns each device's result (the docstring says [1, 3, 0, 0], [2, 2, 4, 0])."""
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from zephyr_jax.model.expert_parallel import emulated_ragged_all_to_all

    per_device = {  # argument: (axis index 0's, axis index 1's)
        "operand": ([1, 2, 2], [3, 4, 0]), "output": ([0, 0, 0, 0], [0, 0, 0, 0]),
        "input_offsets": ([0, 1], [0, 1]), "send_sizes": ([1, 2], [1, 1]),
        "output_offsets": ([0, 0], [1, 2]), "recv_sizes": ([1, 1], [2, 1]),
    }
    args = [np.array(v, np.int32) for v in per_device.values()]
    fn = jax.shard_map(lambda *a: emulated_ragged_all_to_all(*(x[0] for x in a), "x")[None],
                       mesh=Mesh(np.array(jax.devices()[:2]), ("x",)),
                       in_specs=(P("x"),) * len(args), out_specs=P("x"))
    return np.asarray(fn(*args)).tolist()


if __name__ == "__main__":
    sys.exit(main())
