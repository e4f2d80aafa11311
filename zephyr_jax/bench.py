"""Time the full ORPO train step on one device, optionally against transformers + PyTorch.

Example (on a CPU: the small model, 2 pairs x 256 tokens, three MoE implementations against one
transformers run; ~2-3 minutes):

    python -m zephyr_jax.bench --moe-impl auto,ragged,dense --steps 5 --warmup 2 --reference hf

On a GPU the defaults are PERF.md's bench model (configs/model/bench.yaml) and 4 pairs x 2048
tokens. The step is the trainer's own: `make_train_step` + `make_optimizer` (AdamW, clipping),
jitted with the state donated, the batch on the device, each step waited for with
`block_until_ready`. `--reference hf` first runs `zephyr_jax.bench_reference` (transformers'
MixtralForCausalLM, TRL's ORPO loss, torch AdamW) in a child process on the same config and batch.
`--gemm` instead times the expert layer's grouped GEMMs (each implementation, forward and backward)
against a dense matmul of the same FLOPs and the equal-capacity batched einsum.

Human-readable lines go first; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax.config import (
    ATTENTION_IMPLS,
    MOE_IMPLS,
    REMAT_POLICIES,
    ConfigError,
    MixtralConfig,
)
from zephyr_jax.model import Mixtral, dispatch, params_dict
from zephyr_jax.optim import make_optimizer, make_schedule
from zephyr_jax.train_step import create_train_state, make_train_step

# The CPU default: the bench model's shape family at a size two CPU cores step in about a second.
# float32 because neither XLA:CPU nor PyTorch's CPU kernels make bf16 the fast path here.
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=1024, dtype="float32",
             param_dtype="float32")
# (pairs, seq) per config name; anything else gets the CPU-sized default.
SHAPES = {"bench": (4, 2048)}
SMALL_SHAPE = (2, 256)
# Dense bf16 tensor-core peaks (FLOP/s) by device-kind substring; PERF.md's MFU basis.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
BETA, LR, CHUNK_SIZE = 0.05, 5e-6, 512
BENCH_MEM_FRACTION = 0.9  # of GPU memory for our step when the reference ran first (`main`)
PROMPT_FRACTION = 4  # the first seq // 4 tokens are the (shared, label-masked) prompt


# ----------------------------------------------------------------------------- setup


def resolve_config(spec: str | None, platform: str, moe_impl: str | None = None,
                   dtype: str | None = None, **runtime: str) -> tuple[str, MixtralConfig]:
    """(name, config) for `bench`, `small`, another preset name, or a YAML path.

    None means `bench` on a GPU and `small` elsewhere. `dtype` sets compute and parameter dtype;
    `runtime` other runtime fields (attention_impl, remat); None values are left alone. On a GPU
    the attention defaults to cuDNN's (bf16/fp16 configs).
    """
    if spec is None:
        spec = "bench" if platform == "gpu" else "small"
    if spec == "small":
        cfg = MixtralConfig.preset("bench", **SMALL)
    elif spec.endswith((".yaml", ".yml")) or os.path.sep in spec:
        cfg = MixtralConfig.from_yaml(spec)
    else:
        cfg = MixtralConfig.preset(spec)
    overrides = {k: v for k, v in runtime.items() if v is not None}
    if platform == "gpu" and "attention_impl" not in overrides and cfg.dtype != "float32":
        # the bench batch is full-length (right-padded trivially): cuDNN's flash attention applies
        overrides["attention_impl"] = "cudnn"
    if moe_impl:
        overrides["moe_impl"] = moe_impl
    if dtype:
        overrides.update(dtype=dtype, param_dtype=dtype)
    return spec, cfg.replace(**overrides)


def cli_config(prog: str, spec: str | None, platform: str, moe_impl: str | None = None,
               dtype: str | None = None, **runtime: str) -> tuple[str, MixtralConfig]:
    """`resolve_config` for a command line: a preset that does not exist, a YAML file that is
    missing or a field it rejects ends the command with one line naming it, not a traceback."""
    try:
        return resolve_config(spec, platform, moe_impl, dtype, **runtime)
    except (ConfigError, OSError) as e:
        raise SystemExit(f"{prog}: --config {spec!r}: {e}") from None


def default_shape(name: str) -> tuple[int, int]:
    return SHAPES.get(name, SMALL_SHAPE)


def make_batch(vocab_size: int, pairs: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full-length preference batch, [pairs, seq_len] per key: chosen and rejected share a prompt
    (the first quarter, label-masked), no padding, so every position is a real token."""
    rng = np.random.default_rng(seed)
    prompt = seq_len // PROMPT_FRACTION
    batch = {}
    shared = rng.integers(3, vocab_size, (pairs, prompt))
    for side in ("chosen", "rejected"):
        ids = np.concatenate([shared, rng.integers(3, vocab_size, (pairs, seq_len - prompt))], 1)
        labels = ids.copy()
        labels[:, :prompt] = -100
        batch[f"{side}_input_ids"] = ids.astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones_like(ids, np.int32)
        batch[f"{side}_labels"] = labels.astype(np.int32)
    return batch


