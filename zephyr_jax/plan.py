"""Plan a run before booking the cluster: compile its full train step for the target mesh on
simulated CPU devices and report memory per device, FLOPs per step and projected run time.

    python -m zephyr_jax.plan configs/zephyr-141b-orpo.yaml --mesh 4x8 --mfu 0.4

The step is the trainer's own (`trainer.sharded_steps`: same optimizer, shardings, donation,
expert-parallel MoE), lowered from `jax.ShapeDtypeStruct`s: no weight is allocated, so a 141B
model plans on a laptop. Other `--key value` pairs override the training config as in
`python -m zephyr_jax.train`. The last line printed is JSON (`per_device_total_gib`,
`flops_per_step`, `devices`, the memory breakdown, ...).

Memory is XLA:CPU's buffer assignment of the per-device SPMD program (arguments + outputs -
donated aliases + temporaries): a proxy for the GPU build, not the same program, unless
`--target h100` (or h200) compiles it with XLA's GPU compiler for that many GPUs instead, without
one (jax's CUDA plugin needed: zephyr_jax/gpu_aot.py); then it is the GPU build's own plan. It errs high:
XLA:CPU computes bf16 dots in float32 and hoists float32 copies of whole [layers, ...] weight
stacks out of the layer loop; `--without_cpu_hoisting` also reports the step compiled without
that hoisting. FLOPs: the analytic model count (6 x active params x tokens + attention) drives
the projection; the compiled program's own dot count (loops times their trip counts) shows what
the hardware will execute. A mesh size of -1 needs `--devices N` (and `--mesh=-1x8`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from zephyr_jax.hlo_text import dot_flops, largest_array_bytes, loop_totals

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
GiB = 2**30

# Hub ids the planner knows without downloading their config.json
HUB_PRESETS = {"mistral-community/mixtral-8x22b-v0.1": "mixtral-8x22b"}
# Rows of known Hub datasets (train split), to project a run's steps without downloading
HUB_DATASET_ROWS = {"argilla/distilabel-capybara-dpo-7k-binarized": 7563}


def _parse(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python -m zephyr_jax.plan", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="training YAML, e.g. configs/zephyr-141b-orpo.yaml")
    ap.add_argument("--mesh", help="mesh, e.g. 4x8 (data x expert) or data=4,expert=8; "
                    "default: the config's `mesh`")
    ap.add_argument("--devices", type=int, help="device count, needed only when a mesh axis is -1")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to project with")
    ap.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK / 1e12,
                    help="peak FLOP/s per device in TFLOP/s (H100 bf16 dense: 989)")
    ap.add_argument("--train_pairs", type=int, help="train pairs per epoch (default: known/local "
                    "dataset size)")
    ap.add_argument("--without_cpu_hoisting", action="store_true",
                    help="also compile without XLA:CPU's loop-invariant code motion, whose float32 "
                    "copies of bf16 weight stacks a GPU build does not make (a second compile)")
    ap.add_argument("--target", choices=("cpu", "h100", "h200"), default="cpu",
                    help="compile for simulated CPU devices (default), or with XLA's GPU compiler "
                    "for H100s / H200s without one (needs jax's CUDA plugin; zephyr_jax/gpu_aot.py)")
    ap.add_argument("--dump_hlo", help="write the compiled per-device HLO text here")
    return ap.parse_known_args(argv)


def mesh_devices(mesh: dict, devices: int | None) -> int:
    from zephyr_jax.sharding import MESH_AXES, MeshConfig, ShardingError

    mc = MeshConfig.from_dict(mesh, source="mesh")
    sizes = [getattr(mc, a) for a in MESH_AXES]
    if -1 in sizes:
        if devices is None:
            raise ShardingError(f"mesh {mesh} has a -1 axis: pass --devices N (or fix its sizes)")
        return math.prod(mc.shape(devices))
    return math.prod(sizes)


def use_cpu_devices(n: int) -> None:
    """Simulate `n` CPU devices; must run before JAX creates its backends."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


