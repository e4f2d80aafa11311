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
  square root of v_hat, decoupled decay `p -= lr * wd * p`, applied (as the HF Trainer does) to
  every parameter except biases and norm weights (`hf_weight_decay_mask`). `scale_by_adam_torch`
  replaces optax's scale_by_adam for precision (bias corrections) and optional bf16 moments.

Example:
    schedule = make_schedule("inverse_sqrt", 5e-6, warmup_steps=100, total_steps=num_steps)
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
import numpy as np
import optax

SCHEDULER_TYPES = ("inverse_sqrt", "linear", "cosine", "constant", "constant_with_warmup")

# HF Trainer.get_decay_parameter_names: parameters whose dotted name matches one get no decay.
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
        lr_scheduler_type: one of `SCHEDULER_TYPES` (names of `TrainingArguments.lr_scheduler_type`).
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

    # Precision: a float32 result carries up to 6e-8 relative rounding, and each further float32
    # operation adds as much, which would put formulas like lr * (1 + cos(pi * p)) / 2 at ~3e-7
    # from HF's float64 values. So the warmup ramp and the linear / cosine decays are tables of
    # HF's own float64 values rounded once to float32 (sizes warmup_steps and total_steps -
    # warmup_steps + 1, a few KB for real runs), indexed by the traced step; the unbounded
    # inverse-sqrt tail is one formula with two float32 roundings.
    ramp = _f32_table([lr * (k / max(1, warmup)) for k in range(max(1, warmup))])

    def with_warmup(step, after_warmup):
        warm = ramp[jnp.clip(step, 0, ramp.shape[0] - 1)]
        return jnp.where(step < warmup, warm, after_warmup).astype(jnp.float32)

    def as_step(count):
        return jnp.asarray(count, jnp.int32)

    decay_len = max(1, total - warmup)  # HF's denominator max(1, total - warmup)

    if lr_scheduler_type == "constant":

        def schedule(count):
            return jnp.full(jnp.shape(count), lr, jnp.float32)

    elif lr_scheduler_type == "constant_with_warmup":

        def schedule(count):
            return with_warmup(as_step(count), jnp.float32(lr))

    elif lr_scheduler_type == "linear":
        # Entry j is step warmup + j; past the table's end HF's value is max(0, negative) = 0,
        # which is also the last entry, so clipping the index continues the schedule exactly.
        linear = _f32_table(
            [lr * max(0.0, (total - (warmup + j)) / decay_len) for j in range(decay_len + 1)]
        )

        def schedule(count):
            step = as_step(count)
            return with_warmup(step, linear[jnp.clip(step - warmup, 0, decay_len)])

    elif lr_scheduler_type == "cosine":
        # HF's num_cycles=0.5 curve 0.5 * (1 + cos(pi * j / D)) keeps going past total_steps: it is
        # periodic in j with period 2D and symmetric about D, so a table over j in [0, D] covers
        # every step, including HF's rise after total_steps.
        cosine = _f32_table(
            [
                lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (j / decay_len))))
                for j in range(decay_len + 1)
            ]
        )

        def schedule(count):
            step = as_step(count)
            j = jnp.mod(jnp.maximum(step - warmup, 0), 2 * decay_len)
            return with_warmup(step, cosine[jnp.minimum(j, 2 * decay_len - j)])

    else:  # inverse_sqrt
        scale = int(timescale) if timescale is not None else (warmup or 10_000)
        if scale <= 0:
            raise ValueError(f"timescale must be positive, got {timescale}")
        shift = scale - warmup
        # HF: lr / sqrt((step + shift) / scale) == sqrt(lr**2 * scale / (step + shift)). The
        # constant is folded in float64; sqrt halves the two earlier roundings, so <= 1.5 roundings
        # (9e-8) in all. (XLA rewrites c / sqrt(x) as c * rsqrt(x), which measured 1.8e-7.)
        lr2_scale = lr * lr * scale

        def schedule(count):
            step = as_step(count)
            # The max only keeps the unselected branch finite during warmup (step + shift can be 0).
            shifted = jnp.maximum(step + shift, 1).astype(jnp.float32)
            return with_warmup(step, jnp.sqrt(jnp.float32(lr2_scale) / shifted))

    return schedule


