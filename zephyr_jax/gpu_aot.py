"""Compile the bench's train step for an H100 or H200 on a machine without a GPU: XLA's memory plan.

    python -m zephyr_jax.gpu_aot --target h100 --moe-impl dense,tokamax,pallas --remat none,save_attention

jax's CUDA plugin compiles for a GPU described by XLA's target config (the device description a
local GPU would report) instead of a local device (deviceless ahead-of-time compilation). The
compiled step's `memory_analysis()` is then XLA's own buffer assignment for that GPU: whether a
variant fits before a GPU session is spent on it. Nothing runs and nothing is timed.

Needs jax's CUDA plugin and the NVIDIA libraries it loads (`pip install "jax[cuda13]"`; they load
without a GPU). jax is kept on its CPU backend (JAX_PLATFORMS=cpu) so that it does not try to open
a CUDA device. While lowering, jax, Pallas and tokamax ask the local GPU a few things (cuDNN's
version, the compute capability, the SM count); `pretend` answers them as a Hopper GPU would (tests use it to lower for CUDA here too).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import types
from dataclasses import dataclass

from zephyr_jax.hlo_text import ITEMSIZE

GiB = 2**30

# XLA's device description of each target (fields of stream_executor's GpuDeviceInfoProto), the
# values an H100 SXM / H200 SXM reports; cuDNN 9.19 and CUDA 13.0 as on the lent GPU machines.
_DEVICE_INFO = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 19
}}
runtime_version {{
  major: 13
}}
device_description_str: "{name}"
"""


@dataclass(frozen=True)
class Target:
    name: str  # what the device reports as its kind
    memory_bytes: int
    bandwidth_bytes_per_s: int
    peak_flops: float = 989e12  # dense bf16, SXM (bench.PEAK_FLOPS)

    def config(self) -> str:
        return _DEVICE_INFO.format(name=self.name, memory=self.memory_bytes,
                                   bandwidth=self.bandwidth_bytes_per_s)


TARGETS = {
    "h100": Target("NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000),
    "h200": Target("NVIDIA H200", 150_754_820_096, 4_800_000_000_000),
}
# jax's GPU allocator limit: 75% of the device's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise, with or without preallocation (jax's GPU memory documentation)
DEFAULT_MEM_FRACTION = 0.75


def pretend_cudnn(setattr_=setattr) -> None:
    """cuDNN's fused attention lowers after asking for cuDNN's version and the compute capability.
    `setattr_` (here and below) is `monkeypatch.setattr` in a test, plain `setattr` elsewhere."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    setattr_(cudnn_attention, "check_cudnn_version", lambda: 91900)
    setattr_(cudnn_attention, "check_compute_capability", lambda cc: True)
    setattr_(cudnn_attention, "is_cuda_compute_capability_equal", lambda cc: False)


def pretend_triton_target(setattr_=setattr) -> None:
    """Pallas' Triton lowering asks for the compute capability (jax >= 0.11; 0.10 lowers for a
    default target)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        return
    hopper = types.SimpleNamespace(compute_capability=90, arch_name="9.0", gpu_version=None)
    setattr_(gpu_info, "get_gpu_info", lambda: hopper)


def pretend(setattr_=setattr) -> None:
    """Answer what lowering asks the local GPU, as a Hopper GPU would: the two above; our own
    platform choices (moe_impl "auto", Pallas' Triton path instead of its interpreter, scan tile
    rows) read `jax.default_backend()`, made "gpu"; tokamax (where installed) asks for the compute
    capability and, for persistent kernels, the SM count."""
    import jax

    pretend_cudnn(setattr_)
    pretend_triton_target(setattr_)
    setattr_(jax, "default_backend", lambda: "gpu")
    if importlib.util.find_spec("tokamax") is not None:
        from tokamax._src import gpu_utils
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_kernel_sm90 as sm90

        setattr_(gpu_utils, "_compute_capability", lambda device=None: 9.0)
        device = types.SimpleNamespace(core_count=132)
        setattr_(sm90, "backend", types.SimpleNamespace(get_default_device=lambda: device))


