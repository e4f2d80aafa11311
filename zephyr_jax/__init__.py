"""zephyr_jax: ORPO alignment of Mixtral Mixture-of-Experts models in JAX / Flax NNX.

    import zephyr_jax as zj
    model = zj.from_pretrained("outputs/demo")            # HF folder, checkpoint or run dir
    logits, stats = model(input_ids, attention_mask, return_stats=True)
    zj.generate(model, tokenizer, [{"role": "user", "content": "Hi"}], temperature=0)
"""

from zephyr_jax.config import ConfigError, MixtralConfig
from zephyr_jax.generation import chat_prompt_ids, generate, generate_ids, stream_generate
from zephyr_jax.model import (
    KVCache,
    Mixtral,
    RouterStats,
    init_kv_cache,
    model_from_params,
    params_dict,
)
from zephyr_jax.optim import make_optimizer, make_schedule
from zephyr_jax.orpo import concat_pairs, orpo_loss, orpo_loss_from_hidden
from zephyr_jax.pretrained import from_pretrained, save_pretrained
from zephyr_jax.train_step import TrainState, create_train_state, make_eval_step, make_train_step

__all__ = [
    "ConfigError",
    "KVCache",
    "Mixtral",
    "MixtralConfig",
    "RouterStats",
    "TrainState",
    "chat_prompt_ids",
    "create_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "concat_pairs",
    "from_pretrained",
    "generate",
    "generate_ids",
    "init_kv_cache",
    "model_from_params",
    "orpo_loss",
    "orpo_loss_from_hidden",
    "params_dict",
    "save_pretrained",
    "stream_generate",
]
