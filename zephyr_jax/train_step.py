"""Pure train and eval steps: `(state, batch) -> (state, metrics)`.

Batches hold the preference pairs as `chosen_*` / `rejected_*` arrays. The train step takes a
leading gradient-accumulation axis `[A, b, T]` and scans over it, so memory is one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from zephyr_jax.config import MixtralConfig
from zephyr_jax.model import RouterStats, group_aux_loss, model_from_params
from zephyr_jax.optim import global_norm
from zephyr_jax.orpo import concat_pairs, orpo_loss_from_hidden


@struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (int32 scalar)
    params: dict
    opt_state: optax.OptState


def create_train_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_and_metrics(params: dict, batch: dict, model_cfg: MixtralConfig, beta: float, chunk_size: int,
                     nll_reduction: str = "tokens"):
    """ORPO loss of one forward over [chosen; rejected], TRL's metrics, and router statistics."""
    model = model_from_params(model_cfg, params)
    ids_2BT, mask_2BT, _ = concat_pairs(batch)
    hidden_2BTD, stats, _ = model.backbone(ids_2BT, mask_2BT)
    # the aux loss on the batch TRL would see: the whole batch, or each pair alone ("sequences")
    aux_loss = stats.aux_loss if nll_reduction == "tokens" else pair_aux_loss(stats)
    aux = aux_loss if model_cfg.output_router_logits else None
    loss, metrics = orpo_loss_from_hidden(
        hidden_2BTD, model.head_DV(), batch, beta, aux_loss=aux,
        router_aux_loss_coef=model_cfg.router_aux_loss_coef, chunk_size=chunk_size,
        nll_reduction=nll_reduction)
    counts_LE = stats.expert_counts_LE
    router = {
        "router/aux_loss": aux_loss,
        "router/expert_share": counts_LE / jnp.maximum(jnp.sum(counts_LE, -1, keepdims=True), 1.0),
        "router/entropy": stats.entropy_L,
        "router/dropped": stats.dropped.astype(jnp.float32),
        "num_tokens": jnp.sum(mask_2BT).astype(jnp.float32),
    }
    return loss, {**metrics, **router}


def pair_aux_loss(stats: RouterStats) -> jax.Array:
    """The router aux loss as TRL gets it with one preference pair per device (`nll_reduction:
    sequences`): HF's load-balancing loss of each pair's [chosen; rejected] rows alone, averaged
    over the pairs (it is a product of two token means, so the whole batch's is not that mean).
    Pairs without tokens (the evaluator's filler) are left out."""
    B = stats.valid_B.shape[0] // 2
    pairs_BB2 = jnp.eye(B, dtype=jnp.float32)
    groups_B2B = jnp.concatenate([pairs_BB2, pairs_BB2], axis=1)  # pair p: rows p and B + p
    aux_B = group_aux_loss(stats, groups_B2B)
    has_B = (groups_B2B @ stats.valid_B) > 0
    return jnp.sum(jnp.where(has_B, aux_B, 0.0)) / jnp.maximum(jnp.sum(has_B), 1)


def make_train_step(model_cfg: MixtralConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, beta: float, chunk_size: int,
                    nll_reduction: str = "tokens") -> Callable:
    """A pure `(state, batch[A, b, T]) -> (state, metrics)`; jit it with the state donated.

    A step whose loss or gradient norm is not finite is not applied (the state passes through
    unchanged) and reports `finite = 0`, so the host can stop with the last good state intact.
    """

    def train_step(state: TrainState, batch: dict):
        grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
        acc_dtype = jnp.float32  # accumulate bf16 gradients in float32

        def micro(grads_acc, mb):
            (loss, metrics), grads = grad_fn(state.params, mb, model_cfg, beta, chunk_size, nll_reduction)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(acc_dtype), grads_acc, grads)
            return grads_acc, {"loss": loss, **metrics}

        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro == 1:
            # nothing to accumulate: no float32 gradient buffer (4 bytes per parameter), same
            # numbers (a bf16 gradient cast to float32, divided by 1 and cast back is itself)
            (loss, metrics), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch),
                                             model_cfg, beta, chunk_size, nll_reduction)
            per_micro = jax.tree.map(lambda x: x[None], {"loss": loss, **metrics})
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), state.params)
            grads, per_micro = jax.lax.scan(micro, zeros, batch)
        grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, state.params)
        metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_micro)
        metrics["num_tokens"] = jnp.sum(per_micro["num_tokens"])
        grad_norm = global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                       finite=finite.astype(jnp.float32))
        return new, metrics

    return train_step


def make_eval_step(model_cfg: MixtralConfig, beta: float, chunk_size: int,
                   nll_reduction: str = "tokens") -> Callable:
    """A pure `(params, batch[b, T]) -> metrics` (loss included)."""

    def eval_step(params: dict, batch: dict):
        loss, metrics = loss_and_metrics(params, batch, model_cfg, beta, chunk_size, nll_reduction)
        return {"loss": loss, **metrics}

    return eval_step