def flops_per_token(cfg: MixtralConfig, seq_len: int) -> float:
    """Training FLOPs per token, PERF.md's `flops_per_token`: 6 x active matmul parameters (attention
    projections, top-k experts, router, LM head; not the embedding gather) + 6 x layers x seq x hidden
    (causal attention scores and values)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.kv_head_dim
    attn = 2 * d * cfg.num_attention_heads * hd + 2 * d * cfg.num_key_value_heads * hd
    active = L * (attn + cfg.num_experts_per_tok * 3 * d * f + d * cfg.num_local_experts)
    active += cfg.vocab_size * d
    return 6.0 * active + 6.0 * L * seq_len * d


def peak_flops(device: jax.Device, dtype: str, declared_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): declared, a known GPU's table value, or measured."""
    if declared_tflops:
        return declared_tflops * 1e12, f"declared --peak-tflops {declared_tflops:g}"
    for name, peak in PEAK_FLOPS.items():
        if name in device.device_kind:
            return peak, f"{name} dense bf16 peak {peak / 1e12:g} TFLOP/s (PERF.md basis)"
    rate = measure_matmul_rate(dtype)
    return rate, (f"measured: best {dtype} 1024^3 jnp matmul on this {device.platform} "
                  f"({rate / 1e9:.1f} GFLOP/s); not a hardware peak")


