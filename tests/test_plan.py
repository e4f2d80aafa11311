"""The planner (`python -m zephyr_jax.plan`): the trainer's step compiled ahead of time from
abstract inputs on simulated CPU devices.

Fast: a tiny config on a 2 x 2 mesh gives sane JSON (per-device parameters = total / devices,
Adam's two moments = 2 x parameters); the HLO FLOP counter is exact on a known program; the Hub-id
fallback and the mesh errors. Slow: the 141B recipe on 4 x 8 fits an 80 GiB H100 (the README's
figure).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from zephyr_jax.config import ConfigError, MixtralConfig
from zephyr_jax.gpu_aot import cuda_plugin_installed
from zephyr_jax.hlo_text import arrays, largest_array_bytes
from zephyr_jax.plan import (
    analytic_flops,
    hlo_collectives,
    hlo_dot_flops,
    mesh_devices,
    resolve_model_config,
)
from zephyr_jax.sharding import ShardingError
from zephyr_jax.train_config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
HAS_CUDA_PLUGIN = cuda_plugin_installed()


def _plan_cli(*args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the planner sets its own device count
    proc = subprocess.run([sys.executable, "-m", "zephyr_jax.plan", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc, result


def _collectives(hlo: str) -> list[tuple[str, str, str]]:
    """(computation, collective, result type) of every collective in a compiled HLO module;
    "ENTRY" for the top level, where no loop repeats it."""
    out, comp = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?(\S+) .*\{$", line)
        if head:
            comp = "ENTRY" if head.group(1) else head.group(2)
        op = re.search(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                       r"collective-permute)(?:-start)?\(", line)
        if op:
            out.append((comp, op.group(2), op.group(1)))
    return out


TINY_PLAN = ["configs/demo.yaml", "--mesh", "2x2", "--model_preset", "tiny", "--max_length", "64",
             "--max_prompt_length", "32", "--max_steps", "10", "--per_device_train_batch_size", "2",
             "--mfu", "0.5", "--loss_chunk_size", "32"]  # two loss chunks: a chunk loop


def _assert_lm_head_gathered_once(hlo: str, gpu: bool) -> None:
    """The LM head (tiny: [32, 128], FSDP-sharded) is all-gathered once per step, outside every
    loop, and on XLA's GPU compiler its gradient is reduced once, after the chunk loop
    (`sharding.gather_before_loop`). Without it the GPU build gathered the head and reduced its
    gradient in every chunk (seen at 141B on 4 x 8: 8 gathers and 4 reduce-scatters per step);
    the CPU build gathered it twice."""
    head = [c for c in _collectives(hlo) if "[32,128]" in c[2]]
    gathers = [c for c in head if c[1] == "all-gather"]
    assert len(gathers) == 1 and gathers[0][0] == "ENTRY", head
    if gpu:
        assert all(c[0] == "ENTRY" for c in head), head  # XLA:CPU reduces it per chunk


def test_tiny_plan_on_2x2_mesh_reports_sane_json(tmp_path):
    hlo = tmp_path / "step.hlo"
    proc, r = _plan_cli(*TINY_PLAN, "--dump_hlo", str(hlo))
    assert r is not None, proc.stdout + proc.stderr
    _assert_lm_head_gathered_once(hlo.read_text(), gpu=False)
    cfg = MixtralConfig.preset("tiny")
    assert r["devices"] == 4
    assert r["mesh"] == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
    assert r["global_batch_pairs"] == 8 and r["sequences_per_step"] == 16
    b = r["per_device_bytes"]
    total_param_bytes = cfg.num_params * 4  # float32
    # every weight splits 4 ways on (data, expert); only the norms (2 x 32 x 2 + 32 floats) are
    # replicated, so a device holds a quarter plus under 1 KiB
    assert total_param_bytes / 4 <= b["params"] <= total_param_bytes / 4 + 1024
    # Adam: mu and nu mirror the params (float32), plus a few scalars (count, schedule)
    assert 2 * b["params"] <= b["optimizer_state"] <= 2 * b["params"] + 64
    assert b["temp"] > 0 and b["alias"] > 0
    assert b["total"] == b["argument"] + b["output"] - b["alias"] + b["temp"]
    assert r["per_device_total_gib"] == pytest.approx(b["total"] / GiB)
    # the donated state is updated in place: (almost) all of it is aliased
    assert b["alias"] >= b["params"] + b["optimizer_state"]
    fl = r["flops"]
    assert r["flops_per_step"] == fl["model_flops"] > 0
    assert fl["model_flops"] == analytic_flops(cfg, 16, 64)["model_flops"]
    assert fl["compiled_dots"] > 0 and fl["xla_cost_analysis_per_device"] > 0
    pr = r["projection"]
    assert pr["total_steps"] == 10 and pr["mfu"] == 0.5
    assert pr["step_seconds"] == pytest.approx(fl["model_flops"] / (4 * 989e12 * 0.5))
    # the human-readable report comes before the JSON line and prints the formula
    assert "model FLOPs / (devices x peak x MFU)" in proc.stdout


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")
def test_lm_head_is_gathered_once_per_step_on_h100s(tmp_path):
    hlo = tmp_path / "step.hlo"
    proc, r = _plan_cli(*TINY_PLAN, "--target", "h100", "--dump_hlo", str(hlo))
    assert r is not None, proc.stdout + proc.stderr
    _assert_lm_head_gathered_once(hlo.read_text(), gpu=True)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")
def test_overlap_collectives_makes_the_fsdp_collectives_asynchronous_on_h100s(tmp_path):
    """`overlap_collectives` (default true) compiles the train step with XLA's collective
    pipelining and loop double-buffering: the tiny step for 4 H100s gets twice the asynchronous
    all-gathers / reduce-scatters (measured 10 against 5; the 141B step on 4 x 8: 61 against 17,
    the next layer's issued during the current one)."""
    def async_fsdp(*extra: str) -> int:
        hlo = tmp_path / "step.hlo"
        proc, r = _plan_cli(*TINY_PLAN, "--target", "h100", "--dump_hlo", str(hlo), *extra)
        assert r is not None, proc.stdout + proc.stderr
        return len(re.findall(r" (?:all-gather|reduce-scatter)-start\(", hlo.read_text()))

    assert async_fsdp() > async_fsdp("--overlap_collectives", "false")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")
@pytest.mark.parametrize("remat", ["full", "save_attention"])
def test_unrolled_remat_reduce_scatters_the_weight_gradients_as_the_scan_does(tmp_path, remat):
    """`scan_layers: false` under remat (`mixtral._recompute_in_order`) on H100s: the FSDP
    weight gradients are reduce-scattered as in the scanned program, not all-reduced, and no
    more is gathered. Without the backward pass's sharding constraint on them the tiny step
    all-reduced each layer's expert-weight gradients (f32[12288]; the 141B recipe cut to 8
    layers: 51 all-reduces, 5.23 GiB); with the constraint but its ordering zero read from one
    entry of each gradient, XLA gathered the gradients back (73 arrays all-gathered against the
    scan's 62; at 141B / 8 layers 113 all-gathers against 97). Both fail here, as does
    `save_attention` through plain `jax.checkpoint`, its path before the ordering took policies."""
    def collectives(overrides: str) -> tuple[list, list, int]:
        hlo = tmp_path / "step.hlo"
        proc, r = _plan_cli(*TINY_PLAN, "--target", "h100", "--dump_hlo", str(hlo),
                            "--model_overrides", overrides)
        assert r is not None, proc.stdout + proc.stderr
        found = _collectives(hlo.read_text())

        def leaves(kind):  # (dtype, dims) of every array the collectives of this kind return
            return sorted((dt, tuple(d)) for _, k, t in found if k == kind for dt, d in arrays(t))

        largest_all_reduce = max((largest_array_bytes(t) for _, k, t in found if k == "all-reduce"),
                                 default=0)
        return leaves("reduce-scatter"), leaves("all-gather"), largest_all_reduce

    scan_rs, scan_ag, scan_ar = collectives(f"{{remat: {remat}}}")
    rs, ag, ar = collectives(f"{{remat: {remat}, scan_layers: false}}")
    assert rs == scan_rs
    assert len(ag) <= len(scan_ag)
    assert ar <= scan_ar


def test_overlap_options_are_ones_this_xla_accepts():
    from zephyr_jax.trainer import OVERLAP_COMPILER_OPTIONS, overlap_compiler_options

    options = overlap_compiler_options()
    assert options in [dict(o) for o in OVERLAP_COMPILER_OPTIONS], options


def test_hlo_collectives_counts_loop_trips_and_sizes():
    """Collectives per step from a compiled module's text: a loop's body counts its trip count
    times; a collective's bytes are its largest array (operand or result), nested tuple types
    and memory-space layouts included."""
    hlo = """HloModule m

%body (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %p = (s32[], bf16[8,64]) parameter(0)
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %ag = ((bf16[2,64]{1,0}), bf16[8,64]{1,0:S(1)}) all-gather-start(%x), dimensions={0}
  %agd = bf16[8,64]{1,0} all-gather-done(%ag)
  %rs = bf16[2,64]{1,0} reduce-scatter(%agd), dimensions={0}, to_apply=%add
  ROOT %t = (s32[], bf16[8,64]) tuple(%i, %agd)
}

ENTRY %main (a: bf16[8,64]) -> bf16[8,64] {
  %a = bf16[8,64]{1,0} parameter(0)
  %w = (s32[], bf16[8,64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %ar = f32[16]{0} all-reduce(%v), to_apply=%add
  ROOT %o = bf16[8,64]{1,0} all-to-all(%a), dimensions={0}
}
"""
    got = hlo_collectives(hlo)
    assert got == {"all-gather": {"count": 7.0, "bytes": 7 * 8 * 64 * 2.0},
                   "reduce-scatter": {"count": 7.0, "bytes": 7 * 8 * 64 * 2.0},
                   "all-reduce": {"count": 1.0, "bytes": 64.0},
                   "all-to-all": {"count": 1.0, "bytes": 8 * 64 * 2.0}}, got


def test_hlo_dot_flops_counts_loop_trips():
    import jax
    import jax.numpy as jnp

    def f(w_LDD, x_BD):
        def body(x, w):
            return jnp.tanh(x @ w), None

        return jax.lax.scan(body, x_BD, w_LDD)[0] @ w_LDD[0]

    w = jax.ShapeDtypeStruct((7, 16, 16), jnp.float32)
    x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    compiled = jax.jit(f).lower(w, x).compile()
    want = 8 * 2 * 4 * 16 * 16  # 7 looped matmuls + 1 outside, 2 * B * D * D each
    assert hlo_dot_flops(compiled.as_text()) == want
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] < want / 2  # why the planner counts itself: XLA counts the body once


