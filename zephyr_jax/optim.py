"""Optimizer and learning-rate schedules with HF Trainer semantics, as optax transformations.

The seed run trained with `adamw_bnb_8bit`, inverse-sqrt schedule (warmup 100), lr 5e-6,
`max_grad_norm` 1.0, weight decay 0. We use a full-precision AdamW instead of bitsandbytes' 8-bit
one (no JAX port, and block-wise 8-bit quantization changes the numerics anyway); the optional
bfloat16 moments below are the memory-saving stand-in.

What "HF semantics" pins down, and where each piece lives:
- schedules (`make_schedule`): HF builds a `LambdaLR`; the optimizer step k (0-based) runs with
  `lr * lambda(k)`, so warmup schedules take their first step at lr 0. optax calls a schedule
  with the update count, which also starts at 0, so `schedule(k) == lr * lambda(k)` with no shift.
  The value HF logs as `learning_rate` at `global_step = k + 1` is that same `lr * lambda(k)`.
- clipping (`clip_by_global_norm_torch`): `torch.nn.utils.clip_grad_norm_`, i.e. scale by
  `min(1, max_norm / (norm + 1e-6))`, not optax's `max_norm / norm` (the 1e-6 differs).
- AdamW (`make_optimizer`): `torch.optim.AdamW`: bias-corrected moments, eps added after the
  square root of v_hat, decoupled decay `p -= lr * wd * p`, applied (as the HF Trainer does) to every
  parameter except biases and norm weights (`hf_weight_decay_mask`).

Example:
    schedule = make_schedule("inverse_sqrt", 5e-6, warmup_steps=100, total_steps=709)
    tx = make_optimizer(schedule, weight_decay=0.0, max_grad_norm=1.0)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULER_TYPES = ("inverse_sqrt", "linear", "cosine", "constant", "constant_with_warmup")

# HF Trainer.get_decay_parameter_names: parameters whose dotted name matches any of these get no decay.
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6).
_TORCH_CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------- schedules


def make_schedule(
    lr_scheduler_type: str,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    timescale: int | None = None,
) -> optax.Schedule:
    """The learning rate for optimizer step `count` (0-based), equal to transformers' schedulers.

    Args:
        lr_scheduler_type: one of `SCHEDULER_TYPES`, named as in `TrainingArguments.lr_scheduler_type`.
        learning_rate: peak learning rate (HF's optimizer `lr`).
        warmup_steps: linear warmup from 0 over this many steps (ignored by `constant`).
        total_steps: number of optimizer steps; used by `linear` and `cosine` only.
        timescale: `inverse_sqrt` only; None means HF's default `warmup_steps or 10_000`.

    Returns:
        An optax schedule: jit-safe for a traced integer count, returns float32.
        `schedule(k) == learning_rate * lambda(k)` where `lambda` is the HF LambdaLR lambda.

    Raises:
        ValueError: unknown `lr_scheduler_type`, or negative steps / learning rate.
    """
    if lr_scheduler_type not in SCHEDULER_TYPES:
        raise ValueError(
            f"lr_scheduler_type={lr_scheduler_type!r} is not supported; allowed values: "
            f"{', '.join(SCHEDULER_TYPES)}"
        )
    if learning_rate < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError(
            f"learning_rate, warmup_steps and total_steps must be >= 0, got "
            f"{learning_rate}, {warmup_steps}, {total_steps}"
        )
    lr = float(learning_rate)
    warmup = int(warmup_steps)
    total = int(total_steps)

    # Float32 has 24 bits, so each rounding costs up to 6e-8 relative. To stay within ~1e-7 of HF's
    # float64 values, every constant below is folded in float64 and rounded once, step counts are
    # combined as exact integers before the single int->float conversion, and each branch does
    # at most two more correctly rounded operations.
    warmup_per_step = lr / max(1, warmup)

    def warmup_lr(step):
        return jnp.float32(warmup_per_step) * step.astype(jnp.float32)

    def with_warmup(step, after_warmup):
        return jnp.where(step < warmup, warmup_lr(step), after_warmup).astype(jnp.float32)

    if lr_scheduler_type == "constant":

        def schedule(count):
            return jnp.full(jnp.shape(count), lr, jnp.float32)

    elif lr_scheduler_type == "constant_with_warmup":

        def schedule(count):
            step = jnp.asarray(count, jnp.int32)
            return with_warmup(step, jnp.float32(lr))

    elif lr_scheduler_type == "linear":
        decay_per_step = lr / max(1, total - warmup)

        def schedule(count):
            step = jnp.asarray(count, jnp.int32)
            remaining = jnp.maximum(total - step, 0).astype(jnp.float32)
            return with_warmup(step, jnp.float32(decay_per_step) * remaining)

    elif lr_scheduler_type == "cosine":
        # HF (num_cycles=0.5): 0.5 * (1 + cos(pi * p)), p = (step - warmup) / D. Written as
        # sin(pi/2 * (1 - p))**2, which is the same function for every p (HF's curve rises again
        # after total_steps; so does this), but keeps full relative precision near the end where
        # 1 + cos(.) would cancel catastrophically in float32. 1 - p = (warmup + D - step) / D.
        denom = max(1, total - warmup)
        angle_per_step = math.pi / 2 / denom

        def schedule(count):
            step = jnp.asarray(count, jnp.int32)
            angle = jnp.float32(angle_per_step) * (warmup + denom - step).astype(jnp.float32)
            return with_warmup(step, jnp.float32(lr) * jnp.square(jnp.sin(angle)))

    else:  # inverse_sqrt
        scale = int(timescale) if timescale is not None else (warmup or 10_000)
        if scale <= 0:
            raise ValueError(f"timescale must be positive, got {timescale}")
        shift = scale - warmup
        # lr / sqrt((step + shift) / scale) == (lr * sqrt(scale)) / sqrt(step + shift).
        lr_sqrt_scale = lr * math.sqrt(scale)

        def schedule(count):
            step = jnp.asarray(count, jnp.int32)
            # The max only keeps the unselected branch finite during warmup (step + shift can be 0).
            shifted = jnp.maximum(step + shift, 1).astype(jnp.float32)
            return with_warmup(step, jnp.float32(lr_sqrt_scale) / jnp.sqrt(shifted))

    return schedule


# ----------------------------------------------------------------------------- transformations


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: scale all updates by `min(1, max_norm / (norm + 1e-6))`.

    The global L2 norm is accumulated in float32 whatever the gradient dtype. Differs from
    `optax.clip_by_global_norm` only by torch's 1e-6 in the denominator (relative ~1e-6 / norm),
    kept so that clipped steps match the HF Trainer bit for bit as far as float32 allows.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + _TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves, accumulated in float32 (what the HF Trainer logs as `grad_norm`)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """Round float32 `x` to bfloat16 up or down with probability proportional to the distance.

    bfloat16 is the top 16 bits of a float32, so adding 16 uniform random bits below the cut and
    truncating rounds the magnitude up with exactly the right probability (unbiased in expectation).
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def scale_by_adam_low_precision(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    moment_dtype=jnp.bfloat16,
    stochastic_rounding: bool = True,
    seed: int = 0,
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with both moments stored in `moment_dtype`, arithmetic in float32.

    Each step upcasts mu and nu to float32, updates them and computes the Adam direction from the
    float32 values, then stores them back in `moment_dtype`. The state is an
    `optax.ScaleByAdamState(count, mu, nu)`, the same pytree as optax's, so checkpoints and
    sharding rules treat both alike.

    Why stochastic rounding: with b2 = 0.999 the second moment changes by ~0.1% per step, below
    bfloat16's 0.4% resolution, so round-to-nearest never lets nu decay (0.999 * nu rounds back to
    nu): it only ratchets up, and steps shrink for the rest of the run. Stochastic rounding is
    unbiased, so nu decays at the right rate on average. The random bits come from
    `fold_in(seed, count, leaf index)`, so no key is carried in the state and a resumed run rounds
    as the original would have. `stochastic_rounding=False` gives plain round-to-nearest (what
    `optax.adamw(mu_dtype=...)` does for mu).
    """
    moment_dtype = jnp.dtype(moment_dtype)
    base_key = jax.random.key(seed)

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        # Bias corrections in float32, like optax (torch uses float64: differences ~1e-7 relative).
        bc1 = 1 - jnp.float32(b1) ** count.astype(jnp.float32)
        bc2 = 1 - jnp.float32(b2) ** count.astype(jnp.float32)
        step_key = jax.random.fold_in(base_key, count)

        g_leaves, treedef = jax.tree.flatten(updates)
        mu_leaves = treedef.flatten_up_to(state.mu)
        nu_leaves = treedef.flatten_up_to(state.nu)
        out_u, out_mu, out_nu = [], [], []
        for i, (g, mu, nu) in enumerate(zip(g_leaves, mu_leaves, nu_leaves, strict=True)):
            g32 = g.astype(jnp.float32)
            mu32 = b1 * mu.astype(jnp.float32) + (1 - b1) * g32
            nu32 = b2 * nu.astype(jnp.float32) + (1 - b2) * jnp.square(g32)
            out_u.append(((mu32 / bc1) / (jnp.sqrt(nu32 / bc2) + eps)).astype(g.dtype))
            if stochastic_rounding:
                k_mu, k_nu = jax.random.split(jax.random.fold_in(step_key, i))
                out_mu.append(_stochastic_round(mu32, moment_dtype, k_mu))
                out_nu.append(_stochastic_round(nu32, moment_dtype, k_nu))
            else:
                out_mu.append(mu32.astype(moment_dtype))
                out_nu.append(nu32.astype(moment_dtype))
        unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)
        return unflat(out_u), optax.ScaleByAdamState(count=count, mu=unflat(out_mu), nu=unflat(out_nu))

    return optax.GradientTransformation(init_fn, update_fn)


def hf_weight_decay_mask(params: Any) -> Any:
    """True for leaves the HF Trainer decays: all but biases and norm weights.

    Applies `Trainer.get_decay_parameter_names`' name patterns to the dotted key path of each
    leaf (e.g. `layers.input_norm`, `final_norm` are excluded; `layers.wq` is decayed).
    """

    def decays(path, _):
        name = ".".join(_key_name(k) for k in path).lower()
        return not any(re.search(p, name) for p in _NO_DECAY_PATTERNS)

    return jax.tree_util.tree_map_with_path(decays, params)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def make_optimizer(
    learning_rate_schedule: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    moment_dtype=None,
    weight_decay_mask: Callable[[Any], Any] | Any | None = hf_weight_decay_mask,
    stochastic_rounding: bool = True,
    rounding_seed: int = 0,
) -> optax.GradientTransformation:
    """HF Trainer's optimizer step: grad-norm clipping then torch.optim.AdamW, as one optax chain.

    Args:
        learning_rate_schedule: a float or an optax schedule (e.g. from `make_schedule`).
        b1, b2, eps: Adam betas and epsilon (eps added after sqrt of the bias-corrected v).
        weight_decay: decoupled weight decay; 0.0 in the Zephyr recipe.
        max_grad_norm: clip the global gradient norm to this (torch formula); <= 0 disables.
        moment_dtype: None keeps optax's behaviour (moments in the parameters' dtype: keep float32
            master parameters for a float32 Adam); `jnp.bfloat16` stores both moments in bf16 and
            computes in float32 (`scale_by_adam_low_precision`), halving optimizer memory
            (for the 141B model: 1.13 TB -> 0.56 TB of moments across the mesh).
        weight_decay_mask: which leaves decay (pytree of bools or callable); default follows the
            HF Trainer (no decay on biases and norm weights); None decays everything.
            Only used when `weight_decay != 0`, so with no decay the state has no mask wrapper.
        stochastic_rounding, rounding_seed: how bf16 moments are rounded (see
            `scale_by_adam_low_precision`); ignored for float32 moments.

    Returns:
        `chain(clip or identity, adamw)`; the AdamW part's state has optax.adamw's structure
        `(ScaleByAdamState, add_decayed_weights state, ScaleByScheduleState)`.
    """
    mask = weight_decay_mask if weight_decay else None
    if moment_dtype is None:
        adamw = optax.adamw(
            learning_rate_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
        )
    else:
        # Same chain as optax.adamw, with the low-precision Adam in place of scale_by_adam.
        adamw = optax.chain(
            scale_by_adam_low_precision(
                b1, b2, eps, moment_dtype, stochastic_rounding=stochastic_rounding, seed=rounding_seed
            ),
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(learning_rate_schedule),
        )
    # identity() in place of the clip keeps the state's structure independent of max_grad_norm.
    clip = clip_by_global_norm_torch(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
