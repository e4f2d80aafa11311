"""Text generation over a preallocated KV cache, and the chat layer on top of it.

Token level:
- `generate_ids`: left-pad, one jitted prefill, then one jitted `lax.while_loop` that decodes until
  every row has hit EOS or `max_new_tokens` is reached.
- `stream_ids`: the same prefill, then one jitted single-token step per call, yielding each column of
  new tokens as it is produced (for interactive chat).
Shapes are static (batch, padded prompt length, cache length), so each function compiles once per
shape and never per token. Both derive the step-`i` sampling key as `fold_in(key(seed), i)`, so for
a given seed they produce the same tokens.

Chat level: `generate` / `stream_generate` render conversations with the tokenizer's chat template
(generation prompt appended), stop at the tokenizer's EOS or any of the model config's EOS ids and
decode text.

Positions follow transformers' `generate` (5.x `_prepare_position_ids_for_generation` and
`_update_model_kwargs_for_generation`): a left-padded row's positions count its real tokens,
`cumsum(attention_mask) - 1` with pads set to 0, and each new token takes the previous position + 1.
The causal mask still runs by cache slot (HF's `q_offset` is the cache length), which is what
`Mixtral.backbone` does with a cache, with pad slots masked as keys.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax import sharding as zs
from zephyr_jax.model import KVCache, Mixtral, init_kv_cache

# Prompt lengths are padded up to a multiple of this so that a chat whose prompt grows turn by turn
# reuses compiled code; extra left pads are masked keys and change no logit.
DEFAULT_LENGTH_BUCKET = 64
_NO_EOS = -1  # a token id that never occurs, standing in for "no EOS" inside jitted code
EosIds = int | Sequence[int] | None  # one EOS id, several (stop at any, as transformers), or none


class _Sampling(NamedTuple):
    """Sampling settings as traced scalars, so changing them does not recompile."""

    temperature: np.ndarray  # float32; 0 means greedy
    top_k: np.ndarray  # int32; 0 disables
    top_p_cut: np.ndarray  # float32 (1 - top_p); 0 disables


class _DecodeState(NamedTuple):
    cache: KVCache
    token_B: jax.Array  # the last emitted token of each row (the next step's input)
    position_B: jax.Array  # the position that token takes
    finished_B: jax.Array  # the row has emitted one of the EOS ids
    step: jax.Array  # tokens emitted so far
    key: jax.Array  # base PRNG key; step i samples with fold_in(key, i)


def _sampling(temperature: float, top_k: int | None, top_p: float | None) -> _Sampling:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_k = 0 if top_k is None else top_k
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 disables), got {top_k}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    # `1 - top_p` in float64, then float32: the threshold HF's TopPLogitsWarper compares against.
    return _Sampling(np.float32(temperature), np.int32(top_k), np.float32(1.0 - top_p))


def _filter_top_k_top_p(logits_BV: jax.Array, top_k: jax.Array, top_p_cut: jax.Array) -> jax.Array:
    """HF's TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1), removed tokens at -inf.

    top-k keeps every token tied with the k-th largest logit. top-p sorts ascending (stably, so among
    tied logits the lower index goes first), drops tokens whose cumulative probability is
    <= 1 - top_p, and always keeps the most likely token.
    """
    V = logits_BV.shape[-1]
    k = jnp.clip(top_k, 1, V)
    desc_BV = -jnp.sort(-logits_BV, axis=-1)
    kth_B1 = jax.lax.dynamic_slice_in_dim(desc_BV, k - 1, 1, axis=-1)
    logits_BV = jnp.where((top_k > 0) & (logits_BV < kth_B1), -jnp.inf, logits_BV)

    order_BV = jnp.argsort(logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_sorted_BV = (cum_BV <= top_p_cut).at[:, -1].set(False)
    remove_BV = jnp.zeros_like(remove_sorted_BV).at[
        jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(remove_sorted_BV)
    return jnp.where((top_p_cut > 0) & remove_BV, -jnp.inf, logits_BV)


_filter_jit = jax.jit(_filter_top_k_top_p)


def top_k_top_p_filter(logits_BV: jax.Array, top_k: int | None = 50,
                       top_p: float | None = 0.95) -> jax.Array:
    """Filter logits [B, V] as HF's TopKLogitsWarper then TopPLogitsWarper do; removed -> -inf.

    `top_k` 0/None and `top_p` 1.0/None disable the respective filter.
    """
    s = _sampling(1.0, top_k, top_p)
    return _filter_jit(np.asarray(logits_BV, np.float32), s.top_k, s.top_p_cut)


def _next_token(logits_BV: jax.Array, key: jax.Array, s: _Sampling) -> jax.Array:
    """Greedy argmax when temperature == 0; else temperature, top-k, top-p, then sample (HF order)."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    scaled_BV = logits_BV / jnp.where(s.temperature > 0, s.temperature, 1.0)
    filtered_BV = _filter_top_k_top_p(scaled_BV, s.top_k, s.top_p_cut)
    sampled_B = jax.random.categorical(key, filtered_BV, axis=-1)
    return jnp.where(s.temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _last_logits(model: Mixtral, ids_BT, mask_BT, positions_BT, cache: KVCache):
    h_BTD, _, cache = model.backbone(ids_BT, mask_BT, positions_BT, cache)
    # Only the last position is sampled from; skipping the others avoids a [B, T, V] prefill buffer.
    logits_BV = jnp.einsum("bd,dv->bv", h_BTD[:, -1], model.head_DV())
    return logits_BV.astype(jnp.float32), cache


def _is_eos(token_B: jax.Array, eos_K: jax.Array) -> jax.Array:
    return jnp.any(token_B[:, None] == eos_K[None, :], axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(graphdef, state, ids_BP, mask_BP, seed, cache_len: int, sampling: _Sampling, eos_K):
    model = nnx.merge(graphdef, state)
    B = ids_BP.shape[0]
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP.astype(jnp.int32), axis=-1) - 1, 0)
    cache = init_kv_cache(model.config, B, cache_len)
    logits_BV, cache = _last_logits(model, ids_BP, mask_BP, positions_BP, cache)
    key = jax.random.key(seed)
    token_B = _next_token(logits_BV, jax.random.fold_in(key, 0), sampling)
    return _DecodeState(cache, token_B, positions_BP[:, -1] + 1, _is_eos(token_B, eos_K),
                        jnp.ones((), jnp.int32), key)


