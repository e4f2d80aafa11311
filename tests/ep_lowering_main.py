"""Subprocess body for tests/test_sharding_multidevice.py: the expert-parallel MoE with the GPU
kernels (our Pallas/Triton `gmm`; tokamax's Mosaic kernels where installed), lowered for CUDA on a
simulated CPU mesh (tests/cuda_lowering.py says how; the kernels do not run here):

    python tests/ep_lowering_main.py --devices 8 --mesh 2x4 --impls pallas,tokamax,pallas/ragged

(IMPL/ragged: with moe_exchange "ragged", whose `ragged_all_to_all` is lowered for CUDA too.)

For each implementation: the gradient of a bf16 8-expert model under the mesh, remat
save_matmuls; prints one JSON line prefixed `RESULT ` with the kernel calls, all-to-alls and
whether a shard_map (manual computation) is in the program.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--impls", default="pallas")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_lowering import lower_for_cuda, pretend_h100

    from zephyr_jax import Mixtral, MixtralConfig
    from zephyr_jax import sharding as zs

    pretend_h100()
    mesh = zs.make_mesh(zs.parse_mesh(args.mesh))
    B, T = args.devices, 64
    result = {"mesh": dict(mesh.shape), "impls": {}}
    for variant in args.impls.split(","):
        impl, _, exchange = variant.partition("/")  # "pallas" or "pallas/ragged"
        cfg = MixtralConfig.preset("tiny", num_local_experts=8, num_experts_per_tok=2,
                                   hidden_size=128, intermediate_size=256, dtype="bfloat16",
                                   moe_impl=impl, moe_exchange=exchange or "padded",
                                   remat="save_matmuls")
        zs.validate(mesh, cfg, global_batch=B)
        model = Mixtral(cfg, rngs=nnx.Rngs(0))
        zs.shard_model(model, mesh, zs.DEFAULT_RULES)
        ids = jax.device_put(np.zeros((B, T), np.int32), zs.batch_sharding(mesh))

        def loss_fn(model, ids):
            return jnp.mean(model(ids).astype(jnp.float32) ** 2)

        with zs.use_mesh(mesh, zs.DEFAULT_RULES):
            text = lower_for_cuda(nnx.grad(loss_fn), model, ids)
        calls = re.findall(r"custom_call @([^(\s]+)\(", text)
        result["impls"][variant] = {
            "triton_calls": calls.count("__gpu$xla.gpu.triton"),
            "mosaic_calls": calls.count("mosaic_gpu_v2"),
            "all_to_all": len(re.findall(r"\ball_to_all\b", text)),
            "ragged_all_to_all": len(re.findall(r"\bragged_all_to_all\b", text)),
            "manual_computation": "sdy.manual_computation" in text or "shard_map" in text,
        }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