# GPU-kernel expert layers and what the plan compiles in their place (see `plan`)
GPU_KERNEL_STAND_INS = {"tokamax": "ragged", "pallas": "ragged"}


def resolve_model_config(cfg):
    """(MixtralConfig, note) of the run: the preset, a local config.json, or for a Hub id the
    matching shipped preset read as that config.json (the runtime fields as the trainer sets)."""
    from zephyr_jax.config import ConfigError, MixtralConfig

    if cfg.model_preset:
        return cfg.model_config(), f"model_preset {cfg.model_preset}"
    path = cfg.model_name_or_path
    if os.path.exists(os.path.join(path, "config.json")):
        return MixtralConfig.from_hf(path, **cfg.runtime_overrides()), f"{path}/config.json"
    preset = HUB_PRESETS.get(path.lower())
    if preset is None:
        raise ConfigError(f"model_name_or_path: {path!r} is not a local folder with config.json and "
                          f"no preset matches it (known Hub ids: {sorted(HUB_PRESETS)}); pass "
                          "--model_name_or_path null --model_preset NAME")
    # what the trainer builds from the Hub's config.json: MixtralConfig.from_hf + runtime overrides
    hf = MixtralConfig.preset(preset).to_hf()
    return (MixtralConfig.from_hf(hf, **cfg.runtime_overrides()),
            f"{path} is not a local folder: using preset configs/model/{preset}.yaml "
            "(its config.json)")


def dataset_pairs(cfg) -> tuple[int | None, str]:
    """Train rows of the mixture (before tokenization drops over-long prompts) and where from."""
    from zephyr_jax.data import loading

    total, sources = 0, []
    for spec, frac in cfg.dataset_mixer.items():
        if spec in HUB_DATASET_ROWS:
            n = HUB_DATASET_ROWS[spec]
            sources.append(f"{spec}: {n} rows (dataset card)")
        elif spec == loading.SAMPLE_ALIAS or os.path.exists(spec):
            n = sum(len(loading.load_mixture({spec: 1.0}, split=split, shuffle=False))
                    for split in cfg.dataset_splits if "train" in split)
            sources.append(f"{spec}: {n} rows")
        else:
            return None, f"{spec}: size unknown"
        total += int(frac * n)
    return total, "; ".join(sources)


def analytic_flops(model_cfg, sequences: int, length: int) -> dict:
    """Model FLOPs of one optimizer step (forward + backward, no remat recompute).

    matmul params N = active params - the embedding table (a lookup, not a matmul);
    dense = 6 * N * tokens; attention = 12 * layers * seqs * T^2 * heads * head_dim
    (QK^T and PV, full T x T as computed here, times 3 for forward + backward).
    """
    c = model_cfg
    n_matmul = c.num_active_params - c.vocab_size * c.hidden_size
    tokens = sequences * length
    dense = 6 * n_matmul * tokens
    attn = 12 * c.num_hidden_layers * sequences * length**2 * c.num_attention_heads * c.kv_head_dim
    # what the remat policy recomputes in the backward pass: "full" one more forward of everything,
    # "save_attention" one more forward of the expert GEMMs (2 x routed expert params x tokens)
    recompute = {"full": (dense + attn) // 3,
                 "save_attention": 2 * 3 * c.num_experts_per_tok * c.hidden_size
                 * c.intermediate_size * c.num_hidden_layers * tokens}.get(c.remat, 0)
    return {"matmul_params": n_matmul, "tokens": tokens, "dense": dense, "attention": attn,
            "model_flops": dense + attn, "with_remat": dense + attn + recompute}