def measure_matmul_rate(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of one n x n x n jitted matmul."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- our step


def init_params(cfg: MixtralConfig, seed: int = 0) -> dict:
    return params_dict(Mixtral(cfg, rngs=nnx.Rngs(seed)))


def jitted_step(cfg: MixtralConfig, *, beta: float = BETA, lr: float = LR,
                chunk_size: int = CHUNK_SIZE):
    """(the trainer's step jitted with the state donated, its optimizer): `make_optimizer`'s
    torch-style clipping at 1.0 and AdamW at a constant learning rate. What `build_step` compiles
    and `gpu_aot` compiles for a GPU from abstract inputs."""
    schedule = make_schedule("constant", lr, warmup_steps=0, total_steps=1)
    tx = make_optimizer(schedule, weight_decay=0.0, max_grad_norm=1.0)
    return jax.jit(make_train_step(cfg, tx, schedule, beta, chunk_size), donate_argnums=0), tx


def build_step(cfg: MixtralConfig, params: dict, batch: dict[str, np.ndarray], *, beta: float = BETA,
               lr: float = LR, chunk_size: int = CHUNK_SIZE):
    """(compiled step, state, device batch, compile seconds) for the trainer's step on one device.

    The optimizer is the trainer's (`make_optimizer`: torch-style clipping at 1.0, AdamW, moments in
    the parameter dtype) at a constant learning rate; the batch gets the leading
    gradient-accumulation axis `make_train_step` takes (A = 1).
    """
    step, tx = jitted_step(cfg, beta=beta, lr=lr, chunk_size=chunk_size)
    state = create_train_state(params, tx)
    device_batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    return compiled, state, device_batch, time.perf_counter() - t0


def time_ours(compiled, state, device_batch, steps: int,
              warmup: int) -> tuple[list[float], float, float]:
    """Per-step wall times after `warmup` steps (each waited for); step 0's loss and gradient norm."""
    times, loss0, grad_norm0 = [], None, None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        if loss0 is None:
            loss0, grad_norm0 = float(metrics["loss"]), float(metrics["grad_norm"])
    return times, loss0, grad_norm0


def compiled_memory(compiled) -> int:
    """XLA's static estimate for one call of `compiled`: arguments + outputs + temporaries -
    donated (aliased) buffers."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def check_fits(device: jax.Device, compiled) -> None:
    """Refuse to run a step whose XLA memory plan exceeds the device allocator's limit: it would
    fail out of memory part-way, after its time was spent, and could leave the allocator
    fragmented for the variants after it. (No limit reported, as on CPU: no check.)"""
    limit = (device.memory_stats() or {}).get("bytes_limit")
    need = compiled_memory(compiled)
    if limit and need > limit:
        raise MemoryError(f"the step needs {_gib(need)} by XLA's memory plan; the device allows "
                          f"{_gib(limit)} (bytes_limit: XLA_CLIENT_MEM_FRACTION of its memory); "
                          "not run")


def memory_report(device: jax.Device, compiled) -> tuple[int, str]:
    """(bytes, label): the allocator's peak on accelerators; XLA's static estimate on CPU."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        # jax cannot reset it: with several variants in one run it is the largest so far
        return int(stats["peak_bytes_in_use"]), ("device.memory_stats()['peak_bytes_in_use'] "
                                                 "(process-wide: the largest of this run so far)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return compiled_memory(compiled), (f"XLA memory_analysis: arguments + outputs + temporaries "
                                       f"- donated (process peak RSS {rss / 2**30:.2f} GiB)")


# ----------------------------------------------------------------------------- reference


def run_reference(cfg: MixtralConfig, batch: dict[str, np.ndarray], steps: int, warmup: int,
                  experts_impl: str = "auto", compile: str = "auto") -> dict:
    """`zephyr_jax.bench_reference` in a child process on this config and batch; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, batch_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "batch.npz")
        with open(cfg_path, "w") as fh:
            json.dump({**cfg.to_hf(), "dtype": cfg.param_dtype}, fh)
        np.savez(batch_path, **batch)
        cmd = [sys.executable, "-m", "zephyr_jax.bench_reference", "--hf-config", cfg_path,
               "--batch", batch_path, "--steps", str(steps), "--warmup", str(warmup),
               "--experts-impl", experts_impl, "--compile", compile]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"reference step failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- grouped GEMM


# Pallas grouped-GEMM tile candidates (bm, bk, bn, num_warps, num_stages) tried by `--gemm` on a GPU.
# Each compiles for an H100 (tests/test_gpu_aot.py): with the larger tiles the dx kernel, whose
# [bm, bn] x [bn, bk] blocks are the forward's transposed, needs 2 stages to fit shared memory.
GMM_TILES = ((128, 64, 128, 8, 3), (128, 64, 128, 4, 4), (128, 64, 256, 8, 2), (64, 64, 128, 4, 4),
             (128, 128, 128, 8, 3), (256, 64, 128, 8, 2))
# tokamax Mosaic-GPU (Hopper) block configs tried, each for its forward, dx and dw kernels alike
# (`bench --gemm` reports dx and dw apart, so the best of each can differ); tokamax's own sm90
# heuristic is 64 x 64 x 128 output x contraction tiles, 2 stages, not persistent (the plain
# "tokamax_mosaic" row). Shared memory: (bm x bk + bk x bn) x 2 bytes x stages + the output tile
# stays under Hopper's 227 KiB for each.
TOKAMAX_TILES = (
    {"block_m": 128, "block_n": 64, "block_k": 128, "num_stages": 4, "split_k": 1,
     "persistent": False, "grid_minor_dim": "M", "grid_tile_width": 1},
    {"block_m": 64, "block_n": 128, "block_k": 128, "num_stages": 4, "split_k": 1,
     "persistent": False, "grid_minor_dim": "M", "grid_tile_width": 1},
    {"block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4, "split_k": 1,
     "persistent": True, "grid_minor_dim": "N", "grid_tile_width": 4},
    {"block_m": 128, "block_n": 64, "block_k": 128, "num_stages": 4, "split_k": 1,
     "persistent": True, "grid_minor_dim": "N", "grid_tile_width": 8},
)
# scan_gmm row-tile sizes tried: CPU, and larger tiles on accelerators (the one the model runs is
# dispatch.SCAN_ROWS)
SCAN_TILE_CANDIDATES = {"cpu": (128, 256)}
SCAN_TILE_CANDIDATES_ACCEL = (256, 512, 1024)


def bench_grouped_gemm(cfg: MixtralConfig, pairs: int, seq_len: int, platform: str, *,
                       repeats: int = 10, only: list[str] | None = None,
                       skip: list[str] | None = None, emit=None) -> list[dict]:
    """The expert layer's up-projection (rows routed to experts, hidden -> intermediate) through
    every grouped GEMM this platform can run, forward and backward (dx, dw), against a dense matmul
    of the same FLOPs and the equal-capacity batched einsum `[E, C, d] x [E, d, f]`: PERF.md's table
    for this config. `jax.lax.ragged_dot`; `scan_gmm` at `SCAN_TILE_CANDIDATES`; on a GPU our Pallas `gmm` at
    each of `GMM_TILES` (off a GPU it is Pallas' interpreter, far too slow to time); tokamax's
    Mosaic ragged_dot where installed, with its heuristics and at each of `TOKAMAX_TILES`.
    Backward rows time the VJP alone (forward residuals precomputed), at twice the forward's
    FLOPs; the tile candidates also time dx and dw alone. `only` / `skip`: keep / drop the cases
    whose names start with one of these."""
    from zephyr_jax.kernels import gmm, scan_gmm

    d, f, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    M = 2 * pairs * seq_len * cfg.num_experts_per_tok
    M -= M % E
    dt = jnp.dtype(cfg.dtype)
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, d), dt)
    w = (0.02 * jax.random.normal(kw, (E, d, f), jnp.float32)).astype(dt)
    dy = jax.random.normal(kd, (M, f), dt)
    even = jnp.full((E,), M // E, jnp.int32)
    r = M // 2 // max(E - 1, 1)  # skewed: half the rows (or more) to expert 0
    skewed = jnp.array([M - (E - 1) * r] + [r] * (E - 1), jnp.int32)
    # an expert-parallel receive buffer with one expert per device (8 experts on 8 devices, top-2):
    # a quarter of its rows routed, all to that expert, the rest past the groups; these rows'
    # FLOP/s count the routed rows only
    quarter = jnp.zeros((E,), jnp.int32).at[0].set(M // 4)
    flops = 2.0 * M * d * f
    useful = {}  # case name -> fraction of `flops` it computes usefully (default 1)

    # (name, fn(x, w), time the backward too, group sizes for the error check or None); kernel
    # tile candidates also time dx and dw apart (name in `split`)
    split = set()
    cases = [("dense_matmul_same_flops", lambda x, w: x @ w.reshape(E * d, f)[:d], True, None),
             ("batched_einsum_capacity",
              lambda x, w: jnp.einsum("ecd,edf->ecf", x.reshape(E, M // E, d), w), True, None),
             ("ragged_dot", lambda x, w: jax.lax.ragged_dot(x, w, even), True, None),
             ("ragged_dot_skewed", lambda x, w: jax.lax.ragged_dot(x, w, skewed), False, None)]
    for bm in SCAN_TILE_CANDIDATES.get(platform, SCAN_TILE_CANDIDATES_ACCEL):
        cases.append((f"scan_gmm[bm={bm}]", lambda x, w, bm=bm: scan_gmm(x, w, even, bm=bm),
                      True, even))
        split.add(cases[-1][0])
    cases.append(("scan_gmm_skewed", lambda x, w: scan_gmm(x, w, skewed), False, skewed))
    cases.append(("ragged_dot_quarter_routed", lambda x, w: jax.lax.ragged_dot(x, w, quarter),
                  True, None))
    cases.append(("scan_gmm_quarter_routed", lambda x, w: scan_gmm(x, w, quarter), True, quarter))
    if platform == "gpu":
        for bm, bk, bn, nw, ns in GMM_TILES:
            fn = (lambda x, w, t=(bm, bk, bn, nw, ns):
                  gmm(x, w, even, bm=t[0], bk=t[1], bn=t[2], num_warps=t[3], num_stages=t[4]))
            cases.append((f"pallas_gmm[{bm},{bk},{bn},w{nw},s{ns}]", fn, True, even))
            split.add(cases[-1][0])
        # the launch order (kernels/grouped_gemm.py Tiles.l2_order) against the default's
        t = GMM_TILES[0]
        cases.append((f"pallas_gmm[{t[0]},{t[1]},{t[2]},w{t[3]},s{t[4]},rows-first]",
                      lambda x, w, t=t: gmm(x, w, even, bm=t[0], bk=t[1], bn=t[2], num_warps=t[3],
                                            num_stages=t[4], l2_order=False), True, even))
        split.add(cases[-1][0])
        cases.append(("pallas_gmm_skewed", lambda x, w: gmm(x, w, skewed), False, skewed))
        cases.append(("pallas_gmm_quarter_routed", lambda x, w: gmm(x, w, quarter), True, quarter))
    if dispatch.tokamax_available():
        tokamax_dot = dispatch.GROUPED_MATMULS["tokamax"]
        cases.append(("tokamax_mosaic", lambda x, w: tokamax_dot(x, w, even), True, even))
        cases.append(("tokamax_mosaic_skewed", lambda x, w: tokamax_dot(x, w, skewed), False,
                      skewed))
        cases.append(("tokamax_mosaic_quarter_routed", lambda x, w: tokamax_dot(x, w, quarter),
                      True, quarter))
        for t in TOKAMAX_TILES:
            dot = dispatch.tokamax_matmul(t, t, t)
            fn = (lambda x, w, dot=dot: dot(x, w, even))
            cases.append((f"tokamax_tuned[{_tile_name(t)}]", fn, True, even))
            split.add(cases[-1][0])
    names = [c[0] for c in cases]
    useful.update({n: 0.25 for n in names if n.endswith("_quarter_routed")})
    if only:
        cases = [c for c in cases if c[0].startswith(tuple(only))]
    if skip:
        cases = [c for c in cases if not c[0].startswith(tuple(skip))]
    if not cases:  # a mistyped prefix would otherwise time nothing and look like success
        raise ValueError(f"no grouped-GEMM case left by --gemm-only {only} / --gemm-skip {skip}; "
                         f"the cases on {platform}: {', '.join(names)}")
    base = {"rows": M, "d": d, "f": f, "experts": E, "dtype": cfg.dtype}
    rows = []
    for name, fn, with_bwd, sizes in cases:
        rows.append({"op": name, **base,
                     **({"useful_fraction": useful[name]} if name in useful else {}),
                     **_time_case(fn, x, w, dy, flops * useful.get(name, 1.0), with_bwd, repeats,
                                  sizes, name in split)})
        if emit is not None:  # `emit(rows so far, cases)` after each case
            emit(list(rows), len(cases))
    return rows


def _tile_name(t: dict) -> str:
    return (f"{t['block_m']}x{t['block_n']}x{t['block_k']},s{t['num_stages']},"
            f"{'persistent' if t['persistent'] else 'grid'},{t['grid_minor_dim']}{t['grid_tile_width']}")


def _time_case(fn, x, w, dy, flops: float, with_bwd: bool, repeats: int, sizes=None,
               split: bool = False) -> dict:
    """Best-of-`repeats` forward (and VJP) time of `fn(x, w)`; a failure is reported, not raised.

    For a grouped GEMM (`sizes` given) also its max relative error against `jax.lax.ragged_dot`
    on the same groups: output, and with `with_bwd` dx and dw (a kernel's correctness on the
    device it is timed on)."""
    row = {}
    try:
        fwd = jax.jit(fn)
        row["fwd_s"] = _best_time(lambda: fwd(x, w), repeats)
        row["fwd_tflops"] = flops / row["fwd_s"] / 1e12
        if with_bwd:
            _, vjp_fn = jax.vjp(fn, x, w)
            bwd = jax.jit(lambda vjp_fn, g: vjp_fn(g))
            g = dy.reshape(jax.eval_shape(fn, x, w).shape)
            row["bwd_s"] = _best_time(lambda: bwd(vjp_fn, g), repeats)
            row["bwd_tflops"] = 2 * flops / row["bwd_s"] / 1e12
            if split:  # each cotangent alone: jit drops the other kernel
                for i, part in enumerate(("dx", "dw")):
                    one = jax.jit(lambda vjp_fn, g, i=i: vjp_fn(g)[i])
                    row[f"{part}_s"] = _best_time(lambda one=one: one(vjp_fn, g), repeats)
                    row[f"{part}_tflops"] = flops / row[f"{part}_s"] / 1e12
        if sizes is not None:
            row.update(_errors_vs_ragged_dot(fn, x, w, dy, sizes, with_bwd))
    except Exception as e:  # a failing candidate (a kernel that does not build) is a result
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def _errors_vs_ragged_dot(fn, x, w, dy, sizes, with_bwd: bool) -> dict:
    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))

    y, vjp_fn = jax.jit(lambda x, w: jax.vjp(fn, x, w))(x, w)
    y_ref, vjp_ref = jax.jit(lambda x, w: jax.vjp(
        lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w))(x, w)
    out = {"rel_err_vs_ragged_dot": rel(y, y_ref)}
    if with_bwd:
        (dx, dw), (dx_ref, dw_ref) = vjp_fn(dy), vjp_ref(dy)
        out.update(dx_rel_err_vs_ragged_dot=rel(dx, dx_ref), dw_rel_err_vs_ragged_dot=rel(dw, dw_ref))
    return out


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    return min(_timed(lambda: jax.block_until_ready(fn())) for _ in range(repeats))


# ----------------------------------------------------------------------------- reporting


def spread(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": float(np.median(times)), "max": max(times)}


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "trl"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="bench | small | a preset name | a YAML path (default: bench on GPU, small else)")
    p.add_argument("--reference", choices=("none", "hf"), default="none")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--batch-pairs", type=int, default=None, help="preference pairs per step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--moe-impl", default=None,
                   help=f"one or a comma-separated list of {', '.join(MOE_IMPLS)}: each is timed "
                        "in this run against the one reference (default: the config's, auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute and parameter dtype (default: the config's)")
    p.add_argument("--attention-impl", default=None,
                   help=f"one or a comma-separated list of {', '.join(ATTENTION_IMPLS)} (cudnn: "
                        "cuDNN flash attention, NVIDIA GPUs); with a --moe-impl list, every pair "
                        "is timed (default: the config's, xla)")
    p.add_argument("--remat", default=None,
                   help=f"one or a comma-separated list of {', '.join(REMAT_POLICIES)}: with the "
                        "other lists, every combination is timed (default: the config's)")
    p.add_argument("--scan-layers", default=None,
                   help="true, false or true,false: the decoder layers as one scan, or unrolled "
                        "(no per-layer residual copies; longer compile); with the other lists, "
                        "every combination is timed (default: the config's, true)")
    p.add_argument("--loss-chunk-size", type=int, default=CHUNK_SIZE,
                   help=f"positions per LM-head chunk of the loss (default {CHUNK_SIZE}); at least the "
                   "sequence length: one chunk, whose logits are kept for the backward pass "
                   "instead of recomputed")
    p.add_argument("--peak-tflops", type=float, default=None, help="declare the MFU peak")
    p.add_argument("--require-platform", default=None, metavar="PLATFORM",
                   help="stop at once unless jax runs on this platform (gpu, tpu, cpu): a GPU "
                        "session must not time the bench model on the host CPU")
    p.add_argument("--experts-impl", default="auto", help="reference: grouped_mm | eager | auto")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="reference: torch.compile (auto: on CUDA only, eager if it fails)")
    p.add_argument("--gemm", action="store_true", help="time the expert grouped GEMM instead")
    p.add_argument("--gemm-only", default=None,
                   help="with --gemm: comma-separated name prefixes of the cases to run "
                        "(e.g. dense_matmul,tokamax_tuned)")
    p.add_argument("--gemm-skip", default=None,
                   help="with --gemm: comma-separated name prefixes of cases to leave out")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if a.loss_chunk_size < 1:
        p.error(f"--loss-chunk-size {a.loss_chunk_size}: must be >= 1")
    a.moe_impls = a.moe_impl.split(",") if a.moe_impl else []
    a.attention_impls = a.attention_impl.split(",") if a.attention_impl else []
    a.remats = a.remat.split(",") if a.remat else []
    scans = a.scan_layers.split(",") if a.scan_layers else []
    for flag, given, allowed in (("--moe-impl", a.moe_impls, MOE_IMPLS),
                                 ("--attention-impl", a.attention_impls, ATTENTION_IMPLS),
                                 ("--remat", a.remats, REMAT_POLICIES),
                                 ("--scan-layers", scans, ("true", "false"))):
        for impl in given:
            if impl not in allowed:
                p.error(f"{flag} {impl!r}: must be one of {', '.join(allowed)}")
    a.scan_layers_list = [v == "true" for v in scans]
    return a


def measure_step(a: argparse.Namespace, device: jax.Device, name: str, cfg: MixtralConfig,
                 pairs: int, seq: int, emit=None) -> dict:
    """Our step for each (moe_impl, attention_impl, remat, scan_layers) combination of the lists (and, with
    `--reference hf`, the reference first, once): the result JSON's fields. The top-level numbers
    are the first combination's; `variants` holds one entry per combination (a failing one
    records its error and the rest still run). `emit(result so far)` runs after the reference
    and after each variant."""
    batch = make_batch(cfg.vocab_size, pairs, seq)
    tokens = 2 * pairs * seq
    combos = [(m, att, r, sc) for m in (a.moe_impls or [cfg.moe_impl])
              for att in (a.attention_impls or [cfg.attention_impl])
              for r in (a.remats or [cfg.remat])
              for sc in (a.scan_layers_list or [cfg.scan_layers])]
    log(f"device {device.platform}:{device.device_kind}; config {name} (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts top-"
        f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, {cfg.dtype}); variants "
        f"{', '.join('/'.join(map(_layers_word, c)) for c in combos)} "
        "(moe/attention/remat/layers); "
        f"{pairs} pairs x {seq} tokens = {tokens} tokens/step; loss chunks of "
        f"{min(a.loss_chunk_size, seq)} positions")
    ref, ref_error = None, None
    if a.reference == "hf":
        try:
            ref = run_reference(cfg, batch, a.steps, a.warmup, a.experts_impl, a.compile)
        except RuntimeError as e:
            ref_error = str(e)
            log(f"reference failed: {ref_error}")
        for err in (ref or {}).get("errors", []):
            log(f"reference variant failed, fell back: {err}")

    peak, peak_source = peak_flops(device, cfg.dtype, a.peak_tflops)
    fpt = flops_per_token(cfg, seq)
    log(f"MFU = tokens/s x FLOPs/token / peak; FLOPs/token = {fpt / 1e6:,.1f} M (6 x active matmul "
        f"params + 6 x layers x seq x hidden); peak {peak / 1e12:.4g} TFLOP/s [{peak_source}]")
    # logged before our variants run, so a run cut short still has the reference in its log
    ref_fields = {} if ref is None else _compare(ref, tokens, fpt, peak)
    variants = []

    def result() -> dict:
        first = variants[0] if variants else {}
        out = {"tokens_per_s": first.get("tokens_per_s"), "mfu": first.get("mfu"),
               "reference_tokens_per_s": ref_fields.get("reference_tokens_per_s"),
               "ratio": first.get("ratio"), "device": f"{device.platform}:{device.device_kind}",
               **versions(), "config": name, "batch_pairs": pairs, "seq_len": seq,
               "tokens_per_step": tokens, **{k: v for k, v in first.items() if k != "ratio"},
               "dtype": cfg.dtype, "remat": cfg.remat, "loss_chunk_size": a.loss_chunk_size,
               "steps": a.steps, "warmup": a.warmup, "flops_per_token": fpt, "peak_flops": peak,
               "peak_source": peak_source, **ref_fields, "variants": list(variants),
               "variants_planned": len(combos)}
        if ref_error is not None:
            out["reference_error"] = ref_error
        return out

    if emit is not None and ref is not None:
        emit(result())
    for m, att, r, sc in combos:
        v = _measure_variant(a, device, cfg, dict(moe_impl=m, attention_impl=att, remat=r,
                                                  scan_layers=sc), batch, tokens, fpt, peak)
        if ref is not None and v.get("tokens_per_s"):
            v["ratio"] = v["tokens_per_s"] / ref_fields["reference_tokens_per_s"]
            log(f"ratio ours ({v['moe_impl']}, {v['attention_impl']}, remat {v['remat']}, "
                f"layers {_layers_word(v['scan_layers'])}) / "
                f"reference tokens/s = {v['ratio']:.3f}"
                + ("" if ref_fields["reference_compiled"] or device.platform != "gpu" else
                   f" (against the reference's fallback {ref_fields['reference_impl']}, not "
                   "torch.compile)"))
        variants.append(v)
        if emit is not None and len(variants) < len(combos):
            emit(result())
    return result()


def _layers_word(value):
    """How a variant runs its layers, for the log (other combination fields pass through)."""
    if isinstance(value, bool):
        return "scanned" if value else "unrolled"
    return value


def _measure_variant(a: argparse.Namespace, device: jax.Device, cfg: MixtralConfig,
                     variant: dict[str, str], batch: dict[str, np.ndarray], tokens: int,
                     fpt: float, peak: float) -> dict:
    """One implementation's step (`cfg` with `variant`'s moe_impl, attention_impl, remat and
    scan_layers):
    fresh weights (the step donates its state), compile, time."""
    out = {**variant, "moe_impl_resolved": dispatch.resolve(variant["moe_impl"], device.platform,
                                                            cfg.dtype)}
    tag = out["moe_impl"] + (f" -> {out['moe_impl_resolved']}" if out["moe_impl"] == "auto" else "")
    tag += (f", attention {out['attention_impl']}, remat {out['remat']}, layers "
            f"{_layers_word(out['scan_layers'])}")
    try:
        cfg = cfg.replace(**variant)  # a combination the config rejects is this variant's error
        compiled, state, device_batch, compile_s = build_step(cfg, init_params(cfg), batch,
                                                              chunk_size=a.loss_chunk_size)
        check_fits(device, compiled)
        times, loss0, grad_norm0 = time_ours(compiled, state, device_batch, a.steps, a.warmup)
        mem, mem_label = memory_report(device, compiled)
    except Exception as e:  # a kernel that does not build here is a result, not the end of the run
        out["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        log(f"ours ({tag}): failed: {out['error']}")
        return out
    ours = spread(times)
    tps = tokens / ours["median"]
    out.update(tokens_per_s=tps, mfu=tps * fpt / peak, step_time_s=ours, compile_s=compile_s,
               peak_memory_bytes=mem, peak_memory_label=mem_label,
               compiled_memory_bytes=compiled_memory(compiled), loss_step0=loss0,
               grad_norm_step0=grad_norm0)
    log(f"ours ({tag}): step {ours['median'] * 1e3:.1f} ms median (min {ours['min'] * 1e3:.1f}, "
        f"max {ours['max'] * 1e3:.1f}) over {a.steps} steps after {a.warmup} warm-up; compile "
        f"{compile_s:.1f} s; {tps:,.0f} tokens/s; MFU {100 * out['mfu']:.2f}%; step-0 loss "
        f"{loss0:.5f}, grad norm {grad_norm0:.5f}; peak memory {_gib(mem)} ({mem_label}); "
        f"this step's XLA estimate {_gib(out['compiled_memory_bytes'])}")
    return out


def _compare(ref: dict, tokens: int, fpt: float, peak: float) -> dict:
    """The reference's fields of the result, logged."""
    r = spread(ref["step_times_s"])
    ref_tps = tokens / r["median"]
    log(f"reference (transformers {ref['transformers']} + torch {ref['torch']}, experts "
        f"{ref['impl']}, {ref['device']}): step {r['median'] * 1e3:.1f} ms median (min "
        f"{r['min'] * 1e3:.1f}, max {r['max'] * 1e3:.1f}); {ref_tps:,.0f} tokens/s; MFU "
        f"{100 * ref_tps * fpt / peak:.2f}%; step-0 loss {ref['loss_step0']:.5f}")
    log(f"reference: peak memory {_gib(ref['peak_memory_bytes'])} ({ref['peak_memory_label']})")
    return {"reference_tokens_per_s": ref_tps,
            "reference_mfu": ref_tps * fpt / peak, "reference_impl": ref["impl"],
            "reference_device": ref["device"], "reference_step_time_s": r,
            "reference_peak_memory_bytes": ref["peak_memory_bytes"],
            "reference_peak_memory_label": ref["peak_memory_label"],
            "reference_loss_step0": ref["loss_step0"], "reference_errors": ref["errors"],
            # on a GPU the reference is grouped_mm + torch.compile unless that failed: a ratio
            # against the eager fallback would read ~1.33x better (PERF.md's two anchors)
            "reference_compiled": ref["impl"].endswith("+compile"),
            "reference_fallback": bool(ref["errors"]),
            "reference_torch_threads": ref["torch_threads"]}