def _step(graphdef, state, ds: _DecodeState, sampling: _Sampling, eos_K, pad) -> _DecodeState:
    """Feed each row's last token, emit the next one; finished rows emit `pad` (as HF does)."""
    model = nnx.merge(graphdef, state)
    B = ds.token_B.shape[0]
    logits_BV, cache = _last_logits(model, ds.token_B[:, None], jnp.ones((B, 1), bool),
                                    ds.position_B[:, None], ds.cache)
    token_B = _next_token(logits_BV, jax.random.fold_in(ds.key, ds.step), sampling)
    token_B = jnp.where(ds.finished_B, pad, token_B)
    return _DecodeState(cache, token_B, ds.position_B + 1, ds.finished_B | _is_eos(token_B, eos_K),
                        ds.step + 1, ds.key)


_decode_step = jax.jit(_step, static_argnums=0, donate_argnums=2)


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=2)
def _decode_loop(graphdef, state, ds: _DecodeState, max_new_tokens: int, sampling: _Sampling,
                 eos_K, pad):
    B = ds.token_B.shape[0]
    out_BN = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(ds.token_B)

    def cond(carry):
        ds, _ = carry
        return (ds.step < max_new_tokens) & ~jnp.all(ds.finished_B)

    def body(carry):
        ds, out_BN = carry
        ds = _step(graphdef, state, ds, sampling, eos_K, pad)
        out_BN = jax.lax.dynamic_update_slice(out_BN, ds.token_B[:, None], (0, ds.step - 1))
        return ds, out_BN

    ds, out_BN = jax.lax.while_loop(cond, body, (ds, out_BN))
    # Returning the state lets the donated cache buffers be reused in place by the loop.
    return out_BN, ds


@contextlib.contextmanager
def _on_model_mesh(state) -> Iterator[None]:
    """Trace and run on the mesh the parameters live on.

    A model loaded with `from_pretrained(..., mesh=...)` (or placed by hand) carries its mesh in
    its parameters' shardings; entering it makes the MoE run expert-parallel there, as in training.
    An ambient mesh set by the caller wins. Small batches split over nothing (one chat is one
    row): that is expected here, so the batch-fallback warning is not shown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zs.ShardingFallbackWarning)
        mesh = None
        if zs.ambient_mesh() is None:
            for leaf in jax.tree.leaves(state):
                sharding = getattr(leaf, "sharding", None)
                if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
                    mesh = sharding.mesh
                    break
        if mesh is None:
            yield
            return
        with zs.use_mesh(mesh, zs.active_rules()):
            yield


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, vocab_size: int,
              bucket: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts:
        raise ValueError("prompts is empty; pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; each prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
    P = max(len(p) for p in prompts)
    P = -(-P // bucket) * bucket
    ids_BP = np.full((len(prompts), P), pad_token_id, np.int32)
    mask_BP = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p):] = p
        mask_BP[i, P - len(p):] = True
    return ids_BP, mask_BP


def _start(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
           pad_token_id, bucket):
    """Validate, left-pad and prefill; returns what the decode functions need."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    sampling = _sampling(temperature, top_k, top_p)
    ids_BP, mask_BP = _left_pad(prompts, pad_token_id, model.config.vocab_size, bucket)
    graphdef, state = nnx.split(model)
    eos = np.asarray(_eos_list(eos_token_id) or [_NO_EOS], np.int32)
    pad = np.int32(pad_token_id)
    # The last emitted token is never fed back, hence the - 1.
    cache_len = ids_BP.shape[1] + max_new_tokens - 1
    with _on_model_mesh(state):
        ds = _prefill(graphdef, state, ids_BP, mask_BP, np.uint32(seed), cache_len, sampling, eos)
    return graphdef, state, ds, sampling, eos, pad


