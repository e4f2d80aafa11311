"""Read a Hugging Face Mixtral folder (config.json + safetensors) into zephyr_jax parameters.

Two ways: `load_hf_params` returns the whole model as numpy (conversion, notebooks, one device);
`load_hf_sharded` builds each parameter straight onto its devices, a few blocks at a time, so a
host never holds the model: on 4 hosts x 8 GPUs each host reads the file tensors of a quarter of
the layers, once, and the devices reshard them to their training layout (Mixtral-8x22B is
282 GB in bf16, 564 GB as float32 parameters).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import numpy as np

from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io import mapping
from zephyr_jax.hf_io.safetensors_io import CheckpointError
from zephyr_jax.hf_io.streaming import HFSource

__all__ = ["CheckpointError", "load_hf_params", "load_hf_sharded"]


def load_hf_params(hf_dir: str, cfg: MixtralConfig | None = None) -> tuple[MixtralConfig, dict]:
    """Whole-model loader: numpy params in our layout, in the dtypes stored on disk.

    Either HF layout (per-expert or fused experts); every name, shape and dtype is checked before
    any data is read (`CheckpointError` names the file and tensor). Peak memory is the model plus
    one layer: layers are read one at a time into preallocated stacked arrays.
    """
    with HFSource(hf_dir, cfg) as src:
        cfg = src.cfg
        params: dict = {"layers": {}}
        for g in mapping.groups(cfg):
            for key, x in src.produce(g).items():
                if g is None:
                    params[key] = x
                    continue
                name = key.split("/", 1)[1]
                if g == 0:
                    params["layers"][name] = np.empty((cfg.num_hidden_layers, *x.shape), x.dtype)
                params["layers"][name][g] = x
    return cfg, params


def load_hf_sharded(hf_dir: str | os.PathLike, shardings: Mapping, cfg: MixtralConfig | None = None,
                    dtype=None) -> tuple[MixtralConfig, dict]:
    """(config, params as global `jax.Array`s placed on `shardings`), a few blocks at a time.

    `shardings`: a params-shaped tree of `jax.sharding.Sharding`s (as `load_params` gets from the
    trainer). For each parameter, the distinct blocks this process's devices hold are read (only
    the layers, and in the per-expert layout only the experts, they span), cast to `dtype`
    (default: the stored dtype), put on their devices and dropped. Blocks cut from the same HF
    tensors (the same layers and experts, other columns) are filled from one read of each
    tensor, so host memory peaks at one such group plus one layer's slice of one parameter: on
    4 x 8 GPUs, one expert's block of an expert weight, or a host's quarter of an attention
    weight. Works unchanged across processes (`jax.distributed`): every process reads its own
    blocks and assembles its part of each global array.

    Layer weights are read in `sharding.read_sharding`'s layout, their layers split over the mesh
    axes that split the columns, and then resharded on the devices: a file tensor is read by one
    process, not by every process holding some of its columns (4 x 8: each host reads a quarter
    of the model, not all of it), for one parameter's shard more device memory while it moves.
    """
    import jax  # here, not at the top: the whole-model loader and conversion need no jax
    from jax.sharding import NamedSharding

    from zephyr_jax.model_checkpoint import flatten, param_shapes, unflatten
    from zephyr_jax.sharding import read_sharding

    with HFSource(hf_dir, cfg) as src:
        cfg = src.cfg
        shapes = param_shapes(cfg)
        flat_shardings = flatten(dict(shardings))
        if sorted(flat_shardings) != sorted(shapes):
            raise ValueError(f"{src.folder}: shardings name parameters {sorted(flat_shardings)}, "
                             f"config.json implies {sorted(shapes)}")
        stored = src.leaf_dtypes()
        out = {}
        for key, shape in shapes.items():
            target = flat_shardings[key]
            sharding = target
            if key.startswith("layers/") and isinstance(target, NamedSharding):
                sharding = read_sharding(target, shape, 2 if key in mapping.EXPERT_LEAVES else 1)
            leaf_dtype = np.dtype(dtype or stored[key])
            by_block: dict[tuple, list] = {}  # replicated devices share one block
            for device, index in sharding.addressable_devices_indices_map(shape).items():
                bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))
                by_block.setdefault(bounds, []).append(device)
            by_source: dict[tuple, list] = {}  # blocks read from the same HF tensors
            for bounds in by_block:
                by_source.setdefault(_source(key, bounds), []).append(bounds)
            arrays = []
            for group in by_source.values():  # a group's host blocks are dropped after it
                for bounds, block in zip(group, _read_blocks(src, key, group, leaf_dtype),
                                         strict=True):
                    arrays += [jax.device_put(block, d) for d in by_block[bounds]]
            out[key] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
            del arrays
            if sharding != target:  # over the interconnect, one parameter at a time
                out[key] = _reshard(target)(out[key])
    return cfg, unflatten(out)


@functools.cache
def _reshard(target):
    import jax

    return jax.jit(lambda x: x, out_shardings=target)


def _source(key: str, bounds: tuple[tuple[int, int], ...]) -> tuple:
    """What a block reads: its layers, and its experts for an expert weight (global leaves: the
    whole tensor)."""
    if not key.startswith("layers/"):
        return ()
    return (bounds[0], bounds[1]) if key in mapping.EXPERT_LEAVES else (bounds[0],)


def _read_blocks(src: HFSource, key: str, group: list[tuple[tuple[int, int], ...]],
                 dtype: np.dtype) -> list[np.ndarray]:
    """`leaf[bounds]` for every bounds of `group` (all with the same `_source`), in our layout:
    each layer's HF tensors are read once and cut into every block."""
    if not key.startswith("layers/"):
        whole = src.produce(None, [key])[key]
        return [np.ascontiguousarray(whole[tuple(slice(a, b) for a, b in bounds)], dtype)
                for bounds in group]
    (l0, l1), *_ = group[0]
    experts = None
    if key in mapping.EXPERT_LEAVES:  # read only the group's experts; index them from 0
        experts = range(*group[0][1])
    inner = []
    for bounds in group:
        rest = list(bounds[1:])
        if experts is not None:
            rest[0] = (0, len(experts))
        inner.append(tuple(slice(a, b) for a, b in rest))
    blocks = [np.empty(tuple(b - a for a, b in bounds), dtype) for bounds in group]
    for i, layer in enumerate(range(l0, l1)):
        layer_slice = src.produce(layer, [key], experts=experts)[key]
        for block, index in zip(blocks, inner, strict=True):
            block[i] = layer_slice[index]
    return blocks
