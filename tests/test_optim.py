"""Schedules and AdamW against transformers / torch, the references the seed run trained with.

Tolerances (fixed from float32 arithmetic, not fitted to results):
- schedules: 1e-7 relative to HF's float64 value (a float32 result alone carries up to 6e-8).
- parameters after clip + AdamW steps vs torch in float32: 4 float32 ulps at the tensor's largest
  magnitude (the two sides round `p * (1 - lr * wd) - lr * u` in a different order).
- the update itself vs torch in float64: 1e-6 of the tensor's largest update (~8 float32 epsilons).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from zephyr_jax.optim import (
    SCHEDULER_TYPES,
    _stochastic_round_bf16,
    global_norm,
    hf_weight_decay_mask,
    make_optimizer,
    make_schedule,
)

# ----------------------------------------------------------------------------- schedules


def _hf_scheduler(name, optimizer, warmup, total, timescale=None):
    if name == "inverse_sqrt":
        return transformers.get_inverse_sqrt_schedule(optimizer, warmup, timescale=timescale)
    if name == "linear":
        return transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if name == "constant":
        return transformers.get_constant_schedule(optimizer)
    return transformers.get_constant_schedule_with_warmup(optimizer, warmup)


def _hf_lrs(name, lr, warmup, total, n_steps, timescale=None) -> np.ndarray:
    """The lr each optimizer step runs with, in the HF Trainer's order of calls.

    The Trainer calls optimizer.step() (which uses the current lr), logs get_last_lr(), then
    lr_scheduler.step(). So step k (0-based) runs with get_last_lr() after k scheduler steps.
    """
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = _hf_scheduler(name, opt, warmup, total, timescale)
    lrs = []
    for _ in range(n_steps):
        lrs.append(sched.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == lrs[-1]  # the lr optimizer.step() would use
        opt.step()
        sched.step()
    return np.asarray(lrs, np.float64)


def _ours(schedule, n_steps) -> np.ndarray:
    # jit over a traced int32 vector: the way optax calls it inside a jitted train step.
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n_steps, dtype=jnp.int32)), np.float64)


def _max_rel(ours, ref) -> float:
    assert np.all(ours[ref == 0] == 0), "lr must be exactly 0 where HF's is"
    nz = ref != 0
    return float(np.max(np.abs(ours[nz] - ref[nz]) / ref[nz]))


@pytest.mark.parametrize("name", SCHEDULER_TYPES)
@pytest.mark.parametrize("lr", [5e-6, 3e-4])
def test_schedule_matches_transformers(name, lr):
    """Steps 0..1000, warmup 100, total 1000 (the recipe's lr and warmup among them)."""
    ref = _hf_lrs(name, lr, warmup=100, total=1000, n_steps=1001)
    ours = _ours(make_schedule(name, lr, warmup_steps=100, total_steps=1000), 1001)
    assert _max_rel(ours, ref) <= 1e-7
    if name != "constant":
        assert ours[0] == 0.0  # HF's first optimizer step runs at lr 0


@pytest.mark.parametrize("name", ["linear", "cosine", "inverse_sqrt", "constant_with_warmup"])
@pytest.mark.parametrize("warmup,total", [(0, 300), (7, 300), (300, 200)])
def test_schedule_edge_cases_and_past_total(name, warmup, total):
    """No warmup, odd warmup, warmup longer than training; and 2.5x past total_steps (HF's cosine
    rises again there, linear stays at 0)."""
    n = int(2.5 * max(total, warmup)) + 1
    ref = _hf_lrs(name, 1e-4, warmup, total, n)
    assert _max_rel(_ours(make_schedule(name, 1e-4, warmup, total), n), ref) <= 1e-7


@pytest.mark.parametrize("timescale", [None, 50, 1000])
def test_inverse_sqrt_timescale(timescale):
    ref = _hf_lrs("inverse_sqrt", 5e-6, 100, 0, 1001, timescale=timescale)
    ours = _ours(make_schedule("inverse_sqrt", 5e-6, 100, 0, timescale=timescale), 1001)
    assert _max_rel(ours, ref) <= 1e-7


def test_schedule_python_int_and_unknown_type():
    schedule = make_schedule("inverse_sqrt", 5e-6, 100, 1000)
    assert float(schedule(100)) == pytest.approx(5e-6, rel=1e-7)
    assert float(schedule(400)) == pytest.approx(2.5e-6, rel=1e-7)
    with pytest.raises(ValueError, match="lr_scheduler_type.*inverse_sqrt.*constant_with_warmup"):
        make_schedule("polynomial", 5e-6, 100, 1000)


# ----------------------------------------------------------------------------- AdamW vs torch

_SHAPES = {"w_in": (4, 6), "embed": (10, 3), "stacked": (2, 3, 5), "vec": (7,)}


def _problem(n_steps):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in _SHAPES.items()}
    # Global norm ~100 >> max_grad_norm 1.0, so every step clips.
    grads = [
        {k: (10 * rng.standard_normal(s)).astype(np.float32) for k, s in _SHAPES.items()}
        for _ in range(n_steps)
    ]
    return params, grads


