"""How long a training-checkpoint save holds the training loop, waited for vs in the background.

    python scripts/bench_checkpoint_save.py --gib 1

Saves a TrainState of about `--gib` GiB (float32 params plus one moment) with
`TrainCheckpointer(async_save=False)` and then `async_save=True`, each into a fresh temporary
folder, and prints per mode the seconds `save` blocked and the seconds `wait` then took (the
background write), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp

from zephyr_jax.train_checkpoint import TrainCheckpointer
from zephyr_jax.train_step import TrainState


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="state size (params + one moment)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    n = max(1, int(args.gib * 2**30 / 2 / (2048 * 2048 * 4)))  # [2048, 2048] float32 leaves
    params = {f"w{i}": jnp.full((2048, 2048), float(i)) for i in range(n)}
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state={"mu": params})
    jax.block_until_ready(state)
    out = {"state_gib": 2 * n * 2048 * 2048 * 4 / 2**30, "device": str(jax.devices()[0])}
    for async_save in (False, True):
        best = None
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                ckpt = TrainCheckpointer(d, async_save=async_save)
                t0 = time.perf_counter()
                ckpt.save(state, {"step": 1})
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                ckpt.close()
            run = (t1 - t0, t2 - t1)
            best = run if best is None or run[0] < best[0] else best
        out["async" if async_save else "waited"] = {"save_blocks_s": round(best[0], 3),
                                                    "then_wait_s": round(best[1], 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