def test_hub_id_falls_back_to_preset_with_the_trainers_runtime_fields():
    cfg = load_train_config(os.path.join(ROOT, "configs/zephyr-141b-orpo.yaml"))
    model_cfg, note = resolve_model_config(cfg)
    assert "configs/model/mixtral-8x22b.yaml" in note
    want = MixtralConfig.preset("mixtral-8x22b")
    assert model_cfg.to_hf() == want.to_hf()
    # torch_dtype bfloat16 and gradient_checkpointing, as `load_params` would apply them
    assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.remat) == ("bfloat16", "bfloat16", "full")
    unknown = load_train_config(os.path.join(ROOT, "configs/zephyr-141b-orpo.yaml"),
                                ["--model_name_or_path", "someone/unknown-model"])
    with pytest.raises(ConfigError, match="no preset matches"):
        resolve_model_config(unknown)


def test_mesh_devices():
    assert mesh_devices({"data": 4, "expert": 8}, None) == 32
    assert mesh_devices({"data": -1, "expert": 8}, 64) == 64
    with pytest.raises(ShardingError, match="--devices"):
        mesh_devices({"data": -1, "expert": 8}, None)


def test_cli_error_is_one_line_exit_2():
    proc, _ = _plan_cli("configs/demo.yaml", "--mesh=data=-1,expert=4")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "--devices" in proc.stderr


