"""Subprocess body for the slow full-size test: Mixtral-8x22B value_and_grad on 32 simulated CPU
devices (mesh 4x8, default rules, expert-parallel MoE), lowered and compiled from abstract
shapes only -- no weights are allocated.

    python tests/sharding_fullsize_main.py [--layers 56] [--batch 64] [--seq 2048]

Prints one JSON line prefixed `RESULT ` with XLA's per-device memory analysis (on CPU; GPU
buffers differ, e.g. CPU computes bf16 dots in f32) and the all-to-all count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=56)
    ap.add_argument("--batch", type=int, default=64, help="32 chosen/rejected pairs")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--moe-impl", default="ragged")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=32")
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zephyr_jax import Mixtral, MixtralConfig
    from zephyr_jax import sharding as zs

    t0 = time.perf_counter()
    cfg = MixtralConfig.preset("mixtral-8x22b", num_hidden_layers=args.layers,
                               moe_impl=args.moe_impl)
    mesh = zs.make_mesh(zs.parse_mesh("4x8"))
    zs.validate(mesh, cfg, args.batch)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0))))
    shardings = zs.param_shardings(state, mesh)
    batch = zs.batch_sharding(mesh)

    def loss(state, ids):
        h_BTD, stats, _ = nnx.merge(graphdef, state).backbone(ids)
        return jnp.mean(jnp.square(h_BTD.astype(jnp.float32))) + stats.dropped

    with zs.use_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch),
                       out_shardings=(None, shardings))
        lowered = step.lower(state, jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32,
                                                         sharding=batch))
        t_lower = time.perf_counter() - t0
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    print("RESULT " + json.dumps({
        "layers": args.layers, "batch": [args.batch, args.seq],
        "param_bytes_total": cfg.num_params * 2,
        "argument_bytes_per_device": mem.argument_size_in_bytes,
        "output_bytes_per_device": mem.output_size_in_bytes,
        "temp_bytes_per_device": mem.temp_size_in_bytes,
        "all_to_all_in_lowered": lowered.as_text().count("all_to_all"),
        "seconds": {"lower": round(t_lower, 1), "total": round(time.perf_counter() - t0, 1)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