def hlo_dot_flops(hlo_text: str) -> float:
    """FLOPs of the dots in a compiled HLO module (2 x output elements x contracted size), with
    while loops counted `known_trip_count` times. XLA's own `cost_analysis()` counts a loop
    body once, i.e. one layer of a scanned model; this counts all of them."""

    def measure(ins, module):
        return {"flops": dot_flops(ins, module)} if ins.op == "dot" else {}

    return loop_totals(hlo_text, measure).get("flops", 0.0)


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """Per device and step, for each collective kind: how many run and their bytes, loops counted
    their trip count times. A collective's bytes are its largest array, operand or result: the
    gathered array of an all-gather, the array a reduce-scatter or all-reduce reduces, what an
    all-to-all exchanges. A ragged-all-to-all's is its whole receive buffer, whatever was sent:
    an upper bound."""

    def measure(ins, module):
        kind = ins.op.removesuffix("-start")
        if kind not in COLLECTIVES:
            return {}
        size = max([largest_array_bytes(ins.type)]
                   + [largest_array_bytes(module.types[o]) for o in ins.operands()
                      if o in module.types])
        return {f"{kind}/count": 1.0, f"{kind}/bytes": float(size)}

    totals = loop_totals(hlo_text, measure)
    return {kind: {"count": totals[f"{kind}/count"], "bytes": totals[f"{kind}/bytes"]}
            for kind in COLLECTIVES if f"{kind}/count" in totals}


def _shard_bytes(tree, shardings) -> int:
    import jax
    import numpy as np

    sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize,
                         tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


# XLA:CPU computes bf16 dots in float32, and its loop-invariant code motion then hoists float32
# copies of whole [layers, ...] weight / residual stacks out of the layer loop (tens of GiB at
# full size); a GPU build has neither. `without_cpu_hoisting` compiles once more without that pass.
NO_CPU_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def memory_breakdown(mem, params_b: int, opt_b: int, batch_b: int) -> dict:
    """Per-device bytes from `compiled.memory_analysis()`; total = arguments + outputs -
    aliased (the donated state is updated in place: count it once) + temporaries."""
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return {"params": params_b, "optimizer_state": opt_b, "batch": batch_b,
            "other_arguments": arg - params_b - opt_b - batch_b,
            "temp": temp,  # gradients, activations, MoE buffers: everything transient
            "outputs_not_aliased": out - alias,
            "argument": arg, "output": out, "alias": alias,
            "total": arg + out - alias + temp}


