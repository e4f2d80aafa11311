"""The benchmark: its CLI contract, its FLOP count, and that both timed steps compute the same loss.

Correctness only; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zephyr_jax import bench
from zephyr_jax.config import MixtralConfig
from zephyr_jax.pretrained import save_pretrained

torch = pytest.importorskip("torch")
bench_reference = pytest.importorskip("zephyr_jax.bench_reference")

REQUIRED = ("tokens_per_s", "mfu", "reference_tokens_per_s", "ratio", "device", "jax", "jaxlib",
            "torch", "transformers", "config", "batch_pairs", "seq_len", "moe_impl")


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_with_reference_ends_in_json(capsys):
    rc = bench.main(["--config", "tiny", "--steps", "2", "--warmup", "1", "--reference", "hf",
                     "--batch-pairs", "1", "--seq-len", "32"])
    assert rc == 0
    result = _last_json(capsys.readouterr().out)
    assert set(REQUIRED) <= set(result)
    for key in ("tokens_per_s", "mfu", "reference_tokens_per_s", "ratio"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["reference_tokens_per_s"])
    assert result["config"] == "tiny" and result["moe_impl"] == "ragged"
    assert (result["batch_pairs"], result["seq_len"], result["tokens_per_step"]) == (1, 32, 64)
    assert all(result[k] for k in ("jax", "jaxlib", "torch", "transformers", "device"))
    assert result["step_time_s"]["min"] <= result["step_time_s"]["median"] <= result["step_time_s"]["max"]
    assert result["peak_memory_bytes"] > 0 and result["reference_peak_memory_bytes"] > 0


def test_cli_gemm_mode(capsys):
    assert bench.main(["--config", "tiny", "--gemm", "--batch-pairs", "1", "--seq-len", "32"]) == 0
    rows = {r["op"]: r for r in _last_json(capsys.readouterr().out)["gemm"]}
    assert set(rows) >= {"dense_matmul_same_flops", "batched_einsum_capacity", "ragged_dot"}
    for op in ("dense_matmul_same_flops", "batched_einsum_capacity", "ragged_dot"):
        assert rows[op]["fwd_tflops"] > 0 and rows[op]["bwd_tflops"] > 0, rows[op]


@pytest.mark.parametrize(("moe_impl", "experts_impl"),
                         [("ragged", "grouped_mm"), ("dense", "eager")])
def test_reference_loss_equals_ours_at_step0(tmp_path, moe_impl, experts_impl):
    """Same weights (our init, exported with the project's HF writer) and the same bench batch:
    TRL's loss on transformers' model equals our train step's loss, fp32, 1e-4 relative."""
    cfg = MixtralConfig.preset("tiny", moe_impl=moe_impl)
    params = bench.init_params(cfg, seed=3)
    save_pretrained(params, tmp_path / "hf", config=cfg, format="hf")
    batch = bench.make_batch(cfg.vocab_size, pairs=2, seq_len=48, seed=1)

    compiled, state, device_batch, _ = bench.build_step(cfg, params, batch)
    _, ours = bench.time_ours(compiled, state, device_batch, steps=1, warmup=0)

    model = bench_reference.build_model(cfg.to_hf(), "cpu", experts_impl, weights=str(tmp_path / "hf"))
    assert next(model.parameters()).dtype == torch.float32
    step = bench_reference.make_step(model)
    ref = float(step(bench_reference.torch_batch(batch, "cpu")))
    assert abs(ours - ref) <= 1e-4 * abs(ref), (ours, ref)


def test_flops_per_token_is_perf_md_formula():
    """PERF.md's `flops_per_token` (bench/anchor_gpu.py), and its table: 92,782 tokens/s -> 41.5%."""
    cfg = MixtralConfig.preset("bench")
    c = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    d, f, L, V, T = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], 2048
    hd = d // c["num_attention_heads"]
    attn = d * d * 2 + 2 * d * c["num_key_value_heads"] * hd
    act = L * (attn + c["num_experts_per_tok"] * 3 * d * f + d * c["num_local_experts"]) + V * d
    assert bench.flops_per_token(cfg, T) == 6 * act + 6 * L * T * d
    assert 92_782 * bench.flops_per_token(cfg, T) / 989e12 == pytest.approx(0.415, abs=5e-4)


def test_make_batch_is_a_full_length_preference_batch():
    b = bench.make_batch(vocab_size=100, pairs=3, seq_len=40)
    assert {v.shape for v in b.values()} == {(3, 40)}
    np.testing.assert_array_equal(b["chosen_input_ids"][:, :10], b["rejected_input_ids"][:, :10])
    for side in ("chosen", "rejected"):
        assert (b[f"{side}_labels"][:, :10] == -100).all()
        np.testing.assert_array_equal(b[f"{side}_labels"][:, 10:], b[f"{side}_input_ids"][:, 10:])
        assert b[f"{side}_attention_mask"].all()
        assert b[f"{side}_input_ids"].min() >= 3 and b[f"{side}_input_ids"].max() < 100