def _torch_run(params, grads, dtype, lr, wd, sched_name, warmup):
    """HF Trainer's step: clip_grad_norm_, AdamW.step, lr_scheduler.step. Returns the parameters
    before each step and after the last one, and the pre-clip norms."""
    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    sched = transformers.get_scheduler(
        sched_name, opt, num_warmup_steps=warmup, num_training_steps=len(grads)
    )
    trajectory, norms = [], []
    for g in grads:
        trajectory.append({k: p.detach().numpy().copy() for k, p in tp.items()})
        for k, p in tp.items():
            p.grad = torch.tensor(g[k], dtype=dtype)
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)))
        opt.step()
        sched.step()
    trajectory.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return trajectory, norms


# one step at a constant lr; three of the recipe's schedule kind (warmup 1: lr 0, lr, lr/sqrt2)
_RUNS = [(1, "constant", 0), (3, "inverse_sqrt", 1)]


@pytest.mark.parametrize("n_steps,sched_name,warmup", _RUNS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(n_steps, sched_name, warmup, wd):
    lr = 1e-3  # large enough that the steps show in float32 parameters of magnitude ~1
    params, grads = _problem(n_steps)
    tx = make_optimizer(make_schedule(sched_name, lr, warmup, n_steps), weight_decay=wd)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), updates, state, global_norm(g)

    # (1) parameters along our own float32 trajectory vs torch float32's, and the clip norms.
    torch32, torch_norms = _torch_run(params, grads, torch.float32, lr, wd, sched_name, warmup)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for t, g in enumerate(grads):
        p, _, state, norm = step(p, state, jax.tree.map(jnp.asarray, g))
        assert float(norm) == pytest.approx(torch_norms[t], rel=1e-6)
    for k, ref in torch32[-1].items():
        ulp = np.spacing(np.max(np.abs(ref)).astype(np.float32))
        np.testing.assert_allclose(np.asarray(p[k]), ref, rtol=0, atol=4 * ulp, err_msg=k)
    assert not np.allclose(torch32[-1]["w_in"], params["w_in"])  # the steps did move

    # (2) each step's update vs torch float64's, starting from torch's own parameters, so the
    # comparison sees the AdamW arithmetic rather than accumulated parameter rounding.
    torch64, _ = _torch_run(params, grads, torch.float64, lr, wd, sched_name, warmup)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    for t, g in enumerate(grads):
        before = {k: jnp.asarray(v, jnp.float32) for k, v in torch64[t].items()}
        _, updates, state, _ = step(before, state, jax.tree.map(jnp.asarray, g))
        for k in updates:
            ref = torch64[t + 1][k] - torch64[t][k]
            scale = np.max(np.abs(ref))
            if scale == 0:  # the lr-0 first warmup step
                assert np.all(np.asarray(updates[k]) == 0), k
                continue
            err = np.max(np.abs(np.asarray(updates[k], np.float64) - ref)) / scale
            assert err <= 1e-6, (t, k, err)


def test_no_clip_below_max_norm_and_disabled():
    params = {"a": jnp.ones((3,))}
    small = {"a": jnp.full((3,), 0.1)}
    clipped = make_optimizer(1.0, max_grad_norm=1.0)
    unclipped = make_optimizer(1.0, max_grad_norm=0.0)
    u1, _ = clipped.update(small, clipped.init(params), params)
    u2, _ = unclipped.update(small, unclipped.init(params), params)
    # torch multiplies by min(1, 1 / (0.173 + 1e-6)) = 1 exactly: no change below the threshold.
    np.testing.assert_array_equal(np.asarray(u1["a"]), np.asarray(u2["a"]))
    # Same state structure with and without clipping (checkpoints stay interchangeable).
    assert jax.tree.structure(clipped.init(params)) == jax.tree.structure(unclipped.init(params))


def test_hf_weight_decay_mask():
    params = {
        "embed": 0,
        "layers": {"input_norm": 0, "post_attn_norm": 0, "wq": 0, "router": 0, "w_gate": 0},
        "final_norm": 0,
        "lm_head": 0,
        "head": {"bias": 0},
    }
    mask = hf_weight_decay_mask(params)
    assert mask["embed"] and mask["layers"]["wq"] and mask["layers"]["router"] and mask["lm_head"]
    assert mask["layers"]["w_gate"]
    assert not mask["layers"]["input_norm"] and not mask["layers"]["post_attn_norm"]
    assert not mask["final_norm"] and not mask["head"]["bias"]

    # With decay on, the optimizer leaves norm weights undecayed (zero gradient -> zero update).
    p = {"final_norm": jnp.ones((4,)), "wq": jnp.ones((4,))}
    g = jax.tree.map(jnp.zeros_like, p)
    tx = make_optimizer(1.0, weight_decay=0.5)
    u, _ = tx.update(g, tx.init(p), p)
    assert np.all(np.asarray(u["final_norm"]) == 0)
    np.testing.assert_allclose(np.asarray(u["wq"]), -0.5)


