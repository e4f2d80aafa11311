"""The Mixtral model: dense layers, MoE dispatch, and the NNX module."""

from zephyr_jax.model.mixtral import (
    KVCache,
    Mixtral,
    RouterStats,
    group_aux_loss,
    init_kv_cache,
    model_from_params,
    params_dict,
)

__all__ = ["KVCache", "Mixtral", "RouterStats", "group_aux_loss", "init_kv_cache", "model_from_params",
           "params_dict"]