def _f32_table(values: list[float]) -> jax.Array:
    """float64 values rounded once (to nearest) to a float32 lookup table."""
    return jnp.asarray(np.asarray(values, np.float64).astype(np.float32))


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


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    """`_fmix32` on a Python int, for constants folded before tracing."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _hash_bits(shape: tuple[int, ...], stream: jax.Array) -> jax.Array:
    """Pseudo-random uint32 per element, a hash of (stream, element index).

    Why not jax.random: threefry is ~20 rounds per element and compiles slowly (a 4-leaf
    optimizer update took 6.5 s to compile with it, 1.5 s with this). Rounding dither only needs
    decorrelated bits, and a hash of the index is cheap, elementwise (so it shards like the
    moments themselves, no all-gather under FSDP) and a pure function of (stream, index).
    """
    h = jnp.broadcast_to(stream.astype(jnp.uint32), shape)
    for axis in range(len(shape)):
        index = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        h = _fmix32((h * jnp.uint32(0x9E3779B1)) ^ index)
    return _fmix32(h)


def _stochastic_round_bf16(x: jax.Array, stream: jax.Array) -> jax.Array:
    """Round float32 `x` to bfloat16 up or down with probability proportional to the distance.

    bfloat16 is the top 16 bits of a float32, so adding 16 uniform random bits below the cut and
    truncating rounds the magnitude up with exactly the right probability (unbiased in expectation).
    `stream` (uint32) selects the random bits; equal streams give equal rounding.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = _hash_bits(x.shape, stream) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def scale_by_adam_torch(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    moment_dtype=None,
    stochastic_rounding: bool = True,
    seed: int = 0,
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` computed in float32 with torch's precision, moments in any dtype.

    Two differences from optax, both about precision, not semantics:

    - Bias corrections `1 - b**t` are computed as `-expm1(t * log(b))`. optax computes
      `1 - float32(0.999)**t`, which cancels catastrophically: at t=1 it is 1.3e-5 off, so every
      early update was ~6e-6 (relative) away from torch's (whose corrections are float64).
    - The moments are stored in `moment_dtype` (None: the parameters' dtype, as in optax) while all
      arithmetic is float32: mu and nu are upcast, updated, used for the Adam direction, and only
      then cast back for storage.

    bfloat16 moments (the 141B run's memory option) are stored with stochastic rounding by
    default. With b2 = 0.999 the second moment changes by ~0.1% a step, below bfloat16's 0.4%
    resolution, so round-to-nearest never lets nu decay (0.999 * nu rounds back to nu): it could
    only ratchet up, and steps would shrink for the rest of the run. Stochastic rounding is
    unbiased, so nu decays at the right rate on average (mu gets the same treatment). The random
    bits are a hash of (seed, count, leaf, element index) (`_hash_bits`): no key in the state,
    and a resumed run rounds as the original would have. `stochastic_rounding=False` rounds to
    nearest (what `optax.adamw(mu_dtype=...)` does for mu).

    The state is an `optax.ScaleByAdamState(count, mu, nu)`, the same pytree as optax's.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)
    seed_u32 = np.uint32(_fmix32_int(seed & 0xFFFFFFFF))

    def init_fn(params):
        def zeros(p):
            dtype = jnp.result_type(p) if moment_dtype is None else moment_dtype
            return jnp.zeros(jnp.shape(p), dtype)

        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = -jnp.expm1(t * jnp.float32(log_b1))
        bc2 = -jnp.expm1(t * jnp.float32(log_b2))
        step_stream = _fmix32(jnp.uint32(seed_u32) ^ count.astype(jnp.uint32))

        g_leaves, treedef = jax.tree.flatten(updates)
        mu_leaves = treedef.flatten_up_to(state.mu)
        nu_leaves = treedef.flatten_up_to(state.nu)
        out_u, out_mu, out_nu = [], [], []
        for i, (g, mu, nu) in enumerate(zip(g_leaves, mu_leaves, nu_leaves, strict=True)):
            g32 = g.astype(jnp.float32)
            mu32 = b1 * mu.astype(jnp.float32) + (1 - b1) * g32
            nu32 = b2 * nu.astype(jnp.float32) + (1 - b2) * jnp.square(g32)
            # torch: (lr / bc1) * mu / (sqrt(nu) / sqrt(bc2) + eps); eps outside the sqrt.
            out_u.append(((mu32 / bc1) / (jnp.sqrt(nu32) / jnp.sqrt(bc2) + eps)).astype(g.dtype))
            leaf_stream = _fmix32(step_stream + jnp.uint32(2 * i))
            out_mu.append(_store(mu32, mu.dtype, stochastic_rounding, leaf_stream))
            out_nu.append(_store(nu32, nu.dtype, stochastic_rounding, _fmix32(leaf_stream + 1)))

        def unflat(leaves):
            return jax.tree.unflatten(treedef, leaves)

        return unflat(out_u), optax.ScaleByAdamState(
            count=count, mu=unflat(out_mu), nu=unflat(out_nu)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _store(x32: jax.Array, dtype, stochastic: bool, stream: jax.Array) -> jax.Array:
    if stochastic and jnp.dtype(dtype) == jnp.bfloat16:
        return _stochastic_round_bf16(x32, stream)
    return x32.astype(dtype)


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
        moment_dtype: storage dtype of Adam's mu and nu; None means the parameters' dtype, as in
            optax (so float32 master parameters give a float32 Adam). `jnp.bfloat16` halves
            optimizer memory (141B model: 1.13 TB -> 0.56 TB of moments across the mesh); the
            arithmetic is float32 either way (`scale_by_adam_torch`).
        weight_decay_mask: which leaves decay (pytree of bools or callable); default follows the
            HF Trainer (no decay on biases and norm weights); None decays everything.
            Only used when `weight_decay != 0`, so with no decay the state has no mask wrapper.
        stochastic_rounding, rounding_seed: how bf16 moments are rounded (see
            `scale_by_adam_torch`); ignored for other moment dtypes.

    Returns:
        `chain(clip or identity, adamw)`, where adamw is optax.adamw's chain
        `(scale_by_adam_torch, add_decayed_weights, scale_by_learning_rate)`, so the state is
        `(EmptyState, (ScaleByAdamState, decay state, ScaleByScheduleState))`.
    """
    mask = weight_decay_mask if weight_decay else None
    # optax.adamw's own chain, with scale_by_adam_torch in place of optax.scale_by_adam.
    adamw = optax.chain(
        scale_by_adam_torch(
            b1, b2, eps, moment_dtype, stochastic_rounding=stochastic_rounding, seed=rounding_seed
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate_schedule),
    )
    # identity() in place of the clip keeps the state's structure independent of max_grad_norm.
    use_clip = max_grad_norm is not None and max_grad_norm > 0
    clip = clip_by_global_norm_torch(max_grad_norm) if use_clip else optax.identity()
    return optax.chain(clip, adamw)