def generate_ids(
    model: Mixtral,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    eos_token_id: EosIds = None,
    pad_token_id: int = 0,
    bucket: int = DEFAULT_LENGTH_BUCKET,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` new tokens for each prompt (lists of token ids).

    Greedy when `temperature == 0`; otherwise temperature, top-k, top-p (HF semantics; 0 / 1.0
    disable), then a draw seeded by `seed` (same seed, same tokens). With `eos_token_id` (one id,
    or a list as transformers takes, any of which stops), a row stops at its first EOS and emits
    `pad_token_id` afterwards, and decoding ends once every row has stopped; without it every row
    runs `max_new_tokens`. Returns the new tokens only, all rows the same length, as
    `transformers` `generate(...)[:, prompt_len:]` would. `bucket` rounds the padded prompt length
    up to reuse compiled code across calls.
    """
    graphdef, state, ds, sampling, eos, pad = _start(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
        pad_token_id, bucket)
    with _on_model_mesh(state):
        out_BN, ds = _decode_loop(graphdef, state, ds, max_new_tokens, sampling, eos, pad)
    return np.asarray(out_BN)[:, : int(ds.step)].tolist()


def stream_ids(
    model: Mixtral,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    eos_token_id: EosIds = None,
    pad_token_id: int = 0,
    bucket: int = DEFAULT_LENGTH_BUCKET,
) -> Iterator[list[int]]:
    """Like `generate_ids`, but yields each step's new tokens (one per row) as they are produced.

    Same arguments and, for the same seed, the same tokens: the yielded columns stacked equal
    `generate_ids`'s rows.
    """
    graphdef, state, ds, sampling, eos, pad = _start(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
        pad_token_id, bucket)
    token_B, finished_B = jax.device_get((ds.token_B, ds.finished_B))
    yield token_B.tolist()
    for _ in range(1, max_new_tokens):
        if finished_B.all():
            return
        with _on_model_mesh(state):
            ds = _decode_step(graphdef, state, ds, sampling, eos, pad)
        token_B, finished_B = jax.device_get((ds.token_B, ds.finished_B))
        yield token_B.tolist()


# --- chat layer ---

Message = Mapping[str, str]


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` rendered by the chat template with the generation prompt appended.

    Tokenized without special tokens and BOS prepended when the tokenizer has one, which is how
    TRL's ORPO trainer builds the sequences the model is trained on.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _eos_list(eos_token_id: EosIds) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else \
        [int(t) for t in eos_token_id]


def _chat_eos(model: Mixtral, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and every EOS id of the model's config.json: transformers' generate
    stops at the latter (its generation config), a chat template ends turns with the former."""
    ids = _eos_list(tokenizer.eos_token_id)
    return ids + [t for t in model.config.eos_token_ids if t not in ids]


def _until_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    ids = list(ids)
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    # No space clean-up: it can rewrite text already streamed once the next token arrives.
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _is_conversation(x: Any) -> bool:
    return isinstance(x, Sequence) and len(x) > 0 and isinstance(x[0], Mapping)


def _pad_id(tokenizer: Any) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def generate(
    model: Mixtral,
    tokenizer: Any,
    messages_or_batch: Sequence[Message] | Sequence[Sequence[Message]],
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> str | list[str]:
    """Answer one conversation (a list of {role, content}) or a batch of them.

    Applies the tokenizer's chat template with the generation prompt, generates until the
    tokenizer's EOS or any of the model config's (or `max_new_tokens`), and returns the decoded
    answer (special tokens skipped, surrounding whitespace stripped): a string for one
    conversation, a list for a batch. Defaults are the Zephyr model card's sampling settings;
    `temperature=0` is greedy.
    """
    single = _is_conversation(messages_or_batch)
    batch = [messages_or_batch] if single else list(messages_or_batch)
    if not batch or not all(_is_conversation(c) for c in batch):
        raise ValueError("expected a conversation (list of {role, content}) or a list of them")
    eos = _chat_eos(model, tokenizer)
    out = generate_ids(model, [chat_prompt_ids(tokenizer, c) for c in batch], max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       eos_token_id=eos, pad_token_id=_pad_id(tokenizer))
    texts = [_decode(tokenizer, _until_eos(row, eos)).strip() for row in out]
    return texts[0] if single else texts


def stream_generate(
    model: Mixtral,
    tokenizer: Any,
    messages: Sequence[Message],
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> Iterator[str]:
    """Answer one conversation, yielding text pieces as tokens are produced.

    The pieces join to what `generate` returns for the same arguments, up to trailing whitespace.
    Bytes of a character split across tokens are held back until the character is complete.
    """
    if not _is_conversation(messages):
        raise ValueError("expected a conversation: a non-empty list of {role, content}")
    eos = _chat_eos(model, tokenizer)
    ids: list[int] = []
    sent = ""
    for (token,) in stream_ids(model, [chat_prompt_ids(tokenizer, messages)], max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               eos_token_id=eos, pad_token_id=_pad_id(tokenizer)):
        if token in eos:
            break
        ids.append(token)
        text = _decode(tokenizer, ids).lstrip()
        if text.endswith("\ufffd") or not text.startswith(sent):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text
