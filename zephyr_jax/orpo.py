"""The ORPO objective (Hong et al. 2024) with the exact semantics of TRL's `ORPOTrainer`.

Two entry points share one reduction, so they cannot drift apart:

- `orpo_loss`: from materialized chosen / rejected logits (the reference path; tests, small models).
- `orpo_loss_from_hidden`: from the final hidden states of the stacked `[chosen; rejected]` batch and
  the LM head matrix. Logits exist only one sequence chunk at a time, in forward and backward, so the
  float32 [2B, T, V] tensor (2 x 2048 x 32000 x 4 bytes = 0.5 GB per pair for Mixtral) never does.

Semantics, from `trl/experimental/orpo/orpo_trainer.py` (TRL 1.16; the math is the 2024 version's):

- logps (`get_batch_logps(..., average_log_prob=True)`): mean log-prob of the label tokens after the
  one-position shift (logits[:, :-1] predict labels[:, 1:]); -100 labels are ignored.
- nll (`concatenated_forward`): `nn.CrossEntropyLoss()` (token mean over the whole chosen batch)
  with labels = `input_ids` where `attention_mask == 1` else -100, shifted by one. It is *not* built
  from the labels: the prompt counts, only padding is excluded.
- log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr)); loss = nll - mean(beta * logsigmoid(log_odds)),
  plus `router_aux_loss_coef * aux_loss` when the model config has `output_router_logits`.
- `logits/chosen` / `logits/rejected`: plain mean of `all_logits[:B, :-1, :]` (resp. `[B:]`) over
  every position but the last and every vocab entry, padding and prompt included, no masking.
- `rewards/*` = beta * logps; `rewards/accuracies` = mean of float(beta*lc > beta*lr);
  `log_odds_ratio` = mean(logsigmoid(log_odds)); `log_odds_chosen` = mean(log_odds).

Where TRL gives NaN this module defines a finite answer instead:

- A pair whose chosen or rejected row has no label token: TRL divides 0/0 and the whole loss is NaN.
  Here such pairs are left out of the odds-ratio term and of every pair metric (means over the
  remaining pairs; 0 when none remain). They still count in the NLL and logits/* metrics.
- A chosen batch with no attended token after the shift: TRL's NLL is NaN; here it is 0.
- logps that round to exactly 0 (a numerically certain model): TRL's log1mexp(0) = -inf; here the
  argument is capped at -1e-20 (no float32 mean of log-probs lands in (-1e-14, 0) otherwise).

Shapes in names: B pairs, T sequence, V vocab, D hidden, C chunk length, K target sets, N chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zephyr_jax.sharding import gather_before_loop

IGNORE_INDEX = -100
_LN2 = 0.6931471805599453
# log1mexp(0) = -inf; any float32 mean of log-probs that is not exactly 0 is far below this.
_LOGP_CAP = -1e-20
NLL_REDUCTIONS = ("tokens", "sequences")
PAIR_KEYS = tuple(
    f"{side}_{field}"
    for side in ("chosen", "rejected")
    for field in ("input_ids", "attention_mask", "labels")
)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, TRL's two-branch form, with finite values and gradients.

    Branches at -ln2 like TRL (log1p(-exp(x)) below, log(-expm1(x)) above) to avoid cancellation.
    Each branch gets a harmless stand-in input where it is not taken: `jnp.where` zeroes the
    untaken branch's cotangent, but 0 * inf from its derivative would still be NaN.
    """
    x = jnp.minimum(x, _LOGP_CAP)
    low = x < -_LN2
    x_low = jnp.where(low, x, -1.0)
    x_high = jnp.where(low, -0.5, x)
    return jnp.where(low, jnp.log1p(-jnp.exp(x_low)), jnp.log(-jnp.expm1(x_high)))


