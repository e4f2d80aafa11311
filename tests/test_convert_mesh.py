"""Loading a model checkpoint onto a mesh: each parameter restored straight onto its devices.

Runs in a subprocess so XLA_FLAGS can give it 4 simulated CPU devices before jax starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from zephyr_jax import model_checkpoint as mc
    from zephyr_jax.config import MixtralConfig

    assert len(jax.devices()) == 4, jax.devices()
    root = sys.argv[1]
    cfg = MixtralConfig.preset("tiny")  # 4 experts
    shapes = mc.param_shapes(cfg)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    # one checkpoint written whole (save_model_checkpoint), one streamed (what hf-to-jax writes)
    mc.save_model_checkpoint(f"{root}/whole", cfg, mc.unflatten(flat))
    with mc.staged_dir(f"{root}/streamed") as tmp:
        mc.write_config(tmp, cfg)
        mc.write_params_stream(
            os.path.join(tmp, mc.PARAMS_ITEM), cfg, {k: np.float32 for k in shapes},
            lambda layer, keys: {k: flat[k] if layer is None else flat[k][layer] for k in keys})

    mesh = Mesh(np.array(jax.devices()), ("expert",))
    expert_axis = {"layers/w1": P(None, "expert"), "layers/w3": P(None, "expert"),
                   "layers/w2": P(None, "expert"), "layers/router": P(None, None, "expert")}
    shardings = {k: NamedSharding(mesh, expert_axis.get(k, P())) for k in shapes}
    for name in ("whole", "streamed"):
        for dtype in (None, "bfloat16"):
            got_cfg, params = mc.load_model_checkpoint(f"{root}/{name}", mc.unflatten(shardings), dtype)
            assert got_cfg.param_dtype == (dtype or "float32"), got_cfg.param_dtype
            got = mc.flatten(params)
            assert sorted(got) == sorted(shapes)
            for k, x in got.items():
                assert x.sharding == shardings[k], (k, x.sharding)
                want = flat[k] if dtype is None else flat[k].astype(x.dtype)
                np.testing.assert_array_equal(np.asarray(x), want)
            w1 = got["layers/w1"]
            assert len(w1.addressable_shards) == 4
            for shard in w1.addressable_shards:  # each device holds one expert of every layer
                assert shard.data.shape == (2, 1, 32, 64), shard.data.shape
                e = shard.index[1].start
                np.testing.assert_array_equal(np.asarray(shard.data),
                                              flat["layers/w1"][:, e:e + 1].astype(shard.data.dtype))
    print("SHARDED-LOAD-OK")
""")


def test_load_onto_4_device_mesh(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "SHARDED-LOAD-OK" in r.stdout