def measure_gemm(a: argparse.Namespace, device: jax.Device, name: str, cfg: MixtralConfig,
                 pairs: int, seq: int, emit=None) -> dict:
    """Every grouped-GEMM case, each logged as it is measured; `emit(result so far)` after each
    case but the last."""
    only = a.gemm_only.split(",") if a.gemm_only else None
    skip = a.gemm_skip.split(",") if a.gemm_skip else None

    def result(rows):
        return {"device": f"{device.platform}:{device.device_kind}", "config": name,
                "gemm": rows, **versions()}

    def done(rows, total):
        r = rows[-1]
        bwd = f", backward {r['bwd_tflops']:.3f} TFLOP/s" if "bwd_tflops" in r else ""
        if "dx_tflops" in r:
            bwd += f" (dx {r['dx_tflops']:.3f}, dw {r['dw_tflops']:.3f})"
        errs = ", ".join(f"{k.split('_vs_')[0]} {v:.1e}" for k, v in r.items() if "_vs_" in k)
        errs = f" (vs ragged_dot: {errs})" if errs else ""
        log(f"{r['op']}: " + (r["error"] if "error" in r else
                              f"forward {r['fwd_tflops']:.3f} TFLOP/s{bwd}{errs}"))
        if emit is not None and len(rows) < total:
            emit({**result(rows), "gemm_planned": total})

    try:
        rows = bench_grouped_gemm(cfg, pairs, seq, device.platform, only=only, skip=skip,
                                  emit=done)
    except ValueError as e:
        raise SystemExit(f"bench --gemm: {e}") from None
    return result(rows)