# an acceptance test of the scale issue: in the default run
def test_zephyr_141b_on_4x8_fits_80gib_h100():
    proc, r = _plan_cli("configs/zephyr-141b-orpo.yaml", "--mesh", "4x8", "--without_cpu_hoisting",
                        timeout=1800)
    assert r is not None, proc.stdout + proc.stderr
    assert r["devices"] == 32 and r["global_batch_pairs"] == 32 and r["max_length"] == 2048
    b = r["per_device_bytes"]
    cfg = MixtralConfig.preset("mixtral-8x22b")
    assert b["params"] == pytest.approx(cfg.num_params * 2 / 32, rel=0.01)  # bf16, 1/32 each
    assert b["optimizer_state"] == pytest.approx(2 * b["params"], rel=0.01)  # bf16 mu and nu
    assert r["per_device_total_gib"] <= 80, r["per_device_bytes"]
    assert r["without_cpu_hoisting"]["per_device_total_gib"] <= r["per_device_total_gib"]
    print(json.dumps({"per_device_total_gib": r["per_device_total_gib"],
                      "without_cpu_hoisting": r["without_cpu_hoisting"]["per_device_total_gib"],
                      "seconds": r["seconds"]}))


def test_analytic_remat_recompute_matches_the_compiled_program():
    """The analytic recompute of "save_attention" (one more forward of the routed expert GEMMs) is
    what the compiled gradient adds over "save_matmuls": with the dense dispatch every expert runs
    on every token, so E/k times that, plus the router's small matmul."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import zephyr_jax as zj

    cfg = MixtralConfig.preset("tiny").replace(moe_impl="dense")
    B, T = 4, 64
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
    params = zj.params_dict(zj.Mixtral(cfg, rngs=nnx.Rngs(0)))

    def dots(policy):
        def loss(p):
            return jnp.mean(zj.model_from_params(cfg.replace(remat=policy), p)(ids) ** 2)

        return hlo_dot_flops(jax.jit(jax.grad(loss)).lower(params).compile().as_text())

    fl = analytic_flops(cfg.replace(remat="save_attention"), B, T)
    expert_forward = fl["with_remat"] - fl["model_flops"]
    router = 2 * B * T * cfg.hidden_size * cfg.num_local_experts * cfg.num_hidden_layers
    experts_per_token = cfg.num_local_experts / cfg.num_experts_per_tok
    assert dots("save_attention") - dots("save_matmuls") == pytest.approx(
        experts_per_token * expert_forward + router, rel=0.01)
