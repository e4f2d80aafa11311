"""zephyr_jax: ORPO alignment of Mixtral Mixture-of-Experts models in JAX / Flax NNX."""

from zephyr_jax.config import ConfigError, MixtralConfig
from zephyr_jax.model import KVCache, Mixtral, RouterStats, init_kv_cache, model_from_params, params_dict
from zephyr_jax.pretrained import from_pretrained

__all__ = [
    "ConfigError",
    "KVCache",
    "Mixtral",
    "MixtralConfig",
    "RouterStats",
    "from_pretrained",
    "init_kv_cache",
    "model_from_params",
    "params_dict",
]