MEM_FRACTION_NAMES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # new, old


def set_mem_fraction(environ) -> None:
    """`BENCH_MEM_FRACTION` under the current name only, unless the user set either name.

    Never both: jaxlib's CUDA plugin options (`xla_client.generate_pjrt_gpu_plugin_options`, jax
    0.10 and 0.11) raise when both are set, jax's plugin loader only logs that, and jax then runs
    on the host CPU: the bench would have timed our step on the GPU machine's CPU."""
    if not any(n in environ for n in MEM_FRACTION_NAMES):
        environ[MEM_FRACTION_NAMES[0]] = str(BENCH_MEM_FRACTION)


def _print_partial(result: dict) -> None:
    """What is measured so far, as a JSON line, so a run its time cap kills still leaves every
    finished measurement (`docs/gpu_check.sh` keeps the last JSON line)."""
    print(json.dumps({**result, "partial": True}), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.reference == "hf":  # the child process needs GPU memory JAX would otherwise preallocate
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # the child has exited before our variants allocate: let them use 90% of the device
        # rather than jax's default 75% limit (which holds without preallocation too), the
        # margin `python -m zephyr_jax.gpu_aot` showed the bench's dense step needs on an H200
        set_mem_fraction(os.environ)
    device = jax.devices()[0]
    if a.require_platform and device.platform != a.require_platform:
        raise SystemExit(f"bench --require-platform {a.require_platform}: jax runs on "
                         f"{device.platform} ({device.device_kind}); its {a.require_platform} "
                         "backend did not start (see jax's log above)")
    # each variant's moe_impl is set per variant (`measure_step`): a combination the config
    # rejects (tokamax with float32) is then that variant's error, not the run's
    name, cfg = cli_config("bench", a.config, device.platform, None, a.dtype,
                           attention_impl=(a.attention_impls or [None])[0],
                           remat=(a.remats or [None])[0])
    pairs = a.batch_pairs or default_shape(name)[0]
    seq = a.seq_len or default_shape(name)[1]
    result = (measure_gemm if a.gemm else measure_step)(a, device, name, cfg, pairs, seq,
                                                        emit=_print_partial)
    print(json.dumps(result), flush=True)
    failed = "reference_error" in result or any("error" in v for v in result.get("variants", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
