"""Subprocess body of tests/test_mesh_restore.py: restore a trainer checkpoint onto a mesh of
another shape, with the trainer's own shardings and `TrainCheckpointer.restore`.

    python tests/mesh_restore_main.py OUTPUT_DIR --devices 4 --mesh "{data: 1, expert: 4}" \
        [--mesh "{data: 4}"] -- [train config overrides of the saved run]

For each --mesh: builds the TrainState shardings exactly as `trainer.train` does on that mesh,
restores the latest checkpoint onto them, and compares every leaf bitwise with (a) the stored
arrays read back as plain numpy (no sharding involved) and (b) for params, the HF export the run
wrote from its in-memory weights. Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("output_dir")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--mesh", action="append", required=True, help="YAML mapping of mesh axes")
    ap.add_argument("--config", default="configs/demo.yaml")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, overrides = ap.parse_args(argv[:cut]), argv[cut + 1:]

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)

    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from zephyr_jax import trainer
    from zephyr_jax.hf_io.load import load_hf_params
    from zephyr_jax.model import Mixtral, params_dict
    from zephyr_jax.train_checkpoint import TrainCheckpointer
    from zephyr_jax.train_config import load_train_config

    ckpt = TrainCheckpointer(args.output_dir)
    step = ckpt.latest_step()
    step_dir = os.path.join(ckpt.directory, str(step))

    def stored(item: str):
        """The checkpoint's arrays as numpy, read without any sharding."""
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, item))
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, item),
                                                restore_args=restore_args)

    raw = {"params": stored("params"), "opt_state": stored("opt_state")}
    _, exported = load_hf_params(os.path.join(args.output_dir, "hf"))

    results = {"step": step, "devices": jax.device_count(), "meshes": []}
    for mesh_yaml in args.mesh:
        cfg = load_train_config(args.config, [*overrides, "--mesh", mesh_yaml])
        model_cfg = cfg.model_config()
        global_batch = cfg.per_device_train_batch_size * jax.device_count()
        mesh, rules, p_shard = trainer.mesh_and_shardings(cfg, model_cfg, global_batch)
        schedule, tx = trainer.make_tx(cfg, 10)
        abstract_params = params_dict(nnx.eval_shape(
            lambda c=model_cfg: Mixtral(c, rngs=nnx.Rngs(0))))
        abstract_state, s_shard, _, _ = trainer.sharded_steps(
            cfg, model_cfg, abstract_params, tx, schedule, mesh, p_shard)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, s_shard)
        state, meta = ckpt.restore(target)

        def same(restored, reference) -> bool:
            return bool(np.array_equal(np.asarray(restored), np.asarray(reference)))

        def flat(tree):  # "1/0/mu/layers/w1" for a namedtuple field, a dict key or a list index
            def name(k):
                return str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))

            return {"/".join(name(k) for k in p): v
                    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

        params, opt = flat(state.params), flat(state.opt_state)
        raw_params, raw_opt = flat(raw["params"]), flat(raw["opt_state"])
        exp = flat(exported)
        w1 = state.params["layers"]["w1"]
        results["meshes"].append({
            "mesh": dict(mesh.shape),
            "restored_step": int(state.step), "meta_step": meta["step"],
            "params_equal_stored": {k: same(v, raw_params[k]) for k, v in params.items()},
            "params_equal_export": {k: same(v, exp[k]) for k, v in params.items()},
            "opt_state_equal_stored": {k: same(v, raw_opt[k]) for k, v in opt.items()
                                       if hasattr(v, "shape")},
            "opt_leaves": len(opt), "raw_opt_leaves": len(raw_opt),
            "w1_spec": [a if a is None or isinstance(a, str) else list(a) for a in w1.sharding.spec],
            "w1_devices": len(w1.sharding.device_set),
            "w1_shard_shape": list(w1.sharding.shard_shape(w1.shape)),
            "params_dtype": sorted({str(v.dtype) for v in params.values()}),
        })
        del state
    ckpt.close()
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
