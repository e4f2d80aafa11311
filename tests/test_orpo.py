"""ORPO objective against TRL's own ORPOTrainer code (torch, CPU), and the chunked path against the plain one.

TRL is driven through its real methods on a namespace standing in for the trainer: the fake model
returns fixed logits, so `get_batch_loss_metrics` -> `concatenated_forward` -> `concatenated_inputs`,
`get_batch_logps`, the NLL and `odds_ratio_loss` all run as written in
trl/experimental/orpo/orpo_trainer.py.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.orpo import ORPOTrainer
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

from zephyr_jax import orpo

RTOL = 1e-5  # float32 against the reference; part of the spec, do not loosen
METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    "nll_loss", "log_odds_ratio", "log_odds_chosen",
)


# ---------------------------------------------------------------------------------------------
# data


def _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V, pad_token_id=0):
    """Right-padded pairs as TRL tokenizes them: labels = input_ids with prompt and pads at -100."""
    B = len(prompt_lens)
    batch = {}
    prompt = rng.integers(1, V, size=(B, T))
    for side, lens in (("chosen", chosen_lens), ("rejected", rejected_lens)):
        ids = np.full((B, T), pad_token_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        labels = np.full((B, T), -100, np.int32)
        answer = rng.integers(1, V, size=(B, T))
        for b, (p, n) in enumerate(zip(prompt_lens, lens, strict=True)):
            assert p + n <= T
            ids[b, :p] = prompt[b, :p]
            ids[b, p : p + n] = answer[b, :n]
            mask[b, : p + n] = 1
            labels[b, p : p + n] = ids[b, p : p + n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _next_token_onehot(batch, side, V):
    """[B, T, V] one-hot of the token each position predicts (attended positions only)."""
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    B, T = ids.shape
    out = np.zeros((B, T, V), np.float32)
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t + 1]:
                out[b, t, ids[b, t + 1]] = 1.0
    return out


def _random_logits(rng, batch, V, scale=2.0, offset=1.0, label_boost=(1.0, 0.0)):
    """Logits with a non-zero mean (logits/* metrics are then well conditioned) and a mild
    preference for the chosen tokens (margins well away from 0)."""
    out = []
    for side, boost in zip(("chosen", "rejected"), label_boost, strict=True):
        B, T = batch[f"{side}_input_ids"].shape
        x = offset + scale * rng.standard_normal((B, T, V)).astype(np.float32)
        out.append(x + boost * _next_token_onehot(batch, side, V))
    return out


def _peaked_logits(rng, batch, V, peaks=(13.0, 11.0)):
    """Almost certain next tokens: label log-probs of order -1e-4 .. -1e-5, where ORPO's log1mexp
    needs their relative precision."""
    out = []
    for side, peak in zip(("chosen", "rejected"), peaks, strict=True):
        B, T = batch[f"{side}_input_ids"].shape
        x = rng.standard_normal((B, T, V)).astype(np.float32)
        out.append(x + peak * _next_token_onehot(batch, side, V))
    return out


CASES = {
    # name: (prompt_lens, chosen_lens, rejected_lens, T, V)
    "ragged": ([3, 7, 1], [9, 2, 14], [5, 8, 15], 16, 48),
    "one_pair_full": ([4], [12], [12], 16, 40),
    "long": ([37, 180], [300, 91], [120, 331], 512, 16),
}


# ---------------------------------------------------------------------------------------------
# TRL driver


def _trl_loss_metrics(chosen_logits, rejected_logits, batch, beta, dtype, aux_loss=None, aux_coef=0.0):
    """TRL's `get_batch_loss_metrics` on fixed logits, computed in `dtype`, with the batch as TRL's
    collator pads it: to its longest row (ours may be padded further, e.g. to `max_length`;
    that must change no metric, `logits/*` included, which TRL takes over the padded width)."""
    width = int(max(np.asarray(batch[f"{side}_attention_mask"]).sum(-1).max()
                    for side in ("chosen", "rejected")))
    batch = {k: np.asarray(v)[:, :width] for k, v in batch.items()}
    chosen_logits, rejected_logits = (np.asarray(x)[:, :width] for x in (chosen_logits, rejected_logits))
    trainer = SimpleNamespace(
        beta=beta,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=aux_loss is not None,
        aux_loss_coef=aux_coef,
        concatenated_inputs=ORPOTrainer.concatenated_inputs,  # static methods
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    trainer.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, trainer)
    trainer.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, trainer)
    all_logits = torch.cat([torch.from_numpy(np.array(chosen_logits)),
                            torch.from_numpy(np.array(rejected_logits))]).to(dtype)

    def model(input_ids, attention_mask=None, use_cache=False, **kwargs):
        assert tuple(input_ids.shape) == tuple(all_logits.shape[:2])
        aux = None if aux_loss is None else torch.tensor(aux_loss, dtype=dtype)
        return SimpleNamespace(logits=all_logits, aux_loss=aux)

    torch_batch = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, model, torch_batch)
    return float(loss), metrics


def _rel(ours, ref):
    ours, ref = float(ours), float(ref)
    if ours == ref:
        return 0.0
    return abs(ours - ref) / abs(ref) if ref != 0 else math.inf


def _assert_matches(ours_loss, ours_metrics, ref_loss, ref_metrics, rtol=RTOL):
    assert set(ours_metrics) == set(METRIC_KEYS)
    errs = {"loss": _rel(ours_loss, ref_loss)}
    errs.update({k: _rel(ours_metrics[k], ref_metrics[k]) for k in METRIC_KEYS})
    bad = {k: (e, float(ours_metrics.get(k, ours_loss)), float(ref_metrics.get(k, ref_loss)))
           for k, e in errs.items() if not e <= rtol}
    assert not bad, bad
    return max(errs.values())


def _arr_rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _jnp_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.cache
def _jitted_loss(beta, aux_coef=0.0, nll_reduction="tokens"):
    def f(chosen, rejected, batch, aux=None):
        return orpo.orpo_loss(chosen, rejected, batch, beta, aux, aux_coef, nll_reduction=nll_reduction)
    return jax.jit(f)


@functools.cache
def _jitted_grad(beta):
    def f(chosen, rejected, batch):
        return orpo.orpo_loss(chosen, rejected, batch, beta)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


# ---------------------------------------------------------------------------------------------
# orpo_loss against TRL


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.float64], ids=["trl_fp32", "trl_fp64"])
def test_matches_trl(case, ref_dtype):
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES[case]
    rng = np.random.default_rng(0)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    chosen, rejected = _random_logits(rng, batch, V)
    beta = 0.05
    loss, metrics = _jitted_loss(beta)(jnp.asarray(chosen), jnp.asarray(rejected), _jnp_batch(batch))
    ref_loss, ref_metrics = _trl_loss_metrics(chosen, rejected, batch, beta, ref_dtype)
    err = _assert_matches(loss, metrics, ref_loss, ref_metrics)
    print(f"{case} vs TRL {ref_dtype}: max rel err {err:.2e}")


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_matches_trl_near_zero_logps(beta):
    # Against TRL in float64: at log-probs ~ -1e-4 float32 logsumexp (TRL's float32 path) is itself
    # off by ~1e-3 relative, so only a float64 reference can check 1e-5.
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES["ragged"]
    rng = np.random.default_rng(1)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    chosen, rejected = _peaked_logits(rng, batch, V)
    loss, metrics = _jitted_loss(beta)(jnp.asarray(chosen), jnp.asarray(rejected), _jnp_batch(batch))
    assert -1e-3 < float(metrics["logps/chosen"]) < 0 and -1e-2 < float(metrics["logps/rejected"]) < 0
    ref_loss, ref_metrics = _trl_loss_metrics(chosen, rejected, batch, beta, torch.float64)
    err = _assert_matches(loss, metrics, ref_loss, ref_metrics)
    print(f"near-zero logps beta={beta} vs TRL fp64: max rel err {err:.2e}")


def test_aux_loss_added_with_coefficient():
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES["ragged"]
    rng = np.random.default_rng(2)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    chosen, rejected = (jnp.asarray(x) for x in _random_logits(rng, batch, V))
    # a coefficient large enough that 1e-5 of the total would expose a wrong scale
    jb, aux, coef = _jnp_batch(batch), 2.75, 0.1
    base, _ = _jitted_loss(0.05)(chosen, rejected, jb)
    with_aux, metrics = _jitted_loss(0.05, coef)(chosen, rejected, jb, jnp.float32(aux))
    assert _rel(with_aux, float(base) + coef * aux) <= RTOL
    assert set(metrics) == set(METRIC_KEYS)
    ref_loss, ref_metrics = _trl_loss_metrics(np.asarray(chosen), np.asarray(rejected), batch, 0.05,
                                              torch.float64, aux_loss=aux, aux_coef=coef)
    _assert_matches(with_aux, metrics, ref_loss, ref_metrics)
    # coefficient 0 (Mixtral-8x22B's output_router_logits=false run): the aux loss is ignored
    zero, _ = _jitted_loss(0.05, 0.0)(chosen, rejected, jb, jnp.float32(aux))
    assert float(zero) == float(base)


def test_nll_sequences_is_trl_with_one_pair_per_device():
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES["ragged"]
    rng = np.random.default_rng(3)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    chosen, rejected = _random_logits(rng, batch, V)
    _, metrics = _jitted_loss(0.05, nll_reduction="sequences")(
        jnp.asarray(chosen), jnp.asarray(rejected), _jnp_batch(batch))
    per_device = [
        _trl_loss_metrics(chosen[b : b + 1], rejected[b : b + 1],
                          {k: v[b : b + 1] for k, v in batch.items()}, 0.05, torch.float64)[1]
        for b in range(len(prompt_lens))
    ]
    assert _rel(metrics["nll_loss"], np.mean([m["nll_loss"] for m in per_device])) <= RTOL
    for k in ("rewards/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen",
              "logits/chosen", "logits/rejected"):  # each pair padded to its own longer row
        assert _rel(metrics[k], np.mean([m[k] for m in per_device])) <= RTOL, k


def test_concat_pairs_matches_trl_concatenated_inputs():
    rng = np.random.default_rng(4)
    V = 30
    batch = _make_batch(rng, [2, 5], [6, 3], [4, 9], 14, V, pad_token_id=7)
    # a shorter rejected side: TRL pads it to the chosen length
    short = {k: (v[:, :10] if k.startswith("rejected") else v) for k, v in batch.items()}
    ours = orpo.concat_pairs(_jnp_batch(short), pad_token_id=7)
    ref = ORPOTrainer.concatenated_inputs(
        {k: torch.from_numpy(v).long() for k, v in short.items()}, padding_value=7)
    for name, x in zip(("input_ids", "attention_mask", "labels"), ours, strict=True):
        np.testing.assert_array_equal(np.asarray(x), ref[f"concatenated_{name}"].numpy())


# ---------------------------------------------------------------------------------------------
# numerical safety


def test_log1mexp_matches_trl_and_has_finite_gradients():
    x = np.concatenate([
        -np.logspace(-12, 3, 200), [-math.log(2.0), -0.6931471, -0.6931472, -1e-30, -1e-45],
    ]).astype(np.float32)
    ours = np.asarray(orpo.log1mexp(jnp.asarray(x)))
    ref = trl_log1mexp(torch.from_numpy(x).double()).numpy()
    # above the cap, and where the answer is subnormal in float32 (XLA's CPU flushes those to 0),
    # the float64 reference is not a float32 number to compare with
    usable = (x < -1e-20) & (np.abs(ref) >= np.finfo(np.float32).tiny)
    np.testing.assert_allclose(ours[usable], ref[usable], rtol=RTOL, atol=0)
    grads = np.asarray(jax.vmap(jax.grad(orpo.log1mexp))(jnp.asarray(np.append(x, [0.0, -np.inf]))))
    assert np.all(np.isfinite(grads[:-1])), grads
    assert not np.any(np.isnan(grads))
    x64 = x.astype(np.float64)
    analytic = -np.exp(x64) / -np.expm1(x64)  # d/dx log(1 - e^x)
    np.testing.assert_allclose(grads[: len(x)][usable], analytic[usable], rtol=1e-5)


@pytest.mark.parametrize("kind", ["random", "near_zero", "exactly_zero"])
def test_gradients_finite(kind):
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES["ragged"]
    rng = np.random.default_rng(5)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    if kind == "random":
        logits = _random_logits(rng, batch, V)
    elif kind == "near_zero":
        logits = _peaked_logits(rng, batch, V)
    else:  # label log-probs round to exactly 0 in float32: TRL's log1mexp(0) is -inf here
        logits = _peaked_logits(rng, batch, V, peaks=(200.0, 150.0))
    chosen, rejected = (jnp.asarray(x) for x in logits)
    (loss, metrics), (g_chosen, g_rejected) = _jitted_grad(0.05)(chosen, rejected, _jnp_batch(batch))
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(np.asarray(g_chosen))) and np.all(np.isfinite(np.asarray(g_rejected)))
    if kind != "exactly_zero":  # there every softmax is exactly one-hot: the gradient is exactly 0
        assert np.any(np.asarray(g_chosen) != 0)
    else:
        assert float(metrics["logps/chosen"]) == 0.0
        ref_loss, _ = _trl_loss_metrics(*logits, batch, 0.05, torch.float32)
        assert not np.isfinite(ref_loss)  # what TRL does; documented in zephyr_jax.orpo


def test_pairs_without_label_tokens_are_left_out():
    prompt_lens, chosen_lens, rejected_lens, T, V = CASES["ragged"]
    rng = np.random.default_rng(6)
    batch = _make_batch(rng, prompt_lens, chosen_lens, rejected_lens, T, V)
    batch["rejected_labels"][1] = -100  # e.g. an answer truncated away
    chosen, rejected = _random_logits(rng, batch, V)
    (loss, metrics), grads = _jitted_grad(0.05)(jnp.asarray(chosen), jnp.asarray(rejected), _jnp_batch(batch))
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    # the label-less pair gets no odds-ratio gradient through its rejected row
    assert not np.any(np.asarray(grads[1])[1])

    trl_loss, _ = _trl_loss_metrics(chosen, rejected, batch, 0.05, torch.float64)
    assert math.isnan(trl_loss)  # TRL: 0/0 in get_batch_logps

    keep = [0, 2]
    _, ref = _trl_loss_metrics(chosen[keep], rejected[keep], {k: v[keep] for k, v in batch.items()},
                               0.05, torch.float64)
    for k in METRIC_KEYS:
        if k.startswith(("rewards/", "logps/", "log_odds")):
            assert _rel(metrics[k], ref[k]) <= RTOL, k
    # the NLL still covers all chosen rows
    _, full_ref = _trl_loss_metrics(chosen, rejected, {**batch, "rejected_labels": batch["chosen_labels"]},
                                    0.05, torch.float64)
    assert _rel(metrics["nll_loss"], full_ref["nll_loss"]) <= RTOL


def test_no_label_tokens_anywhere_is_finite():
    rng = np.random.default_rng(7)
    batch = _make_batch(rng, [3, 5], [4, 2], [1, 4], 10, 12)
    batch["chosen_labels"][:] = -100
    chosen, rejected = _random_logits(rng, batch, 12)
    loss, metrics = _jitted_loss(0.05)(jnp.asarray(chosen), jnp.asarray(rejected), _jnp_batch(batch))
    assert np.isfinite(float(loss))
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["log_odds_ratio"]) == 0.0
    assert float(loss) == float(metrics["nll_loss"])


# ---------------------------------------------------------------------------------------------
# the chunked path from hidden states


def _hidden_case(seed, B=3, T=12, D=16, V=40, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    prompt_lens = [2, 5, 1][:B]
    batch = _make_batch(rng, prompt_lens, [6, 3, 11][:B], [9, 7, 4][:B], T, V)  # chosen row 2 fills all T: no padding
    hidden = jnp.asarray(rng.standard_normal((2 * B, T, D)), dtype)
    head = jnp.asarray(rng.standard_normal((D, V)) / np.sqrt(D) + 0.3, dtype)
    return _jnp_batch(batch), hidden, head


@functools.partial(jax.jit, static_argnames=("coef",))
def _plain_from_hidden(hidden, head, batch, beta, aux=None, coef=0.0):
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), head.astype(jnp.float32))
    B = logits.shape[0] // 2
    return orpo.orpo_loss(logits[:B], logits[B:], batch, beta, aux, coef)


@functools.cache
def _plain_reference_with_grads():
    batch, hidden, head = _hidden_case(8)

    def plain(h, w):
        return _plain_from_hidden(h, w, batch, 0.1, jnp.float32(1.3), 0.01)

    return jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(hidden, head)


@pytest.mark.parametrize("chunk_size", [5, 4, 64], ids=["5_ragged_last", "4_divides", "64_over_T"])
def test_from_hidden_matches_plain_path(chunk_size):
    batch, hidden, head = _hidden_case(8)  # T = 12

    def chunked(h, w):
        return orpo.orpo_loss_from_hidden(h, w, batch, 0.1, jnp.float32(1.3), 0.01, chunk_size=chunk_size)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, head)
    (ref_loss, ref_metrics), ref_grads = _plain_reference_with_grads()
    err = _assert_matches(loss, metrics, ref_loss, ref_metrics)
    grad_errs = [_arr_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    assert max(grad_errs) <= RTOL, grad_errs
    print(f"chunk {chunk_size}: value/metrics {err:.2e}, grad hidden {grad_errs[0]:.2e}, head {grad_errs[1]:.2e}")


def test_from_hidden_bf16_inputs_accumulate_in_float32():
    batch, hidden, head = _hidden_case(9, dtype=jnp.bfloat16)
    loss, metrics = jax.jit(functools.partial(orpo.orpo_loss_from_hidden, beta=0.05, chunk_size=4))(
        hidden, head, batch)
    ref_loss, ref_metrics = _plain_from_hidden(hidden, head, batch, 0.05)
    assert loss.dtype == jnp.float32
    _assert_matches(loss, metrics, ref_loss, ref_metrics)


def test_token_logps_from_hidden_matches_token_logps():
    batch, hidden, head = _hidden_case(10)
    _, _, labels = orpo.concat_pairs(batch)
    targets = jnp.stack([orpo.next_token_targets(labels), orpo.next_token_targets(labels[::-1])])
    logps, logit_sum = jax.jit(functools.partial(orpo.token_logps_from_hidden, chunk_size=5))(
        hidden, head, targets)
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    assert _arr_rel(logps, jax.jit(orpo.token_logps)(logits, targets)) <= RTOL
    assert _arr_rel(logit_sum, logits.sum(-1)) <= RTOL
    ref = jax.nn.log_softmax(logits)  # the textbook form, for good measure
    t = targets[0]
    textbook = jnp.where(t >= 0, jnp.take_along_axis(ref, jnp.maximum(t, 0)[..., None], -1)[..., 0], 0.0)
    assert _arr_rel(logps[0], textbook) <= RTOL


def _equations(jaxpr, outside_loops: bool = False):
    """Every equation of `jaxpr` and of its sub-jaxprs (pjit, checkpoint, custom VJP bodies), and
    of scan / while bodies unless `outside_loops` (what runs once per step, not once per chunk)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if outside_loops and eqn.primitive.name in ("scan", "while"):
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner, outside_loops)


def _largest_intermediate(closed_jaxpr, outside_loops: bool = False):
    """Largest array any equation produces (see `_equations`)."""
    return max((math.prod(v.aval.shape) for eqn in _equations(closed_jaxpr.jaxpr, outside_loops)
                for v in eqn.outvars if hasattr(v.aval, "shape")), default=0)


def test_from_hidden_builds_no_chunk_sized_constants_outside_the_loop(monkeypatch):
    """Loop-invariant [2B, C, V] arrays (e.g. a `jnp.where` broadcasting the vocab iota) are hoisted
    by jax out of the chunk loop and materialized: 1.5 GiB at the bench shapes. The log-probs and
    their VJP build none; control: the log-normalizer written with `jnp.where` makes one."""
    B, T, D, V, C = 2, 64, 8, 512, 16
    batch, hidden, head = _hidden_case(11, B=B, T=T, D=D, V=V)

    def grad_jaxpr():
        loss = lambda h, w: orpo.orpo_loss_from_hidden(h, w, batch, 0.05, chunk_size=C)[0]
        return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head)

    assert _largest_intermediate(grad_jaxpr(), outside_loops=True) < 2 * B * C * V

    def where_normalizer(logits_BTV):
        top_BT1 = jnp.max(logits_BTV, axis=-1, keepdims=True)
        vocab_V = jax.lax.broadcasted_iota(jnp.int32, (1, 1, V), 2)
        pivot_BT1 = jnp.min(jnp.where(logits_BTV == top_BT1, vocab_V, V), axis=-1, keepdims=True)
        rest_BT = jnp.sum(jnp.where(vocab_V == pivot_BT1, 0.0, jnp.exp(logits_BTV - top_BT1)), -1)
        return top_BT1[..., 0], jnp.log1p(rest_BT)

    monkeypatch.setattr(orpo, "_log_normalizer", where_normalizer)
    assert _largest_intermediate(grad_jaxpr(), outside_loops=True) >= 2 * B * C * V


def test_lm_head_backward_matmuls_run_in_bf16():
    """bf16 hidden states and head: the logits are float32 (accumulated in float32), and the
    backward pass's two vocabulary matmuls take bf16 operands, the float32 cotangent rounded
    first, as transformers' bf16 head gets a bf16 gradient. Control: plain autodiff of the float32
    einsum multiplies the float32 cotangent (a float32 matmul on a GPU). Gradients agree with the
    control to bf16 precision."""
    B, T, D, V = 2, 24, 16, 96
    ks = jax.random.split(jax.random.key(5), 3)
    hidden = jax.random.normal(ks[0], (B, T, D)).astype(jnp.bfloat16)
    head = (0.3 * jax.random.normal(ks[1], (D, V))).astype(jnp.bfloat16)
    targets = jax.random.randint(ks[2], (2, B, T), -1, V)

    def grads():
        loss = lambda h, w: jnp.sum(orpo.token_logps_from_hidden(h, w, targets, chunk_size=8)[0])
        return (jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head),
                jax.grad(loss, argnums=(0, 1))(hidden, head))

    def vocab_dot_operands(closed):
        """Operand dtypes of every matmul (all of them touch the vocabulary here)."""
        return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in _equations(closed.jaxpr)
                if eqn.primitive.name == "dot_general"]

    jaxpr, got = grads()
    dots = vocab_dot_operands(jaxpr)
    assert len(dots) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots

    plain = lambda h, w: jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orpo, "head_logits", plain)
        jaxpr, want = grads()
    assert ("float32", "bfloat16") in vocab_dot_operands(jaxpr)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 2**-7 * np.abs(w).max()


def test_from_hidden_never_builds_full_logits():
    B, T, D, V, C = 2, 64, 8, 512, 16
    batch, hidden, head = _hidden_case(11, B=B, T=T, D=D, V=V)
    full = 2 * B * T * V

    def grad_of(loss_fn):
        return jax.make_jaxpr(jax.grad(lambda h, w: loss_fn(h, w)[0], argnums=(0, 1)))(hidden, head)

    chunked = grad_of(lambda h, w: orpo.orpo_loss_from_hidden(h, w, batch, 0.05, chunk_size=C))
    plain = grad_of(lambda h, w: _plain_from_hidden(h, w, batch, 0.05))
    assert _largest_intermediate(plain) >= full  # the probe sees the tensor when it is there
    assert _largest_intermediate(chunked) <= 2 * B * C * V
