"""What our Pallas grouped-GEMM kernels compile to on an H100, read from the PTX, without a GPU.

    python -m zephyr_jax.kernel_audit --target h100

Compiles the forward, dx and dw kernels (`zephyr_jax/kernels/grouped_gemm.py`) of every tile
candidate `bench --gemm` times, and of the dispatch's `PALLAS_TILES`, for an H100 (deviceless, as
`zephyr_jax.gpu_aot` does; needs jax's CUDA plugin) on the bench's up and down projections, and
reports per kernel what decides whether a Hopper GEMM can approach its peak before anything is
timed:

- `mma`: the tensor-core instruction Triton chose: `wgmma` (Hopper's asynchronous warpgroup MMA)
  or the older `mma.sync`, with its shape (m64nNk16: N >= 128 needs half the shared-memory reads
  per FLOP of N = 64);
- `operands_in_smem`: both wgmma operands read straight from shared memory (descriptors). An
  operand that went through registers first (e.g. masked with a `where` after loading) must be
  loaded, changed and fed per instruction;
- `pipelined`: the MMAs overlap the next iteration (`wgmma.wait_group` with depth >= 1 inside the
  loop) instead of waiting for each to finish (depth 0 only);
- `spills` (per compiled program: the three kernels of one candidate together): ptxas had to
  spill registers to local memory (compiled with XLA's
  `xla_gpu_fail_ptx_compilation_on_register_spilling`; a program it refuses is compiled again
  without it to read the rest);
- grid, threads and shared memory per block from XLA's thunk sequence.

This is what the compiler emitted, not how fast it runs: `bench --gemm` on a GPU measures that.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass

KERNELS = ("gmm", "gmm_t", "tgmm")  # pallas_call names: forward, dx, dw
ROLE = {"gmm": "forward", "gmm_t": "dx", "tgmm": "dw"}
SPILL_MESSAGE = "register spilling"


@dataclass(frozen=True)
class KernelReport:
    name: str
    grid: tuple[int, ...]
    threads: int
    shared_memory_bytes: int
    mma: str  # "wgmma m64n128k16 f32.bf16.bf16", "mma.sync ...", or "none"
    mma_count: int  # MMA instructions in the PTX (static count, unrolled loop bodies)
    operands_in_smem: bool  # every wgmma reads A and B from shared-memory descriptors
    pipelined: bool  # some wgmma.wait_group keeps >= 1 group in flight


@dataclass(frozen=True)
class Audit:
    kernels: dict[str, KernelReport]
    spills: bool  # the compiled program needed register spills (any of its kernels)

    def healthy(self, names=KERNELS) -> bool:
        """Hopper's fast path for every kernel in `names`: wgmma from shared memory, overlapped
        with the next loads, no spills."""
        return not self.spills and all(
            n in self.kernels and self.kernels[n].mma.startswith("wgmma")
            and self.kernels[n].operands_in_smem and self.kernels[n].pipelined for n in names)


_THUNK = re.compile(r"(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"^\.(?:visible )?\.entry (\w+)", re.M)
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.([\w.]+)\s+\{[^}]*\},\s*(\{|%rd)")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)[\w.]*")
_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


def thunk_kernels(thunk_sequence: str) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """name -> (grid, threads per block, shared memory bytes) of each kernel launch in XLA's thunk
    sequence dump."""
    out = {}
    for name, grid, threads, smem in _THUNK.findall(thunk_sequence):
        dims = [int(v) for v in threads.split(",")]
        out[name] = (tuple(int(v) for v in grid.split(",")), dims[0] * dims[1] * dims[2], int(smem))
    return out


def ptx_entries(ptx: str) -> dict[str, str]:
    """name -> PTX text of each kernel entry in a PTX module."""
    found = list(_ENTRY.finditer(ptx))
    return {m.group(1): ptx[m.start(): found[i + 1].start() if i + 1 < len(found) else len(ptx)]
            for i, m in enumerate(found)}


def mma_summary(entry_ptx: str) -> tuple[str, int, bool, bool]:
    """(mma, mma_count, operands_in_smem, pipelined) of one kernel's PTX."""
    wgmma = _WGMMA.findall(entry_ptx)
    if wgmma:
        shapes = sorted({f"wgmma {shape} {types}" for shape, types, _ in wgmma})
        in_smem = all(a_operand == "%rd" for _, _, a_operand in wgmma)
        pipelined = any(int(d) >= 1 for d in _WAIT.findall(entry_ptx))
        return ", ".join(shapes), len(wgmma), in_smem, pipelined
    sync = _MMA_SYNC.findall(entry_ptx)
    if sync:
        return ", ".join(sorted({f"mma.sync {s}" for s in sync})), len(sync), False, False
    return "none", 0, False, False


def read_dump(dump_dir: str, names=KERNELS) -> dict[str, KernelReport]:
    """The KernelReport of each kernel in `names` found in an XLA dump directory."""
    launches = {}
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
        with open(path) as fh:
            launches.update(thunk_kernels(fh.read()))
    entries = {}
    for path in glob.glob(os.path.join(dump_dir, "*.ptx")):
        with open(path) as fh:
            entries.update(ptx_entries(fh.read()))
    reports = {}
    for name in names:
        if name not in entries or name not in launches:
            continue
        grid, threads, smem = launches[name]
        reports[name] = KernelReport(name, grid, threads, smem, *mma_summary(entries[name]))
    return reports


