"""Peak memory of the streaming converter on a >= 2 GB random Mixtral, both directions.

    python scripts/bench_convert.py --workdir /tmp/bench_convert

Generates a sharded HF safetensors folder tensor by tensor (the generator never holds more than
one tensor), then runs `python -m zephyr_jax.convert hf-to-jax` and `jax-to-hf` as child processes
and reports each child's peak RSS (GNU time's maximum resident set size, file-backed pages included)
next to the model size. Target: peak RSS < 0.5 x model size. The exported folder is compared with the input
tensor by tensor; everything generated is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io import mapping
from zephyr_jax.hf_io.safetensors_io import PlannedTensor, ShardedWriter, parse_dtype
from zephyr_jax.model_checkpoint import write_config


def generate(folder: str, cfg: MixtralConfig, dtype: np.dtype, shard_size: str, seed: int = 0) -> int:
    """A random HF Mixtral (per-expert names), written tensor by tensor. Returns bytes on disk."""
    os.makedirs(folder)
    write_config(folder, cfg)
    plan = [PlannedTensor(n, s, dtype)
            for n, s in mapping.expected_tensors(cfg, mapping.DEFAULT_LAYOUT).items()]
    writer = ShardedWriter(folder, plan, shard_size)
    rng = np.random.default_rng(seed)
    for t in plan:
        x = rng.standard_normal(t.shape, dtype=np.float32)
        x *= 0.02
        writer.write(t.name, x.astype(dtype))
        del x
    writer.close()
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors"))


def run_child(argv: list[str], workdir: str) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, cpu seconds) of one child process.

    Measured by GNU time: rusage from `wait4` in this (big) process would not do, because Linux
    carries the parent's RSS high-water mark into a forked or spawned child's ru_maxrss.
    """
    out = os.path.join(workdir, "time.txt")
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", out, *argv])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {proc.returncode}")
    with open(out) as fh:
        kb, user, sys_s = fh.read().split()[-3:]
    return wall, int(kb) * 1024, float(user) + float(sys_s)


def compare(a_dir: str, b_dir: str) -> int:
    """Tensor-by-tensor bitwise comparison (one tensor in memory at a time). Returns count."""
    from zephyr_jax.hf_io.safetensors_io import SafetensorsReader

    with SafetensorsReader(a_dir) as a, SafetensorsReader(b_dir) as b:
        if sorted(a.tensors) != sorted(b.tensors):
            raise SystemExit("exported tensor names differ from the input's")
        for name in a.tensors:
            x, y = a.read(name), b.read(name)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                raise SystemExit(f"tensor {name!r} differs after the round trip")
        return len(a.tensors)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-size", default="1GB", help="input and output safetensors shard size")
    p.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = p.parse_args()

    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=args.hidden // 8,
                        num_local_experts=args.experts, param_dtype=args.dtype)
    dtype = parse_dtype(args.dtype)
    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; remove it or pass another --workdir")
    if not os.path.exists("/usr/bin/time"):
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")
    hf, ckpt, back = (os.path.join(args.workdir, n) for n in ("hf", "ckpt", "back"))
    try:
        t0 = time.perf_counter()
        size = generate(hf, cfg, dtype, args.shard_size)
        gen_s = time.perf_counter() - t0
        layer_bytes = sum(np.prod(s) for s in mapping.group_names(cfg, "per_expert", 0).values()) * dtype.itemsize
        py = sys.executable
        _, base_rss, _ = run_child([py, "-c", "import zephyr_jax.convert"], args.workdir)
        to_jax = run_child([py, "-m", "zephyr_jax.convert", "hf-to-jax", "--hf", hf, "--out", ckpt,
                            "--quiet"], args.workdir)
        to_hf = run_child([py, "-m", "zephyr_jax.convert", "jax-to-hf", "--ckpt", ckpt, "--out", back,
                           "--max-shard-size", args.shard_size, "--quiet"], args.workdir)
        n = compare(hf, back)
        gb = 1e9
        report = {
            "model": f"{cfg.num_params / 1e9:.2f}B params, {args.dtype}, {cfg.num_hidden_layers} layers "
                     f"x {cfg.num_local_experts} experts, {len(os.listdir(hf)) - 2} input shards",
            "model_size_GB": round(size / gb, 3),
            "one_layer_GB": round(layer_bytes / gb, 3),
            "orbax_checkpoint_GB": round(du(ckpt) / gb, 3),
            "import_only_peak_rss_GB": round(base_rss / gb, 3),
            "hf_to_jax": {"wall_s": round(to_jax[0], 1), "cpu_s": round(to_jax[2], 1),
                          "peak_rss_GB": round(to_jax[1] / gb, 3),
                          "peak_rss_over_model": round(to_jax[1] / size, 3)},
            "jax_to_hf": {"wall_s": round(to_hf[0], 1), "cpu_s": round(to_hf[2], 1),
                          "peak_rss_GB": round(to_hf[1] / gb, 3),
                          "peak_rss_over_model": round(to_hf[1] / size, 3)},
            "round_trip_bitwise_tensors": n,
            "generate_s": round(gen_s, 1),
            "target": "peak_rss_over_model < 0.5",
        }
        print(json.dumps(report, indent=2))
        if max(to_jax[1], to_hf[1]) >= 0.5 * size:
            raise SystemExit("peak RSS is not below half the model size")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