# ----------------------------------------------------------------------------- bf16 moments


def test_bf16_moments_dtype_and_close_to_fp32():
    n_steps, lr = 5, 1e-3
    params, grads = _problem(n_steps)
    schedule = make_schedule("constant", lr, 0, n_steps)
    fp32 = make_optimizer(schedule, weight_decay=0.1)
    bf16 = make_optimizer(schedule, weight_decay=0.1, moment_dtype=jnp.bfloat16)

    p32 = p16 = jax.tree.map(jnp.asarray, params)
    s32, s16 = fp32.init(p32), bf16.init(p16)
    assert jax.tree.structure(s32) == jax.tree.structure(s16)

    @jax.jit
    def both_steps(p32, s32, p16, s16, g):
        u32, s32 = fp32.update(g, s32, p32)
        u16, s16 = bf16.update(g, s16, p16)
        return optax.apply_updates(p32, u32), s32, optax.apply_updates(p16, u16), s16

    for g in grads:
        p32, s32, p16, s16 = both_steps(p32, s32, p16, s16, jax.tree.map(jnp.asarray, g))

    adam16 = s16[1][0]
    assert isinstance(adam16, optax.ScaleByAdamState)
    for leaf in jax.tree.leaves((adam16.mu, adam16.nu)):
        assert leaf.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves((s32[1][0].mu, s32[1][0].nu)):
        assert leaf.dtype == jnp.float32
    for k in params:
        assert p16[k].dtype == jnp.float32
        moved = np.max(np.abs(np.asarray(p32[k]) - params[k]))
        # bf16 keeps 8 mantissa bits: moments within ~0.4%, so trajectories within ~1% of the move.
        assert np.max(np.abs(np.asarray(p16[k]) - np.asarray(p32[k]))) <= 1e-2 * moved, k


def test_bf16_second_moment_still_decays():
    """With b2 = 0.999, round-to-nearest bf16 would freeze nu; stochastic rounding tracks fp32."""
    p = {"x": jnp.zeros((4096,))}
    g0 = {"x": jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, 4096), jnp.float32)}
    zeros = {"x": jnp.zeros((4096,))}

    def nu_after(tx, n_zero_steps):
        state = tx.init(p)
        update = jax.jit(tx.update)
        _, state = update(g0, state, p)
        for _ in range(n_zero_steps):
            _, state = update(zeros, state, p)
        return np.asarray(state[1][0].nu["x"], np.float64)

    n = 150
    ref = nu_after(make_optimizer(1e-3), n)
    sr = nu_after(make_optimizer(1e-3, moment_dtype=jnp.bfloat16), n)
    rtn = nu_after(make_optimizer(1e-3, moment_dtype=jnp.bfloat16, stochastic_rounding=False), n)
    assert np.mean(sr / ref) == pytest.approx(1.0, abs=2e-3)
    # The failure stochastic rounding prevents: nu stuck near its first value (0.999^150 = 0.86).
    assert np.mean(rtn / ref) > 1.1


def test_stochastic_round_unbiased_and_deterministic():
    x = jnp.full((300, 400), 1.0 + 2.0**-10, jnp.float32)  # 1/8 of the way from 1 to the next bf16
    stream = jnp.uint32(7)
    r = np.asarray(_stochastic_round_bf16(x, stream), np.float32)
    assert _stochastic_round_bf16(x, stream).dtype == jnp.bfloat16
    assert set(np.unique(r)) == {1.0, 1.0 + 2.0**-7}
    up = r > 1.0
    # P(up) = 1/8 overall and along each axis (the hash uses every index); 5 sigma bounds.
    assert up.mean() == pytest.approx(1 / 8, abs=5 * np.sqrt(1 / 8 * 7 / 8 / up.size))
    row_sigma, col_sigma = np.sqrt(1 / 8 * 7 / 8 / 400), np.sqrt(1 / 8 * 7 / 8 / 300)
    assert np.max(np.abs(up.mean(axis=1) - 1 / 8)) < 5 * row_sigma
    assert np.max(np.abs(up.mean(axis=0) - 1 / 8)) < 5 * col_sigma
    assert not np.array_equal(up[0], up[1]) and not np.array_equal(up[:, 0], up[:, 1])
    # Deterministic in the stream, different across streams.
    np.testing.assert_array_equal(r, np.asarray(_stochastic_round_bf16(x, stream), np.float32))
    assert not np.array_equal(r, np.asarray(_stochastic_round_bf16(x, jnp.uint32(8)), np.float32))
    # Values bf16 already represents are never moved.
    exact = jnp.asarray([0.0, 1.5, -2.0, 2.0**-100], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(_stochastic_round_bf16(exact, stream), np.float32), exact
    )