def concat_pairs(
    batch: Mapping[str, jax.Array], pad_token_id: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stack chosen over rejected as TRL's `concatenated_inputs` does: `(input_ids, attention_mask, labels)`.

    Each is [2B, T] with T the longer of the two sides; the shorter side is right-padded with
    `pad_token_id` / 0 / -100. The trainer runs one forward over this batch.
    """
    _check_batch(batch)
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def stacked(field: str, pad_value: int) -> jax.Array:
        rows = []
        for side in ("chosen", "rejected"):
            x_BT = jnp.asarray(batch[f"{side}_{field}"])
            rows.append(jnp.pad(x_BT, ((0, 0), (0, T - x_BT.shape[1])), constant_values=pad_value))
        return jnp.concatenate(rows, axis=0)

    return (
        stacked("input_ids", pad_token_id),
        stacked("attention_mask", 0),
        stacked("labels", IGNORE_INDEX),
    )


def nll_labels(input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """TRL's NLL labels: every attended token (prompt included), -100 on padding."""
    return jnp.where(attention_mask_BT == 1, input_ids_BT, IGNORE_INDEX)


def next_token_targets(labels_BT: jax.Array) -> jax.Array:
    """targets[:, t] = labels[:, t + 1]: what position t predicts; the last position predicts nothing."""
    pad_B1 = jnp.full((labels_BT.shape[0], 1), IGNORE_INDEX, labels_BT.dtype)
    return jnp.concatenate([labels_BT[:, 1:], pad_B1], axis=1)


def token_logps(logits_BTV: jax.Array, targets_KBT: jax.Array) -> jax.Array:
    """float32 log-softmax of `logits_BTV` gathered at each of K target arrays; 0 where target < 0.

    Targets are positional (already shifted; see `next_token_targets`). The log-normalizer is
    pivoted on the argmax logit and taken as log1p of the remaining mass, so a log-prob near 0 keeps
    its relative precision: log1mexp(logps) ~ log(-logps) there, and plain `logsumexp` in float32
    rounds 1 + 1e-5 to ~1e-3 relative error.

    The VJP is the closed form d logp_k / d logits = onehot(target_k) - softmax(logits), one fused
    pass over [B, T, V] (autodiff through the pivot's argmax and gathers took 3x as long on CPU).
    """
    return _token_logps(logits_BTV, targets_KBT.astype(jnp.int32))


def _log_normalizer(logits_BTV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(top, log1p(rest)): log sum_v exp(logits) = top + log1p(rest), float32, where rest is the
    mass of everything but one maximal entry relative to it. Kept apart: adding them first would
    round away a log-prob near 0."""
    V = logits_BTV.shape[-1]
    top_BT1 = jnp.max(logits_BTV, axis=-1, keepdims=True)
    vocab_V = jax.lax.broadcasted_iota(jnp.int32, (1, 1, V), 2)
    # the first maximal entry, by a min-reduce: argmax is a variadic reduce, 3x slower on XLA:CPU.
    # Arithmetic on masks rather than `jnp.where`, here and in the VJP: `where` broadcasts its
    # constant operands (the iota, V, 0.0) to [B, C, V] first, and jax hoists those loop-invariant
    # arrays out of the chunk loop: 1.5 GiB of materialized constants at the bench shapes (seen in
    # the step compiled for an H100), read back every chunk.
    not_top_BTV = (logits_BTV != top_BT1).astype(jnp.int32)
    pivot_BT1 = jnp.min(vocab_V + V * not_top_BTV, axis=-1, keepdims=True)
    rest_BT = jnp.sum((vocab_V != pivot_BT1) * jnp.exp(logits_BTV - top_BT1), axis=-1)
    return top_BT1[..., 0], jnp.log1p(rest_BT)


def _gather_logps(logits_BTV, top_BT, log1p_rest_BT, targets_KBT):
    out = []
    for targets_BT in targets_KBT:
        valid_BT = targets_BT >= 0
        safe_BT1 = jnp.where(valid_BT, targets_BT, 0)[..., None]
        picked_BT = jnp.take_along_axis(logits_BTV, safe_BT1, axis=-1)[..., 0]
        out.append(jnp.where(valid_BT, (picked_BT - top_BT) - log1p_rest_BT, 0.0))
    return jnp.stack(out)


@jax.custom_vjp
def _token_logps(logits_BTV, targets_KBT):
    return _token_logps_fwd(logits_BTV, targets_KBT)[0]


def _token_logps_fwd(logits_BTV, targets_KBT):
    f32_BTV = logits_BTV.astype(jnp.float32)
    top_BT, log1p_rest_BT = _log_normalizer(f32_BTV)
    # the dtype travels as an empty array: residuals must be JAX types
    dtype_tag = jnp.zeros((0,), logits_BTV.dtype)
    logps_KBT = _gather_logps(f32_BTV, top_BT, log1p_rest_BT, targets_KBT)
    return logps_KBT, (logits_BTV, top_BT, log1p_rest_BT, targets_KBT, dtype_tag)


def _token_logps_bwd(res, g_KBT):
    logits_BTV, top_BT, log1p_rest_BT, targets_KBT, dtype_tag = res
    valid_KBT = targets_KBT >= 0
    g_KBT = jnp.where(valid_KBT, g_KBT, 0.0)
    vocab_V = jax.lax.broadcasted_iota(jnp.int32, (1, 1, logits_BTV.shape[-1]), 2)
    picked_BTV = sum((vocab_V == t_BT[..., None]) * g_BT[..., None]
                     for t_BT, g_BT in zip(targets_KBT, g_KBT, strict=True))
    # (precision of the sum only matters for the forward's log-probs near 0, not for softmax)
    probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - (top_BT + log1p_rest_BT)[..., None])
    d_BTV = picked_BTV - jnp.sum(g_KBT, axis=0)[..., None] * probs_BTV
    int_zero = jnp.zeros(targets_KBT.shape, jax.dtypes.float0)
    return d_BTV.astype(dtype_tag.dtype), int_zero


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


@jax.custom_vjp
def head_logits(h_BCD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """float32 logits `h @ head` (accumulated in float32 whatever the inputs' dtype).

    Its backward pass runs both matmuls in the inputs' dtype: the logits' float32 cotangent is
    rounded to it first, as in transformers, whose bf16 LM head outputs bf16 logits and so gets a
    bf16 gradient. Autodiff would multiply the float32 cotangent by the bf16 operands as float32
    matmuls (seen in the bench step compiled for an H100: both backward LM-head GEMMs converted
    their bf16 operands to float32), off the GPU's bf16 tensor-core rate, reading twice the bytes.
    """
    return jnp.einsum("bcd,dv->bcv", h_BCD, head_DV, preferred_element_type=jnp.float32)


def _head_logits_fwd(h_BCD, head_DV):
    return head_logits(h_BCD, head_DV), (h_BCD, head_DV)


def _head_logits_bwd(residuals, d_BCV):
    h_BCD, head_DV = residuals
    d_BCV = d_BCV.astype(jnp.promote_types(h_BCD.dtype, head_DV.dtype))
    d_h = jnp.einsum("bcv,dv->bcd", d_BCV, head_DV, preferred_element_type=jnp.float32)
    d_head = jnp.einsum("bcd,bcv->dv", h_BCD, d_BCV, preferred_element_type=jnp.float32)
    return d_h.astype(h_BCD.dtype), d_head.astype(head_DV.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def token_logps_from_hidden(
    hidden_BTD: jax.Array,
    head_DV: jax.Array,
    targets_KBT: jax.Array,
    *,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """`token_logps(hidden @ head, targets)` and the per-position logit sums, chunked over T.

    Returns `(logps_KBT, logit_sum_BT)`; `logit_sum_BT[b, t] = sum_v logits[b, t, v]` (no gradient;
    it feeds the logits/* metrics). Logits are computed in float32 one [B, C, V] chunk at a time
    under `jax.checkpoint` (when there is more than one chunk), so the backward pass recomputes each
    chunk instead of storing it.
    A T that `chunk_size` does not divide is padded with ignored positions.
    """
    B, T, D = hidden_BTD.shape
    K = targets_KBT.shape[0]
    if targets_KBT.shape[1:] != (B, T):
        raise ValueError(f"targets {targets_KBT.shape} do not match hidden {hidden_BTD.shape}")
    if head_DV.shape[0] != D:
        raise ValueError(f"head {head_DV.shape} does not match hidden size {D}")
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_KBT = jnp.pad(targets_KBT, ((0, 0), (0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    head_DV = gather_before_loop(head_DV)  # FSDP: gathered once, not in every chunk
    # chunk axis first, for lax.map; the cotangent of hidden comes back as the same stack of chunks
    hidden_NBCD = hidden_BTD.reshape(B, N, C, D).transpose(1, 0, 2, 3)
    targets_NKBC = targets_KBT.reshape(K, B, N, C).transpose(2, 0, 1, 3)

    def chunk(xs):
        h_BCD, t_KBC = xs
        logits_BCV = head_logits(h_BCD, head_DV)
        logit_sum_BC = jnp.sum(jax.lax.stop_gradient(logits_BCV), axis=-1)
        return token_logps(logits_BCV, t_KBC), logit_sum_BC

    if N > 1:
        # Without the checkpoint, scan would keep every chunk's logits for the backward pass: the
        # very [2B, T, V] tensor this function exists to avoid. One chunk is that tensor anyway,
        # alive at the same point (the start of the backward pass) either way: no recompute then.
        chunk = functools.partial(jax.checkpoint, prevent_cse=False)(chunk)
    logps_NKBC, logit_sum_NBC = jax.lax.map(chunk, (hidden_NBCD, targets_NKBC))
    logps_KBT = logps_NKBC.transpose(1, 2, 0, 3).reshape(K, B, N * C)[:, :, :T]
    logit_sum_BT = logit_sum_NBC.transpose(1, 0, 2).reshape(B, N * C)[:, :T]
    return logps_KBT, logit_sum_BT


class _Stats(NamedTuple):
    """Per-row sums everything else is reduced from; rows are [chosen; rejected] (2B)."""

    logp_sum_2B: jax.Array  # summed label-token log-probs
    n_label_2B: jax.Array  # label-token counts
    nll_sum_B: jax.Array  # summed NLL over attended chosen tokens
    n_nll_B: jax.Array
    logits_mean_2: jax.Array  # (chosen, rejected) TRL's mean logit (`_logits_means`)


def orpo_loss(
    chosen_logits_BTV: jax.Array,
    rejected_logits_BTV: jax.Array,
    batch: Mapping[str, jax.Array],
    beta: float | jax.Array,
    aux_loss: jax.Array | None = None,
    router_aux_loss_coef: float = 0.0,
    *,
    nll_reduction: str = "tokens",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ORPO loss and TRL's metrics from chosen / rejected logits [B, T, V] (any float dtype).

    `batch` holds `{chosen,rejected}_{input_ids,attention_mask,labels}`, each [B, T] int, labels
    aligned with input_ids (this function shifts). `aux_loss` (the router load-balancing loss) is
    added times `router_aux_loss_coef` when given and the coefficient is non-zero.

    `nll_reduction="tokens"` is TRL's token mean over the whole chosen batch. `"sequences"` takes
    each chosen row's token mean, then the mean over rows: what TRL computes in effect when each of
    G data-parallel devices holds one pair (per-device batch 1) and their gradients are averaged.

    Returns `(loss, metrics)`, metrics keyed by TRL's names (float32 scalars, batch means).
    """
    _check_batch(batch)
    for side, logits in (("chosen", chosen_logits_BTV), ("rejected", rejected_logits_BTV)):
        if logits.shape[:2] != batch[f"{side}_labels"].shape:
            raise ValueError(f"{side} logits {logits.shape} do not match labels {batch[f'{side}_labels'].shape}")
    B, T, V = chosen_logits_BTV.shape
    if rejected_logits_BTV.shape != (B, T, V):
        raise ValueError(f"chosen {chosen_logits_BTV.shape} and rejected {rejected_logits_BTV.shape} logits differ")
    chosen_targets_KBT = jnp.stack([
        next_token_targets(batch["chosen_labels"]),
        next_token_targets(nll_labels(batch["chosen_input_ids"], batch["chosen_attention_mask"])),
    ])
    chosen_logps_KBT = token_logps(chosen_logits_BTV, chosen_targets_KBT)
    rejected_logps_1BT = token_logps(
        rejected_logits_BTV, next_token_targets(batch["rejected_labels"])[None]
    )
    logit_sum_2BT = jnp.concatenate([
        jnp.sum(jax.lax.stop_gradient(x[:, :-1]).astype(jnp.float32), axis=-1)
        for x in (chosen_logits_BTV, rejected_logits_BTV)
    ])
    mask_2BT = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    logits_mean_2 = _logits_means(logit_sum_2BT, mask_2BT, B, V, nll_reduction)
    stats = _Stats(
        logp_sum_2B=jnp.concatenate([chosen_logps_KBT[0], rejected_logps_1BT[0]]).sum(-1),
        n_label_2B=_count_targets(
            jnp.concatenate([chosen_targets_KBT[0], next_token_targets(batch["rejected_labels"])])
        ),
        nll_sum_B=-chosen_logps_KBT[1].sum(-1),
        n_nll_B=_count_targets(chosen_targets_KBT[1]),
        logits_mean_2=logits_mean_2,
    )
    return _reduce(stats, beta, aux_loss, router_aux_loss_coef, nll_reduction)


def orpo_loss_from_hidden(
    hidden_BTD: jax.Array,
    head_DV: jax.Array,
    batch: Mapping[str, jax.Array],
    beta: float | jax.Array,
    aux_loss: jax.Array | None = None,
    router_aux_loss_coef: float = 0.0,
    *,
    chunk_size: int = 512,
    nll_reduction: str = "tokens",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`orpo_loss(hidden @ head ...)` without ever holding the [2B, T, V] logits.

    `hidden_BTD` is the final (normed) hidden state of the 2B sequences `concat_pairs(batch)`
    (chosen rows first), `head_DV` the LM head. Other arguments as in `orpo_loss`; `chunk_size`
    is the sequence length of each logits chunk. Peak temporary memory of value-and-grad is about
    three float32 chunks, 3 * 2B * chunk_size * V * 4 bytes (XLA CPU, B=1, T=2048, V=32000,
    chunk 512: 384 MiB, against 2 GiB for the plain path).
    """
    input_ids_2BT, attention_mask_2BT, labels_2BT = concat_pairs(batch)
    B2, T = labels_2BT.shape
    if hidden_BTD.shape[:2] != (B2, T):
        raise ValueError(f"hidden {hidden_BTD.shape} does not match the stacked pairs ({B2}, {T})")
    B = B2 // 2
    label_targets_2BT = next_token_targets(labels_2BT)
    nll_targets_2BT = next_token_targets(nll_labels(input_ids_2BT, attention_mask_2BT))
    # the NLL is over chosen rows only
    nll_targets_2BT = nll_targets_2BT.at[B:].set(IGNORE_INDEX)
    logps_K2BT, logit_sum_2BT = token_logps_from_hidden(
        hidden_BTD, head_DV, jnp.stack([label_targets_2BT, nll_targets_2BT]), chunk_size=chunk_size
    )
    logits_mean_2 = _logits_means(logit_sum_2BT[:, :-1], attention_mask_2BT, B, head_DV.shape[1],
                                  nll_reduction)
    stats = _Stats(
        logp_sum_2B=logps_K2BT[0].sum(-1),
        n_label_2B=_count_targets(label_targets_2BT),
        nll_sum_B=-logps_K2BT[1, :B].sum(-1),
        n_nll_B=_count_targets(nll_targets_2BT[:B]),
        logits_mean_2=logits_mean_2,
    )
    return _reduce(stats, beta, aux_loss, router_aux_loss_coef, nll_reduction)


def _logits_means(logit_sum_2BT: jax.Array, attention_mask_2BT: jax.Array, B: int, V: int,
                  nll_reduction: str) -> jax.Array:
    """TRL's `logits/chosen`, `logits/rejected` [2]: the mean logit over every position but the
    last of each row, padding included, where TRL's collator pads a device batch to its longest
    row. `logit_sum_2BT` [2B, T-1] holds each position's sum over the vocab.

    "tokens" (the batch is one device batch): rows count to the batch's longest row. "sequences"
    (one pair per device): each pair's rows count to the pair's longer one, and the pairs' means
    are averaged (TRL gathers the devices' means). Padding to a fixed `max_length`, as the trainer
    does, thus changes nothing. A row with no attended token is filler (the evaluator pads its
    last batch with such pairs) and counts nowhere; `where`, not a product, keeps its values out.
    """
    T1 = logit_sum_2BT.shape[1]
    len_2B = jnp.sum(attention_mask_2BT.astype(jnp.int32), axis=-1)  # right-padded: the length
    if nll_reduction == "tokens":
        width_2B = jnp.broadcast_to(jnp.max(len_2B), len_2B.shape)
    else:
        pair_B = jnp.maximum(len_2B[:B], len_2B[B:])
        width_2B = jnp.concatenate([pair_B, pair_B])
    keep_2BT = ((jnp.arange(T1)[None, :] < (width_2B - 1)[:, None])
                & (len_2B > 0)[:, None])
    sum_2B = jnp.sum(jnp.where(keep_2BT, logit_sum_2BT, 0.0), axis=-1)
    n_2B = jnp.sum(keep_2BT, axis=-1).astype(jnp.float32) * V
    sum_2, n_2 = jnp.stack([sum_2B[:B], sum_2B[B:]]), jnp.stack([n_2B[:B], n_2B[B:]])
    if nll_reduction == "tokens":
        return _safe_div(sum_2.sum(-1), n_2.sum(-1))
    counted_2 = (n_2 > 0).astype(jnp.float32)
    return _safe_div(jnp.sum(_safe_div(sum_2, n_2) * counted_2, -1), counted_2.sum(-1))


def _count_targets(targets_BT: jax.Array) -> jax.Array:
    return jnp.sum(targets_BT >= 0, axis=-1).astype(jnp.float32)


def _safe_div(num, den):
    return num / jnp.maximum(den, 1.0)


def _reduce(
    s: _Stats,
    beta: float | jax.Array,
    aux_loss: jax.Array | None,
    router_aux_loss_coef: float,
    nll_reduction: str,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    if nll_reduction not in NLL_REDUCTIONS:
        raise ValueError(f"nll_reduction must be one of {NLL_REDUCTIONS}, got {nll_reduction!r}")
    B = s.nll_sum_B.shape[0]
    if nll_reduction == "tokens":
        nll = _safe_div(s.nll_sum_B.sum(), s.n_nll_B.sum())
    else:
        has_nll_B = s.n_nll_B > 0
        nll = _safe_div(jnp.sum(_safe_div(s.nll_sum_B, s.n_nll_B)), jnp.sum(has_nll_B))

    has_labels_2B = s.n_label_2B > 0
    valid_B = has_labels_2B[:B] & has_labels_2B[B:]
    n_valid = jnp.sum(valid_B).astype(jnp.float32)
    # a stand-in logp for label-less rows keeps log1mexp and its gradient finite; the pair is masked
    logps_2B = jnp.where(has_labels_2B, _safe_div(s.logp_sum_2B, s.n_label_2B), -1.0)
    chosen_B, rejected_B = logps_2B[:B], logps_2B[B:]
    log_odds_B = (chosen_B - rejected_B) - (log1mexp(chosen_B) - log1mexp(rejected_B))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)

    def pair_mean(x_B):
        return _safe_div(jnp.sum(jnp.where(valid_B, x_B, 0.0)), n_valid)

    loss = nll - pair_mean(beta * ratio_B)
    if aux_loss is not None and router_aux_loss_coef != 0.0:
        loss = loss + router_aux_loss_coef * aux_loss.astype(jnp.float32)

    chosen_B, rejected_B = jax.lax.stop_gradient(chosen_B), jax.lax.stop_gradient(rejected_B)
    chosen_rewards_B, rejected_rewards_B = beta * chosen_B, beta * rejected_B
    metrics = {
        "rewards/chosen": pair_mean(chosen_rewards_B),
        "rewards/rejected": pair_mean(rejected_rewards_B),
        "rewards/accuracies": pair_mean((chosen_rewards_B > rejected_rewards_B).astype(jnp.float32)),
        "rewards/margins": pair_mean(chosen_rewards_B - rejected_rewards_B),
        "logps/chosen": pair_mean(chosen_B),
        "logps/rejected": pair_mean(rejected_B),
        "logits/chosen": s.logits_mean_2[0],
        "logits/rejected": s.logits_mean_2[1],
        "nll_loss": jax.lax.stop_gradient(nll),
        "log_odds_ratio": jax.lax.stop_gradient(pair_mean(ratio_B)),
        "log_odds_chosen": jax.lax.stop_gradient(pair_mean(log_odds_B)),
    }
    return loss, metrics


def _check_batch(batch: Mapping[str, jax.Array]) -> None:
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise KeyError(f"ORPO batch lacks {missing}")
    for side in ("chosen", "rejected"):
        shapes = {batch[f"{side}_{f}"].shape for f in ("input_ids", "attention_mask", "labels")}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{side} input_ids / attention_mask / labels must share one [B, T] shape: {shapes}")
    if batch["chosen_labels"].shape[0] != batch["rejected_labels"].shape[0]:
        raise ValueError("chosen and rejected batch sizes differ")