def cuda_plugin_installed() -> bool:
    """jax's CUDA plugin (what compiling for a GPU without one needs) is importable here."""
    return importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def topology_devices(target: Target, n: int) -> list:
    """`n` compile-only devices of `target`: one host of up to 8, else hosts of 8 (the 4 x 8 H100
    cluster of the recipe is 4 hosts of 8)."""
    from jax.experimental import topologies

    shape = f"1x1x{n}" if n <= 8 else f"1x{n // 8}x8"
    if n > 8 and n % 8:
        raise SystemExit(f"gpu_aot: {n} GPUs do not make hosts of 8")
    try:
        return list(topologies.get_topology_desc(platform="cuda", target_config=target.config(),
                                                 topology=shape).devices)
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(
            f"gpu_aot: cannot compile for CUDA here ({e}); it needs jax's CUDA plugin "
            '(pip install "jax[cuda13]") and JAX_PLATFORMS=cpu') from e


def topology_mesh(target: Target):
    """A one-device mesh of `target` for compilation (no local GPU needed)."""
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(topology_devices(target, 1)), ("device",))


def abstract_bench_step(cfg, pairs: int, seq: int, sharding=None, chunk_size: int | None = None):
    """(jitted step, state, batch) of the bench's train step for `cfg` (`bench.build_step`'s
    program: the trainer's step and optimizer, state donated) on abstract inputs, placed by
    `sharding` if given: nothing of the model is allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zephyr_jax import bench
    from zephyr_jax.model import Mixtral, params_dict
    from zephyr_jax.train_step import create_train_state

    step, tx = bench.jitted_step(cfg, chunk_size=bench.CHUNK_SIZE if chunk_size is None else chunk_size)
    params = jax.eval_shape(lambda: params_dict(Mixtral(cfg, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                         state)
    batch = {k: jax.ShapeDtypeStruct((1, *v.shape), jnp.int32, sharding=sharding)
             for k, v in bench.make_batch(cfg.vocab_size, pairs, seq).items()}
    return step, state, batch


def compile_bench_step(cfg, target: Target, pairs: int, seq: int,
                       hlo_path: str | None = None, chunk_size: int | None = None) -> dict:
    """XLA's memory plan (bytes) for the bench's train step of `cfg` compiled for `target`;
    the compiled program's HLO text is written to `hlo_path` if given."""
    from jax.sharding import NamedSharding, PartitionSpec

    from zephyr_jax import bench, roofline

    mesh = topology_mesh(target)
    step, state, batch = abstract_bench_step(cfg, pairs, seq, NamedSharding(mesh, PartitionSpec()),
                                             chunk_size)
    compiled = step.trace(state, batch).lower().compile()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    hlo = compiled.as_text()
    if hlo_path:
        tmp = f"{hlo_path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(hlo)
        os.replace(tmp, hlo_path)
    largest, largest_bytes = largest_array(hlo)
    model_flops = bench.flops_per_token(cfg, seq) * 2 * pairs * seq
    bound = roofline.roofline(hlo, target.peak_flops, target.bandwidth_bytes_per_s)
    bound["model_flops"] = model_flops
    bound["mfu_bound"] = model_flops / (target.peak_flops * bound["seconds"])
    return {"roofline": bound, "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "total_bytes": total, "largest_array": largest, "largest_array_bytes": largest_bytes}


_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")


def hlo_arrays(hlo_text: str) -> dict[str, int]:
    """Every array type in a compiled program's HLO (parameters, fusion outputs and internals,
    loop carries) -> its bytes."""
    return {f"{dtype}[{dims}]": ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _ARRAY.findall(hlo_text)}


def largest_array(hlo_text: str) -> tuple[str, int]:
    """The largest array type in a compiled program and its bytes (with layers scanned, often a
    per-layer activation stacked over the layers for the backward pass)."""
    return max(hlo_arrays(hlo_text).items(), key=lambda kv: kv[1], default=("", 0))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m zephyr_jax.gpu_aot", description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=sorted(TARGETS), default="h100")
    ap.add_argument("--config", default="bench", help="model preset or YAML (default: bench)")
    ap.add_argument("--moe-impl", default="auto", help="comma-separated moe_impl values")
    ap.add_argument("--remat", default="none", help="comma-separated remat policies")
    ap.add_argument("--attention-impl", default=None, help="default: cudnn (bf16 configs)")
    ap.add_argument("--scan-layers", default="true",
                    help="true, false or true,false: the layers scanned or unrolled (each a variant)")
    ap.add_argument("--batch-pairs", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--loss-chunk-size", type=int, default=None,
                    help="positions per LM-head chunk of the loss (default: the bench's)")
    ap.add_argument("--dump-hlo", metavar="DIR", default=None,
                    help="write each variant's compiled HLO to DIR/<moe_impl>_<remat>.hlo.txt")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="the allocator's share of the device for 'fits' (default: "
                         "XLA_CLIENT_MEM_FRACTION, else jax's 0.75; the bench with "
                         "--reference hf gives its step 0.9)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")  # never open a local CUDA device (before any use)
    from zephyr_jax import bench, roofline

    target = TARGETS[a.target]
    pretend()
    fraction, source = a.mem_fraction, "--mem-fraction"
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if fraction is None and name in os.environ:
            fraction, source = os.environ[name], name
    raw = DEFAULT_MEM_FRACTION if fraction is None else fraction
    try:
        fraction = float(raw)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:  # NaN fails too
        raise SystemExit(f"gpu_aot: {source} must be a fraction in (0, 1], got {raw!r}")
    limit = int(target.memory_bytes * fraction)
    pairs = a.batch_pairs or bench.default_shape(a.config)[0]
    seq = a.seq_len or bench.default_shape(a.config)[1]
    chunk = bench.CHUNK_SIZE if a.loss_chunk_size is None else a.loss_chunk_size
    if chunk < 1:
        raise SystemExit(f"gpu_aot: --loss-chunk-size must be >= 1, got {chunk}")
    scans = a.scan_layers.split(",")
    if not set(scans) <= {"true", "false"}:
        raise SystemExit(f"gpu_aot: --scan-layers must be true, false or true,false, got {a.scan_layers!r}")
    rows = []
    for impl, remat, scan in itertools.product(a.moe_impl.split(","), a.remat.split(","), scans):
        _, cfg = bench.cli_config("gpu_aot", a.config, "gpu", impl,
                                  attention_impl=a.attention_impl, remat=remat)
        cfg = cfg.replace(scan_layers=scan == "true")
        row = {"moe_impl": impl, "remat": remat, "attention_impl": cfg.attention_impl,
               "scan_layers": cfg.scan_layers}
        layers = "" if cfg.scan_layers else " unrolled"
        try:
            hlo_path = None
            if a.dump_hlo:
                os.makedirs(a.dump_hlo, exist_ok=True)
                hlo_path = os.path.join(a.dump_hlo,
                                        f"{impl}_{remat}{layers.replace(' ', '_')}.hlo.txt")
            row.update(compile_bench_step(cfg, target, pairs, seq, hlo_path, chunk))
            row["fits"] = row["total_bytes"] <= limit
            print(f"{impl:>9} {remat + layers:>23}: {row['total_bytes'] / GiB:6.1f} GiB "
                  f"(arguments {row['argument_bytes'] / GiB:.1f}, temporaries "
                  f"{row['temp_bytes'] / GiB:.1f}; largest array {row['largest_array']}) "
                  f"{'fits' if row['fits'] else 'DOES NOT FIT'}",
                  flush=True)
            print(f"{'':>34}{roofline.summary(row['roofline'], row['roofline']['model_flops'])}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one variant's failure is a result, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{impl:>9} {remat + layers:>23}: {row['error']}", flush=True)
        rows.append(row)
    print(json.dumps({"target": target.name, "memory_bytes": target.memory_bytes,
                      "mem_fraction": fraction, "limit_bytes": limit, "config": a.config,
                      "batch_pairs": pairs, "seq_len": seq, "loss_chunk_size": chunk,
                      "variants": rows,
                      **bench.versions()}))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
