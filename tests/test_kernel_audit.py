"""`python -m zephyr_jax.kernel_audit`: what the Pallas grouped-GEMM kernels compile to for an H100.

CI (no CUDA plugin) checks the readers on text in the form XLA's dumps have (the PTX lines are
from our kernels compiled for sm_90a); with jax's CUDA plugin (`scripts/check_gpu_stack.sh`) the
kernels themselves are compiled and every tile candidate must take Hopper's fast path, with
controls showing the audit does report a kernel that does not.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zephyr_jax.gpu_aot import cuda_plugin_installed
from zephyr_jax.kernel_audit import (
    Audit,
    KernelReport,
    mma_summary,
    ptx_entries,
    read_dump,
    thunk_kernels,
)

HAS_CUDA_PLUGIN = cuda_plugin_installed()
needs_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ACC = "{" + ",".join(f"%r{i}" for i in range(220, 252)) + "}"
# the forward kernel: both operands from shared-memory descriptors, one group kept in flight
PIPELINED = f"""
.visible .entry gmm(
\t.param .u64 .ptr .global .align 1 gmm_param_0
)
{{
$L__BB0_2:
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {ACC}, %rd63, %rd64, %p3, 1, 1, 0, 1;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {ACC}, %rd65, %rd66, %p3, 1, 1, 0, 1;
\twgmma.commit_group.sync.aligned;
\twgmma.wait_group.sync.aligned 1;
\t@%p7 bra \t$L__BB0_2;
\twgmma.wait_group.sync.aligned 0;
\tret;
}}
"""
# the dw kernel as it was: the lhs tile masked by a `where` after loading, so wgmma took it from
# registers, and each MMA was waited for (depth 0 only)
REGISTER_A = f"""
.visible .entry tgmm(
\t.param .u64 .ptr .global .align 1 tgmm_param_0
)
{{
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {ACC}, {{%r177,%r179,%r181,%r183}}, %rd89, %p10, 1, 1, 1;
\twgmma.commit_group.sync.aligned;
\twgmma.wait_group.sync.aligned 0;
\tret;
}}
"""
MMA_SYNC = """
.visible .entry gmm_t(
)
{
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r1,%r2,%r3,%r4}, {%r5,%r6}, {%f1,%f2,%f3,%f4};
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r1,%r2,%r3,%r4}, {%r5,%r6}, {%f1,%f2,%f3,%f4};
}
"""
THUNKS = """001: kCopy         [source       | next=007 (6)] kCopy
004: kCustomKernel [source       | next=007 (3)] wrapped_iota grid: [3, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
014: kCustomKernel [prev=013 (1) | next=015 (1)] gmm grid: [44, 264, 1] threads: [256, 1, 1]  shared_memory: 98304 bytes
015: kCustomKernel [prev=014 (1) | next=016 (1)] gmm_t grid: [32, 264, 1] threads: [256, 1, 1]  shared_memory: 147456 bytes
016: kCustomKernel [prev=015 (1) | sink        ] tgmm grid: [32, 44, 8] threads: [256, 1, 1]  shared_memory: 155648 bytes
"""


def test_thunk_sequence_gives_each_kernels_launch():
    launches = thunk_kernels(THUNKS)
    assert launches["gmm"] == ((44, 264, 1), 256, 98304)
    assert launches["tgmm"] == ((32, 44, 8), 256, 155648)
    assert launches["wrapped_iota"] == ((3, 1, 1), 128, 0)
    assert "kCopy" not in launches


def test_mma_summary_tells_the_fast_path_from_the_slow_ones():
    assert mma_summary(PIPELINED) == ("wgmma m64n128k16 f32.bf16.bf16", 2, True, True)
    assert mma_summary(REGISTER_A) == ("wgmma m64n64k16 f32.bf16.bf16", 1, False, False)
    assert mma_summary(MMA_SYNC) == ("mma.sync m16n8k16", 2, False, False)
    assert mma_summary("\tret;\n") == ("none", 0, False, False)


def test_ptx_entries_split_a_module_per_kernel():
    entries = ptx_entries(PIPELINED + REGISTER_A)
    assert sorted(entries) == ["gmm", "tgmm"]
    assert "m64n128k16" in entries["gmm"] and "m64n128k16" not in entries["tgmm"]


def test_read_dump_joins_launches_and_ptx(tmp_path):
    (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(THUNKS)
    (tmp_path / "module_0001.jit_f.23.ptx").write_text(PIPELINED)
    (tmp_path / "module_0001.jit_f.21.ptx").write_text(REGISTER_A + MMA_SYNC)
    reports = read_dump(str(tmp_path))
    assert reports["gmm"] == KernelReport("gmm", (44, 264, 1), 256, 98304,
                                          "wgmma m64n128k16 f32.bf16.bf16", 2, True, True)
    assert reports["tgmm"].operands_in_smem is False and reports["tgmm"].pipelined is False
    assert reports["gmm_t"].mma == "mma.sync m16n8k16"
    healthy = Audit({"gmm": reports["gmm"]}, spills=False)
    assert healthy.healthy(("gmm",)) and not healthy.healthy()  # dx, dw missing
    assert not Audit({"gmm": reports["gmm"]}, spills=True).healthy(("gmm",))
    assert not Audit(reports, spills=False).healthy()


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_says_what_is_missing():
    proc = subprocess.run([sys.executable, "-m", "zephyr_jax.kernel_audit"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'pip install "jax[cuda13]"' in proc.stderr + proc.stdout


# ------------------------------------------------------------------ with jax's CUDA plugin

AUDIT = """
import json, sys, jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
from dataclasses import asdict
from zephyr_jax import gpu_aot, kernel_audit
gpu_aot.pretend()
mesh = gpu_aot.topology_mesh(gpu_aot.TARGETS["h100"])
out = {}
"""


def _run(code: str) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", AUDIT + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@needs_plugin
def test_every_tile_candidate_takes_hoppers_fast_path():
    """PALLAS_TILES and each candidate `bench --gemm` times, forward / dx / dw on the bench's
    up-projection (32,768 rows, 2048 -> 5632, 8 experts, bf16): wgmma with both operands in
    shared memory, pipelined, no register spills. The dw kernel failed this (lhs masked in
    registers, each MMA waited for) until it loaded with a mask instead."""
    result = _run("""
for label, tiles in kernel_audit.gmm_cases():
    a = kernel_audit.audit_gmm(tiles, 32768, 2048, 5632, 8, mesh)
    out[label] = {"healthy": a.healthy(), "spills": a.spills,
                  "kernels": {k: asdict(r) for k, r in a.kernels.items()}}
print("RESULT " + json.dumps(out))
""")
    assert len(result) >= 7
    bad = {label: r for label, r in result.items() if not r["healthy"]}
    assert not bad, bad
    # dx blocks like the forward: its wgmma's N is the output block bn, as in the forward
    for r in result.values():
        assert r["kernels"]["gmm_t"]["mma"] == r["kernels"]["gmm"]["mma"]


@needs_plugin
def test_the_audit_reports_a_slow_kernel_and_spills():
    """Controls: a dw-style kernel that masks its lhs tile with `where` after loading (what
    tgmm did) is reported with its operand in registers and not pipelined; tiles too large for
    the registers (a 128 x 256 float32 accumulator on 4 warps: 256 registers a thread) are
    reported as spilling."""
    result = _run("""
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec
on = NamedSharding(mesh, PartitionSpec())

def masked_where(x_ref, dy_ref, n_ref, o_ref):
    def body(i, acc):
        rows = i * 128 + jnp.arange(128)
        a = x_ref[pl.ds(i * 128, 128), pl.ds(0, 64)]
        a = jnp.where((rows < n_ref[0])[:, None], a, jnp.zeros_like(a))
        return acc + plgpu.dot(a, dy_ref[pl.ds(i * 128, 128), pl.ds(0, 128)], trans_a=True)
    o_ref[...] = jax.lax.fori_loop(0, 64, body, jnp.zeros((64, 128), jnp.float32)).astype(o_ref.dtype)

def tgmm(x, dy, n):
    return pl.pallas_call(masked_where, out_shape=jax.ShapeDtypeStruct((64, 128), x.dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3),
                          name="tgmm")(x, dy, n)

x = jax.ShapeDtypeStruct((8192, 64), jnp.bfloat16, sharding=on)
dy = jax.ShapeDtypeStruct((8192, 128), jnp.bfloat16, sharding=on)
n = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on)
slow = kernel_audit.audit(tgmm, x, dy, n, names=("tgmm",))
big = kernel_audit.audit_gmm({"bm": 128, "bk": 64, "bn": 256, "num_warps": 4, "num_stages": 2},
                             32768, 2048, 5632, 8, mesh)
out = {"slow": asdict(slow.kernels["tgmm"]), "slow_healthy": slow.healthy(("tgmm",)),
       "big_spills": big.spills, "big_kernels": sorted(big.kernels)}
print("RESULT " + json.dumps(out))
""")
    assert result["slow"]["mma"].startswith("wgmma")
    assert not result["slow"]["operands_in_smem"] and not result["slow"]["pipelined"]
    assert not result["slow_healthy"]
    assert result["big_spills"] is True and result["big_kernels"] == ["gmm", "gmm_t", "tgmm"]
