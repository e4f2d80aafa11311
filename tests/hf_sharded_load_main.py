"""Subprocess body of tests/test_hf_sharded_load.py: one of two `jax.distributed` processes (2 CPU
devices each) loads a HF folder onto a 4-device mesh with `load_hf_sharded`.

    python tests/hf_sharded_load_main.py HF_DIR --port P --process-id I --mesh "{expert: 4}"

Prints one line `RESULT {json}`: which HF tensors this process read, the tracemalloc peak of the
sharded load and of the whole-model load (`load_hf_params`, the control) in bytes, and the
model's size. Before printing, every addressable shard is checked bitwise against the whole-model
load's slice (and its dtype against the requested one): a wrong block fails here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--mesh", required=True, help="YAML mapping of mesh axes")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2,
                               process_id=args.process_id)

    import numpy as np
    import yaml

    from zephyr_jax import model_checkpoint as mc
    from zephyr_jax import sharding as sh
    from zephyr_jax.config import MixtralConfig
    from zephyr_jax.hf_io.load import load_hf_params, load_hf_sharded
    from zephyr_jax.hf_io.streaming import HFSource

    cfg = MixtralConfig.from_hf(args.hf_dir)
    mesh = sh.make_mesh(sh.MeshConfig.from_dict(yaml.safe_load(args.mesh)))
    shardings = sh.params_dict_shardings(cfg, mesh)

    # Once unmeasured: the second load reuses the compiled reshards, whose tracing and compiling
    # allocate ~1 MB of Python objects, a constant that would swamp this tiny model's peak.
    load_hf_sharded(args.hf_dir, shardings, dtype=args.dtype)
    read: list[str] = []
    plain_read = HFSource.read

    def counting_read(self, name):
        read.append(name)
        return plain_read(self, name)

    HFSource.read = counting_read
    tracemalloc.start()
    _, params = load_hf_sharded(args.hf_dir, shardings, dtype=args.dtype)
    sharded_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    HFSource.read = plain_read

    tracemalloc.start()
    _, whole = load_hf_params(args.hf_dir)  # the control: what `load_params` did before
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    got, want, where = mc.flatten(params), mc.flatten(whole), mc.flatten(shardings)
    assert sorted(got) == sorted(want)
    shards = 0
    for k, x in got.items():
        assert x.sharding == where[k], (k, x.sharding, where[k])
        assert x.dtype == np.dtype(args.dtype or want[k].dtype), (k, x.dtype)
        assert len(x.addressable_shards) == 2, (k, x.addressable_shards)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          want[k][shard.index].astype(x.dtype), err_msg=k)
            shards += 1
    # The ragged expert exchange's pre-run check (emulated ragged_all_to_all on CPU) on a mesh
    # spanning both processes: each process makes the same inputs inside the jitted check.
    from zephyr_jax.model.expert_parallel import check_exchange

    exchange_err = check_exchange(mesh)
    print("RESULT " + json.dumps({
        "exchange_err": exchange_err,
        "process": jax.process_index(), "read": sorted(set(read)), "reads": len(read),
        "sharded_peak": sharded_peak, "whole_peak": whole_peak, "shards_checked": shards,
        "model_bytes": sum(v.nbytes for v in want.values())}), flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