def plan(cfg, *, mfu: float = 0.4, peak_flops: float = H100_BF16_PEAK, train_pairs: int | None = None,
         without_cpu_hoisting: bool = False, dump_hlo: str | None = None, log=print,
         target: str = "cpu", gpus: int | None = None) -> dict:
    """Compile `cfg`'s train step for all current devices (the mesh must cover them), or for
    `gpus` compile-only GPUs of `target` ("h100", "h200"), from abstract inputs and return the
    plan as a dict (the CLI's last line)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from zephyr_jax import sharding
    from zephyr_jax.data.batching import BATCH_KEYS
    from zephyr_jax.model import Mixtral, params_dict
    from zephyr_jax.trainer import make_tx, mesh_and_shardings, sharded_steps

    t0 = time.perf_counter()
    model_cfg, model_note = resolve_model_config(cfg)
    if model_cfg.moe_impl == "auto":
        # the simulated devices are CPUs, the cluster is GPUs: plan the GPU's choice
        from zephyr_jax.model.dispatch import auto_impl

        model_cfg = model_cfg.replace(moe_impl=auto_impl("gpu", model_cfg.dtype))
        model_note += f"; moe_impl auto -> {model_cfg.moe_impl} (the GPU's choice)"
    gpu_impl = model_cfg.moe_impl
    on_gpu = target != "cpu"
    if on_gpu:  # XLA's GPU compiler, for GPUs described to it (zephyr_jax/gpu_aot.py)
        from zephyr_jax import gpu_aot

        gpu_aot.pretend()
        gpu_devices = gpu_aot.topology_devices(gpu_aot.TARGETS[target], gpus)
        model_note += f"; compiled for {len(gpu_devices)} x {gpu_aot.TARGETS[target].name}"
    elif model_cfg.moe_impl in GPU_KERNEL_STAND_INS:
        # its kernels lower only for a GPU (tokamax) or run interpreted here (pallas), while the
        # plan compiles for the simulated CPUs: ragged_dot has the same dropless buffers and keeps
        # the same residuals (inputs only), so memory and FLOPs are the GPU kernel's
        model_cfg = model_cfg.replace(moe_impl=GPU_KERNEL_STAND_INS[gpu_impl])
        model_note += f"; {gpu_impl} simulated by {model_cfg.moe_impl} (same buffers)"
    devices = len(gpu_devices) if on_gpu else jax.device_count()
    global_batch = cfg.per_device_train_batch_size * devices  # pairs per micro-batch
    accum = cfg.gradient_accumulation_steps
    pairs, pairs_note = None, ""
    if cfg.max_steps <= 0:
        pairs, pairs_note = (train_pairs, "--train_pairs") if train_pairs else dataset_pairs(cfg)
    if cfg.max_steps > 0:
        total_steps, steps_note = cfg.max_steps, "max_steps"
    elif pairs:
        total_steps = math.ceil(cfg.num_train_epochs * (pairs // (global_batch * accum)))
        steps_note = (f"{pairs} pairs x {cfg.num_train_epochs:g} epochs / {global_batch * accum} "
                      f"pairs per step; {pairs_note}; rows with a prompt >= max_prompt_length "
                      "tokens are dropped later, so slightly fewer")
    else:
        total_steps, steps_note = None, f"unknown ({pairs_note}); pass --train_pairs N"

    # the trainer's own construction: mesh, rules, optimizer, shardings, jitted step
    mesh, rules, p_shard = mesh_and_shardings(cfg, model_cfg, global_batch,
                                              gpu_devices if on_gpu else None)
    schedule, tx = make_tx(cfg, total_steps or 1)
    abstract_params = params_dict(nnx.eval_shape(lambda: Mixtral(model_cfg, rngs=nnx.Rngs(0))))
    spec = sharding.logical_to_spec(("activation_batch", "activation_length"), rules, mesh=mesh)
    batch_sh = NamedSharding(mesh, PartitionSpec(None, *spec))  # as trainer's to_global(leading=1)
    batch = {k: jax.ShapeDtypeStruct((accum, global_batch, cfg.max_length), jnp.int32,
                                     sharding=batch_sh) for k in BATCH_KEYS}
    with sharding.use_mesh(mesh, rules):
        abstract_state, s_shard, train_step, _ = sharded_steps(
            cfg, model_cfg, abstract_params, tx, schedule, mesh, p_shard)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_state, s_shard)
        lowered = train_step.lower(state, batch)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    hlo = compiled.as_text()
    if dump_hlo:
        with open(dump_hlo, "w") as fh:
            fh.write(hlo)

    sizes = (_shard_bytes(abstract_state.params, s_shard.params),
             _shard_bytes(abstract_state.opt_state, s_shard.opt_state),
             _shard_bytes(batch, {k: batch_sh for k in batch}))
    mem = memory_breakdown(compiled.memory_analysis(), *sizes)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    sequences = 2 * global_batch * accum
    fl = analytic_flops(model_cfg, sequences, cfg.max_length)
    # XLA:GPU emits most GEMMs as library or kernel calls (cuBLAS, Triton, Mosaic), not HLO dots
    fl["compiled_dots"] = None if on_gpu else hlo_dot_flops(hlo) * devices
    fl["xla_cost_analysis_per_device"] = float(cost.get("flops", -1.0))
    step_s = fl["model_flops"] / (devices * peak_flops * mfu)
    result = {
        "config": model_note,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "global_batch_pairs": global_batch * accum,
        "sequences_per_step": sequences,
        "max_length": cfg.max_length,
        "model": {"params": model_cfg.num_params, "active_params": model_cfg.num_active_params,
                  "remat": model_cfg.remat, "moe_impl": gpu_impl,
                  "attention_impl": model_cfg.attention_impl, "param_dtype": model_cfg.param_dtype,
                  "optimizer_moment_dtype": cfg.optimizer_moment_dtype,
                  "loss_chunk_size": cfg.loss_chunk_size},
        "per_device_bytes": mem,
        # what the compiled step exchanges per device (loops x trip count; see hlo_collectives)
        "collectives_per_device_per_step": {
            kind: {"count": int(c["count"]), "gib": c["bytes"] / 2**30}
            for kind, c in hlo_collectives(hlo).items()},
        "per_device_total_gib": mem["total"] / GiB,
        "flops_per_step": fl["model_flops"],
        "flops": fl,
        "projection": {
            "mfu": mfu, "peak_flops_per_device": peak_flops, "step_seconds": step_s,
            "step_seconds_compiled_dots": (None if fl["compiled_dots"] is None else
                                           fl["compiled_dots"] / (devices * peak_flops * mfu)),
            "total_steps": total_steps, "steps_from": steps_note,
            "run_hours": step_s * total_steps / 3600 if total_steps else None},
        "seconds": {"lower": t_lower, "compile": t_compile},
        "compiled_for": (f"{devices} x {gpu_aot.TARGETS[target].name} (XLA's GPU compiler, "
                         "compile-only devices)" if on_gpu else f"{devices} simulated CPU devices"),
    }
    if without_cpu_hoisting:
        t1 = time.perf_counter()
        mem2 = memory_breakdown(lowered.compile(compiler_options=NO_CPU_HOISTING).memory_analysis(),
                                *sizes)
        result["without_cpu_hoisting"] = {"per_device_bytes": mem2,
                                          "per_device_total_gib": mem2["total"] / GiB}
        result["seconds"]["compile_without_cpu_hoisting"] = time.perf_counter() - t1
    _report(result, log)
    return result


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB" if abs(x) >= GiB else f"{x / 2**20:8.2f} MiB"


def _report(r: dict, log) -> None:
    b, fl, pr, m = r["per_device_bytes"], r["flops"], r["projection"], r["model"]
    log(f"model: {r['config']}")
    log(f"  {m['params'] / 1e9:.2f}B params, {m['active_params'] / 1e9:.2f}B active; remat "
        f"{m['remat']}, moe_impl {m['moe_impl']}, attention {m['attention_impl']}, params "
        f"{m['param_dtype']}, Adam moments {m['optimizer_moment_dtype']}, loss chunk "
        f"{m['loss_chunk_size']}")
    log(f"mesh {r['mesh']} = {r['devices']} devices; one step: {r['global_batch_pairs']} pairs = "
        f"{r['sequences_per_step']} sequences x {r['max_length']} tokens")
    log(f"compiled for {r['compiled_for']}: {r['seconds']['lower']:.0f} s trace "
        f"+ lower, {r['seconds']['compile']:.0f} s compile")
    compiler = "XLA:GPU" if "GPU" in r["compiled_for"] else "XLA:CPU"
    log(f"memory per device ({compiler} buffer assignment of the per-device SPMD program):")
    log(f"  parameters            {_gib(b['params'])}")
    log(f"  optimizer state       {_gib(b['optimizer_state'])}")
    log(f"  batch + other inputs  {_gib(b['batch'] + b['other_arguments'])}")
    log(f"  temporaries           {_gib(b['temp'])}  gradients, activations, MoE buffers, ...")
    log(f"  outputs not aliased   {_gib(b['outputs_not_aliased'])}  (updated state aliases the "
        f"donated one: {_gib(b['alias']).strip()}, counted once)")
    log(f"  total                 {_gib(b['total'])}  = arguments + outputs - aliased + temporaries")
    if "without_cpu_hoisting" in r:
        w = r["without_cpu_hoisting"]["per_device_bytes"]
        log(f"  without XLA:CPU's hoisted float32 weight copies (loop-invariant code motion off; a "
            f"GPU computes bf16 dots in bf16 and makes none): temporaries {_gib(w['temp']).strip()}"
            f", total {_gib(w['total']).strip()}")
    if r["collectives_per_device_per_step"]:
        log("collectives per device per step (loops x trip count; bytes: the largest array each "
            "one moves, operand or result; ragged-all-to-all: its receive buffer, an upper bound):")
        for kind, c in r["collectives_per_device_per_step"].items():
            log(f"  {kind:<20} {c['count']:>6} x  {c['gib']:8.2f} GiB in all")
    log("FLOPs per step (all devices):")
    log(f"  analytic model FLOPs  {fl['model_flops']:.3e} = 6 x {fl['matmul_params'] / 1e9:.2f}B "
        f"active matmul params x {fl['tokens']} tokens ({fl['dense']:.3e}) + attention "
        f"12 x layers x seqs x T^2 x heads x head_dim ({fl['attention']:.3e})")
    if m["remat"] in ("full", "save_attention"):
        what = "forward" if m["remat"] == "full" else "expert-GEMM forward"
        log(f"    + {m['remat']} remat {what} recompute = {fl['with_remat']:.3e}")
    if fl["compiled_dots"] is not None:
        log(f"  compiled program      {fl['compiled_dots']:.3e}  its dots, loops x trip count "
            "(padded buffers, e.g. the dropless MoE exchange, are computed in full)")
        log(f"  XLA cost_analysis     {fl['xla_cost_analysis_per_device']:.3e} per device: counts "
            "each loop body (one layer, one loss chunk) once; not a step total")
    else:
        log("  compiled program      n/a: XLA:GPU runs its GEMMs as cuBLAS / Triton / Mosaic calls, "
            "which carry no HLO dot to count")
    log(f"projection at MFU {pr['mfu']}: step time = model FLOPs / (devices x peak x MFU) = "
        f"{fl['model_flops']:.3e} / ({r['devices']} x {pr['peak_flops_per_device']:.3g} x "
        f"{pr['mfu']}) = {pr['step_seconds']:.3g} s")
    if pr["step_seconds_compiled_dots"] is not None:
        log(f"  (the compiled program's FLOPs at the same rate: "
            f"{pr['step_seconds_compiled_dots']:.3g} s)")
    if pr["total_steps"]:
        log(f"  run time = {pr['total_steps']} steps x {pr['step_seconds']:.3g} s = "
            f"{pr['run_hours']:.3g} h; steps: {pr['steps_from']}")
    else:
        log(f"  run time: steps {pr['steps_from']}")


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(list(sys.argv[1:] if argv is None else argv))
    from zephyr_jax.sharding import ShardingError, parse_mesh
    from zephyr_jax.train_config import ConfigError, load_train_config

    try:
        cfg = load_train_config(args.config, rest)
        if args.mesh:
            mc = parse_mesh(args.mesh)
            cfg = dataclasses.replace(cfg, mesh={a: getattr(mc, a) for a in mc.axis_names})
        n = mesh_devices(cfg.mesh, args.devices)
        if args.target != "cpu" and args.without_cpu_hoisting:
            raise ConfigError("--without_cpu_hoisting is about XLA:CPU; drop it with --target")
        # with --target the GPUs are compile-only: jax itself stays on one CPU device
        use_cpu_devices(n if args.target == "cpu" else 1)
        result = plan(cfg, mfu=args.mfu, peak_flops=args.peak_tflops * 1e12,
                      train_pairs=args.train_pairs, without_cpu_hoisting=args.without_cpu_hoisting,
                      dump_hlo=args.dump_hlo, target=args.target, gpus=n)
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