def test_config_defaults_follow_the_platform(tmp_path):
    name, cfg = bench.resolve_config(None, "gpu")
    assert name == "bench" and cfg == MixtralConfig.preset("bench")
    name, cfg = bench.resolve_config(None, "cpu", moe_impl="dense")
    assert name == "small" and cfg.moe_impl == "dense" and cfg.vocab_size == 32000
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size) == (8, 2, 256)
    assert bench.default_shape("bench") == (4, 2048) and bench.default_shape("small") == (2, 256)
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 64\nhidden_size: 16\nintermediate_size: 32\nnum_hidden_layers: 1\n"
                    "num_attention_heads: 2\nnum_key_value_heads: 1\n")
    name, cfg = bench.resolve_config(str(path), "cpu", dtype="bfloat16")
    assert cfg.hidden_size == 16 and cfg.dtype == cfg.param_dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------
# The Pallas grouped GEMM (zephyr_jax.kernels), in Pallas interpret mode, against jax.lax.ragged_dot

GMM_CASES = {
    # name: (M, K, N, group sizes, blocks); rows past sum(sizes) must come out zero
    "uneven_with_empty_group": (64, 32, 48, [10, 0, 30, 24], dict(bm=16, bk=16, bn=16)),
    "rows_past_the_groups": (64, 32, 48, [10, 0, 30, 14], dict(bm=16, bk=16, bn=16)),
    "padded_to_blocks": (50, 20, 40, [7, 13, 0, 25], dict(bm=16, bk=16, bn=32)),
    "one_group": (128, 64, 64, [128], dict(bm=32, bk=16, bn=32)),
    "no_rows": (32, 32, 32, [0, 0, 0], dict(bm=16, bk=16, bn=16)),
}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("case", sorted(GMM_CASES))
def test_pallas_gmm_equals_ragged_dot_forward_and_grads(case):
    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import gmm

    M, K, N, sizes, blocks = GMM_CASES[case]
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (len(sizes), K, N), jnp.float32)
    dy = jax.random.normal(kd, (M, N), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: gmm(x, w, group_sizes, interpret=True, **blocks), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), x, w)
    if sum(sizes) == 0:
        assert not np.any(y) and not any(np.any(g) for g in vjp(dy))
        return
    assert not np.any(y[sum(sizes):])
    assert _rel_err(y, y_ref) <= 1e-5
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        assert _rel_err(got, want) <= 1e-5


def test_pallas_gmm_work_items_cover_each_row_once():
    import jax.numpy as jnp

    from zephyr_jax.kernels.grouped_gemm import group_bounds, work_items

    M, bm = 96, 16
    for sizes in ([96, 0, 0], [5, 0, 40, 17], [0, 0, 0], [16, 16, 16, 16, 16, 16], [1] * 7):
        starts, ends = group_bounds(jnp.asarray(sizes, jnp.int32), M)
        group, tile = work_items(starts, ends, M, bm)
        assert group.shape == (M // bm + len(sizes),)
        covered = np.zeros(M, int)
        for g, t in zip(np.asarray(group), np.asarray(tile), strict=True):
            rows = np.arange(t * bm, (t + 1) * bm)
            covered[rows[(rows >= starts[g]) & (rows < ends[g])]] += 1
        assert (covered == 1).all(), sizes


def test_pallas_gmm_lowers_through_triton_for_cuda():
    """No GPU needed: Pallas' Triton lowering (where unsupported ops fail) of forward and VJP."""
    import re

    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import gmm

    x = jnp.zeros((512, 256), jnp.bfloat16)
    w = jnp.zeros((4, 256, 384), jnp.bfloat16)
    sizes = jnp.asarray([100, 0, 300, 112], jnp.int32)

    def fwd_bwd(x, w):
        y, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes, interpret=False), x, w)
        return y, vjp(y)

    text = jax.jit(fwd_bwd).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3


def test_pallas_dispatch_in_the_train_step_matches_ragged_dot():
    """The whole step with the kernel swapped in (`--grouped-gemm pallas`): same loss and gradient
    norm as XLA's ragged_dot, fp32."""
    import jax
    import jax.numpy as jnp

    cfg = MixtralConfig.preset("tiny", moe_impl="ragged")
    params = bench.init_params(cfg, seed=2)
    batch = bench.make_batch(cfg.vocab_size, pairs=1, seq_len=16, seed=4)
    metrics = {}
    for kind in ("xla", "pallas"):
        with bench.grouped_gemm(kind):  # the step donates its state: each gets its own params
            compiled, state, device_batch, _ = bench.build_step(
                cfg, jax.tree.map(jnp.copy, params), batch)
        _, metrics[kind] = compiled(state, device_batch)
    for key in ("loss", "grad_norm"):
        assert _rel_err(metrics["pallas"][key], metrics["xla"][key]) <= 1e-5, key