def audit(fn, *abstract_args, names=KERNELS) -> Audit:
    """Compile `fn` on `abstract_args` (placed on a compile-only GPU) and report its kernels in
    `names`."""
    import jax

    lowered = jax.jit(fn).trace(*abstract_args).lower()
    spills = False
    for fail_on_spill in (True, False):
        with tempfile.TemporaryDirectory(prefix="zephyr_kernel_audit_") as dump:
            # xla_dump_emitter_re is what makes XLA write each module's PTX
            options = {"xla_dump_to": dump, "xla_dump_emitter_re": ".*",
                       "xla_gpu_fail_ptx_compilation_on_register_spilling": fail_on_spill}
            try:
                lowered.compile(compiler_options=options)
            except Exception as e:  # noqa: BLE001 - only the spill refusal is expected
                if fail_on_spill and SPILL_MESSAGE in str(e):
                    spills = True
                    continue
                raise
            return Audit(read_dump(dump, names), spills)
    raise AssertionError("unreachable")


def gmm_cases() -> list[tuple[str, dict]]:
    """(label, gmm keyword arguments) of every tile candidate `bench --gemm` times and of the
    dispatch's PALLAS_TILES."""
    from zephyr_jax import bench
    from zephyr_jax.model import dispatch

    cases = [("PALLAS_TILES", dict(dispatch.PALLAS_TILES))]
    for bm, bk, bn, nw, ns in bench.GMM_TILES:
        cases.append((f"[{bm},{bk},{bn},w{nw},s{ns}]",
                      {"bm": bm, "bk": bk, "bn": bn, "num_warps": nw, "num_stages": ns}))
    return cases


def audit_gmm(tiles: dict, M: int, K: int, N: int, G: int, mesh) -> Audit:
    """Forward, dx and dw kernels of `gmm(x[M, K], w[G, K, N])` with `tiles`, compiled for the
    device of `mesh`, bf16."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from zephyr_jax.kernels import gmm

    on = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16, sharding=on)
    w = jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16, sharding=on)
    sizes = jax.ShapeDtypeStruct((G,), jnp.int32, sharding=on)

    def fwd_bwd(x, w, sizes):
        y, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes, interpret=False, **tiles), x, w)
        return vjp(y)

    return audit(fwd_bwd, x, w, sizes)


def main(argv: list[str] | None = None) -> int:
    from zephyr_jax import gpu_aot

    ap = argparse.ArgumentParser(prog="python -m zephyr_jax.kernel_audit",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=sorted(gpu_aot.TARGETS), default="h100")
    ap.add_argument("--config", default="bench", help="model preset or YAML (default: bench)")
    a = ap.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")  # never open a local CUDA device
    from zephyr_jax import bench

    _, cfg = bench.cli_config("kernel_audit", a.config, "gpu", "pallas")
    gpu_aot.pretend()
    mesh = gpu_aot.topology_mesh(gpu_aot.TARGETS[a.target])
    pairs, seq = bench.default_shape(a.config)
    d, f, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    M = 2 * pairs * seq * cfg.num_experts_per_tok
    rows = []
    for label, tiles in gmm_cases():
        for proj, (K, N) in (("up", (d, f)), ("down", (f, d))):
            row = {"tiles": label, "projection": f"{proj} {M}x{K}->{N}"}
            try:
                result = audit_gmm(tiles, M, K, N, E, mesh)
                row["kernels"] = {ROLE[k]: asdict(r) for k, r in result.kernels.items()}
                row["spills"], row["healthy"] = result.spills, result.healthy()
                # a kernel absent from XLA's dump (renamed, fused away) fails `healthy`: say so
                row["missing"] = [ROLE[k] for k in KERNELS if k not in result.kernels]
                if row["missing"]:
                    print(f"{label:>22} {proj:>4}: no PTX found for {', '.join(row['missing'])}",
                          flush=True)
                for k, r in result.kernels.items():
                    print(f"{label:>22} {proj:>4} {ROLE[k]:>7}: {r.mma} x{r.mma_count}, operands "
                          f"{'smem' if r.operands_in_smem else 'REGISTERS'}, "
                          f"{'pipelined' if r.pipelined else 'NOT PIPELINED'}, "
                          f"{'SPILLS' if result.spills else 'no spills'}, "
                          f"smem {r.shared_memory_bytes // 1024} KiB, grid {list(r.grid)}",
                          flush=True)
            except Exception as e:  # noqa: BLE001 - one candidate's failure is a result, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"{label:>22} {proj:>4}: {row['error']}", flush=True)
            rows.append(row)
    print(json.dumps({"target": gpu_aot.TARGETS[a.target].name, "config": a.config, "rows": rows,
                      **bench.versions()}))
    return 0 if all(r.get("healthy") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
