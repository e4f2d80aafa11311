"""Subprocess body of tests/test_generate_mesh.py: generation on 8 simulated CPU devices, with the
model loaded onto a mesh by `from_pretrained(path, mesh=...)` and no mesh set by the caller.

    python tests/generate_mesh_main.py SPEC.json

SPEC: {"prompts", "max_new_tokens", "seed", "runs": [{"folder", "meshes", "param_dtype",
"dtype"}, ...]}. For each run and mesh prints one line `RESULT {json}` (with the run's folder): greedy tokens of the batch, streamed greedy tokens of the
first prompt alone, seeded sampled tokens, the parameters' and KV cache's partition specs, the
parameter dtype, and whether the compiled decode step exchanges tokens between devices
(all-to-all: the MoE ran expert-parallel).
"""

from __future__ import annotations

import json
import sys


def _spec(x) -> list:
    """A partition spec as JSON: one entry per dim, a mesh axis name, a list of them, or None."""
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def main(argv=None) -> int:
    spec = json.load(open((argv or sys.argv[1:])[0]))
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)

    import zephyr_jax
    from zephyr_jax import generation as gen

    prompts, n = spec["prompts"], spec["max_new_tokens"]
    for run, mesh in [(r, m) for r in spec["runs"] for m in r["meshes"]]:
        model = zephyr_jax.from_pretrained(run["folder"], mesh=mesh,
                                           param_dtype=run["param_dtype"], dtype=run["dtype"],
                                           moe_exchange=run.get("moe_exchange", "padded"))
        w1 = model.layers["w1"].value
        greedy = gen.generate_ids(model, prompts, n, temperature=0.0)
        streamed = [col[0] for col in gen.stream_ids(model, prompts[:1], n, temperature=0.0)]
        sampled = gen.generate_ids(model, prompts, n, temperature=0.8, seed=spec["seed"])
        graphdef, state, ds, sampling, eos, pad = gen._start(
            model, prompts, n, 0.0, None, None, 0, None, 0, gen.DEFAULT_LENGTH_BUCKET)
        _, _, ds1, *_ = gen._start(model, prompts[:1], n, 0.0, None, None, 0, None, 0,
                                   gen.DEFAULT_LENGTH_BUCKET)
        with gen._on_model_mesh(state):
            step_hlo = gen._decode_step.lower(graphdef, state, ds, sampling, eos, pad).as_text()
        print("RESULT " + json.dumps({
            "folder": run["folder"], "mesh": mesh, "exchange": model.config.moe_exchange,
            "greedy": greedy, "streamed": streamed, "sampled": sampled,
            "param_dtype": str(w1.dtype), "w1_spec": _spec(w1),
            "w1_shard_shape": list(w1.addressable_shards[0].data.shape),
            "cache_spec": _spec(ds.cache.k_LBSKH), "cache_spec_batch1": _spec(ds1.cache.k_LBSKH),
            "cache_dtype": str(ds.cache.k_LBSKH.dtype),
            "decode_all_to_all": "all_to_all" in step_hlo}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
