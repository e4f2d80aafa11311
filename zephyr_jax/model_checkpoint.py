"""The zephyr_jax model checkpoint: HF config.json + the params pytree saved with orbax.

A model checkpoint is a folder::

    config.json     the HF Mixtral config (`MixtralConfig.to_hf()`); "dtype" = the params' dtype
    params/         orbax PyTree checkpoint (OCDBT, the `ocp.StandardCheckpointer` format) of
                    {embed [V,D], final_norm [D], lm_head [D,V] (absent when tied),
                     layers: {input_norm [L,D], wq [L,D,N,H], ...}}  (`zephyr_jax.model.params_dict`)
    tokenizer files, generation_config.json   (optional; copied along by the converter)

Layer leaves keep the model's stacked [L, ...] layout on disk, stored in chunks of one layer (one
layer and expert for expert weights, `params_save_args`), so a converter can write or read one
layer at a time and a sharded restore reads only the chunks each device needs.

A trainer output_dir is read too: config.json at its root plus an orbax `CheckpointManager` root
(`output_dir/checkpoints/`, or `output_dir` itself) whose numbered step folders each hold an item
`params` (the same pytree, `ocp.args.StandardSave`); the latest step is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from zephyr_jax.config import MixtralConfig
from zephyr_jax.model.mixtral import LAYER_PARAMS, flatten_params, layer_param_shapes

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
TRAINER_STEPS_SUBDIR = "checkpoints"  # zephyr_jax.train_checkpoint.CHECKPOINT_SUBDIR


class ModelCheckpointError(ValueError):
    """A model checkpoint that cannot be read or written as asked; the message names the path."""


# --------------------------------------------------------------------------------- the pytree


def param_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Flat name ("embed", "layers/w1", ...) -> shape of every parameter `cfg` implies."""
    out = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    out.update({f"layers/{k}": v for k, v in layer_param_shapes(cfg).items()})
    return out


flatten = flatten_params  # {'layers': {'wq': x}} -> {'layers/wq': x}


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _chunk_axes(key: str) -> tuple[int, ...]:
    """Axes stored one index per chunk: the layer axis, and the expert axis for expert weights."""
    if not key.startswith("layers/"):
        return ()
    axes = LAYER_PARAMS[key.split("/", 1)[1]]
    return tuple(i for i, a in enumerate(axes) if a in ("layers", "expert"))


def params_save_args(params: dict) -> dict:
    """Orbax SaveArgs storing layer leaves one layer (and expert) per chunk.

    The trainer should pass these too (`ocp.args.StandardSave(params, save_args=...)`) so that its
    checkpoints stream one layer at a time in `jax-to-hf` as this module's own do.
    """
    return unflatten({k: ocp.SaveArgs(shard_axes=_chunk_axes(k)) for k in flatten(params)})


def check_shapes(cfg: MixtralConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    want = param_shapes(cfg)
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise ModelCheckpointError(
            f"{where}: parameters do not match config.json: missing {missing}, unexpected {extra}")
    for k, shape in want.items():
        if tuple(shapes[k]) != tuple(shape):
            raise ModelCheckpointError(f"{where}: parameter {k!r} has shape {tuple(shapes[k])}, "
                                       f"config.json implies {tuple(shape)}")


# ------------------------------------------------------------------------------ the folder


def check_not_source(out: str | os.PathLike, sources: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output folder that is one of `sources` (folders the output is made from) or
    contains one, before anything is written.

    A staged output replaces `out` whole, so such an `out` would delete the very files being
    converted (`--out` = `--hf` with --overwrite, or the trainer output_dir holding --ckpt). An
    output inside a source is fine (`--ckpt run --out run/hf`, as the trainer exports): the
    readers read named files and folders of the source, never the new one. Paths are compared
    resolved (`os.path.realpath`), so symlinks and `..` cannot hide a match.
    """
    real_out = os.path.realpath(os.fspath(out))
    for src in sources:
        if src is None:
            continue
        real_src = os.path.realpath(os.fspath(src))
        if real_out == real_src:
            how = "is"
        elif os.path.commonpath([real_out, real_src]) == real_out:
            how = "contains"
        else:
            continue
        # the resolved paths too where a symlink made the match
        linked = (real_out, real_src) != (os.path.abspath(out), os.path.abspath(src))
        same = f" (resolved: {real_out} and {real_src})" if linked else ""
        raise ModelCheckpointError(
            f"{os.fspath(out)}: the output {how} the source {os.fspath(src)}{same}; writing it "
            "would replace the files it is made from: choose an output folder that holds none "
            "of them")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False,
               sources: Iterable[str | os.PathLike | None] = ()) -> Iterator[str]:
    """Yield a temporary sibling folder of `out`; on success it replaces `out`, on failure it is
    removed and whatever was at `out` stays untouched.

    An existing non-empty `out` is refused unless `overwrite`; so is an `out` that is or contains
    one of `sources`, the folders being read (`check_not_source`).
    """
    check_not_source(out, sources)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out}: exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite "
                                  "(overwrite=True) to replace it")
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = _new_dir(parent, f".{base}.partial-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def _new_dir(parent: str, prefix: str) -> str:
    """A new empty folder `parent/prefix<random>`, made by `os.mkdir` so it gets the mode any new
    folder gets (0o777 less the umask). `tempfile.mkdtemp` makes it 0o700, and renamed into place
    that would leave the output unreadable to everyone else, whatever their umask."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free name {prefix}* for a staging folder")


def replace_dir(src: str, out: str) -> None:
    """Rename the finished folder `src` to `out` (a sibling), replacing whatever was at `out`; the
    old one is moved aside first and removed only after the rename."""
    out = os.path.abspath(os.fspath(out))
    parent, base = os.path.split(out)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
        os.rename(out, os.path.join(old, base))
    os.rename(src, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_config(folder: str, cfg: MixtralConfig) -> None:
    with open(os.path.join(folder, CONFIG_FILE), "w") as fh:
        json.dump(cfg.to_hf(), fh, indent=2, sort_keys=True)
        fh.write("\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_folder(tokenizer) -> str | None:
    """The folder a `tokenizer` argument reads from: a path, or None for a tokenizer object
    (`save_pretrained`) or no tokenizer. A writer's output must not replace it."""
    return None if tokenizer is None or hasattr(tokenizer, "save_pretrained") else tokenizer


def save_tokenizer(tokenizer, folder: str) -> None:
    """Put a tokenizer's files in `folder`: from an object with `save_pretrained(dir)` (a
    transformers tokenizer), or copied from a folder of tokenizer files."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    src = os.fspath(tokenizer)
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not names:
        raise ModelCheckpointError(f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(folder, n))


@dataclasses.dataclass(frozen=True)
class Location:
    kind: str  # "model" (a model checkpoint) or "trainer" (a trainer output_dir)
    root: str
    params_dir: str  # the orbax item folder holding the params pytree
    step: int | None = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, CONFIG_FILE)


def locate(path: str | os.PathLike) -> Location:
    """Where the params of a model checkpoint or a trainer output_dir live."""
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise ModelCheckpointError(f"{root}: not a folder")
    if not os.path.exists(os.path.join(root, CONFIG_FILE)):
        raise ModelCheckpointError(f"{root}: no {CONFIG_FILE}")
    if os.path.isdir(os.path.join(root, PARAMS_ITEM)):
        return Location("model", root, os.path.join(root, PARAMS_ITEM))
    latest = None
    for steps_root in (os.path.join(root, TRAINER_STEPS_SUBDIR), root):
        if os.path.isdir(steps_root):
            latest = ocp.step.latest_step_metadata(steps_root, ocp.step.standard_name_format())
            if latest is not None:
                break
    if latest is None:
        raise ModelCheckpointError(
            f"{root}: neither a model checkpoint ({CONFIG_FILE} + {PARAMS_ITEM}/) nor a trainer "
            f"output_dir ({CONFIG_FILE} + numbered orbax step folders in {TRAINER_STEPS_SUBDIR}/ "
            "or at the root)")
    params_dir = os.path.join(os.fspath(latest.path), PARAMS_ITEM)
    if not os.path.isdir(params_dir):
        raise ModelCheckpointError(f"{latest.path}: latest step {latest.step} has no "
                                   f"'{PARAMS_ITEM}' item")
    return Location("trainer", root, params_dir, latest.step)


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    try:
        locate(path)
    except ModelCheckpointError:
        return False
    return True


def _stored(loc: Location) -> dict[str, Any]:
    """Flat name -> orbax ArrayMetadata (shape, dtype) of the stored params."""
    try:
        meta = ocp.PyTreeCheckpointer().metadata(loc.params_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ModelCheckpointError(f"{loc.params_dir}: cannot read the orbax metadata: {e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return flatten(dict(tree))


def _config(loc: Location, dtypes: dict[str, np.dtype], dtype, **runtime) -> MixtralConfig:
    stored = {np.dtype(d).name for d in dtypes.values()}
    param_dtype = np.dtype(dtype).name if dtype is not None else (
        stored.pop() if len(stored) == 1 else None)
    if param_dtype is not None and "param_dtype" not in runtime:
        runtime["param_dtype"] = param_dtype
    return MixtralConfig.from_hf(loc.config_path, **runtime)


def stored_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Flat name -> stored dtype name of a model checkpoint's or trainer output_dir's params."""
    return {k: np.dtype(m.dtype).name for k, m in _stored(locate(path)).items()}


def load_model_config(path: str | os.PathLike, dtype=None, **runtime) -> MixtralConfig:
    """The config `load_model_checkpoint(path, dtype=dtype, **runtime)` returns, reading no weight."""
    loc = locate(path)
    return _config(loc, {k: np.dtype(m.dtype) for k, m in _stored(loc).items()}, dtype, **runtime)


# ------------------------------------------------------------------------- whole-model API


def save_model_checkpoint(path: str | os.PathLike, cfg: MixtralConfig, params: dict, *,
                          overwrite: bool = False, tokenizer=None) -> None:
    """Write `params` (our nested dict of numpy or jax arrays, sharded or not) as a model checkpoint.

    tokenizer: a tokenizer (anything with `save_pretrained(dir)`) or a folder of tokenizer files,
        stored alongside so `jax-to-hf` carries it over.
    The folder appears only when complete; an existing non-empty one needs `overwrite=True`.
    """
    flat = flatten(params)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in flat.items()}, "params")
    dtypes = {np.dtype(v.dtype).name for v in flat.values()}
    if len(dtypes) == 1:
        cfg = cfg.replace(param_dtype=dtypes.pop())
    with staged_dir(path, overwrite, sources=(tokenizer_folder(tokenizer),)) as tmp:
        write_config(tmp, cfg)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        with ocp.StandardCheckpointer() as ck:
            ck.save(os.path.join(tmp, PARAMS_ITEM), params, save_args=params_save_args(params))
            ck.wait_until_finished()


def load_model_checkpoint(path: str | os.PathLike, shardings=None, dtype=None,
                          **runtime) -> tuple[MixtralConfig, dict]:
    """(config, params) from a model checkpoint or a trainer output_dir (its latest step).

    shardings: None (every array on `jax.devices()[0]`), one `jax.sharding.Sharding` for all
        parameters, or a pytree like the params (nested dict) of Shardings. Orbax restores each
        array straight onto its devices, reading only the chunks each device needs: no host ever
        holds the whole model.
    dtype: cast while restoring (e.g. "bfloat16"); default keeps the stored dtype.
    runtime: our MixtralConfig runtime fields (moe_impl, dtype, ...); param_dtype follows `dtype`
        or the stored dtype.
    """
    loc = locate(path)
    stored = _stored(loc)
    shapes = {k: tuple(m.shape) for k, m in stored.items()}
    dtypes = {k: np.dtype(m.dtype) for k, m in stored.items()}
    cfg = _config(loc, dtypes, dtype, **runtime)
    check_shapes(cfg, shapes, loc.params_dir)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = dict.fromkeys(shapes, shardings)
    else:
        flat_shardings = flatten(shardings)
        if set(flat_shardings) != set(shapes):
            raise ModelCheckpointError(
                f"shardings do not match the parameters: missing {sorted(set(shapes) - set(flat_shardings))}, "
                f"unexpected {sorted(set(flat_shardings) - set(shapes))}")
    target = unflatten({
        k: jax.ShapeDtypeStruct(shapes[k], np.dtype(dtype) if dtype is not None else dtypes[k],
                                sharding=flat_shardings[k])
        for k in shapes})
    with ocp.StandardCheckpointer() as ck:
        params = ck.restore(loc.params_dir, target)
    return cfg, params


# --------------------------------------------------------------------------------- streaming

Produce = Callable[[int | None, list[str]], dict[str, np.ndarray]]


class _Pulled:
    """A leaf whose data orbax pulls from `produce` one layer at a time while it writes."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype, produce: Produce):
        self.key, self.shape, self.dtype, self.produce = key, tuple(shape), np.dtype(dtype), produce
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize

    def part(self, layer: int | None) -> np.ndarray:
        x = np.asarray(self.produce(layer, [self.key])[self.key])
        want = self.shape if layer is None else self.shape[1:]
        if x.shape != want or x.dtype != self.dtype:
            raise ModelCheckpointError(f"parameter {self.key!r}" + ("" if layer is None else f" layer {layer}")
                                       + f": produced {x.dtype}{x.shape}, expected {self.dtype}{want}")
        return x


class _PullHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler (same tensorstore spec, same on-disk format, restores as any array),
    except the data is written layer by layer as it is produced: a layer leaf is never whole in
    memory."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values, infos, args=None):
        # orbax makes one request per handler, so every leaf's write runs in one event loop and
        # this state needs no lock; set per save, so a failed save cannot silence the next
        self._writing = 0  # leaves with a TensorStore open or write in flight
        self._failed = False
        return await super().serialize(values, infos, args)

    async def _open_and_write(self, value: _Pulled, tspec, ts_context):
        # Orbax gathers the leaves' writes; the first to fail ends the gather and its event loop,
        # while the other leaves' TensorStore writes finish in TensorStore's own threads. Those
        # would land after the caller had removed the staging folder and re-create it. So a
        # failure stops the other leaves at their next layer and is raised only once nothing is
        # in flight.
        self._writing += 1
        try:
            await self._write(value, tspec, ts_context)
        except BaseException:
            self._failed = True
            self._writing -= 1
            while self._writing:
                await asyncio.sleep(0.01)
            raise
        self._writing -= 1

    async def _write(self, value: _Pulled, tspec, ts_context):
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        if value.key.startswith("layers/"):
            for layer in range(value.shape[0]):
                if self._failed:
                    return
                await t[layer].write(value.part(layer), can_reference_source_data_indefinitely=True)
        elif not self._failed:
            await t.write(value.part(None), can_reference_source_data_indefinitely=True)


def write_params_stream(params_dir: str, cfg: MixtralConfig, dtypes: dict[str, Any],
                        produce: Produce) -> None:
    """Write the params pytree under `params_dir` without ever holding it.

    produce(layer, names): numpy arrays for the given flat names; `layer` None asks for whole
    global leaves (embed, final_norm, lm_head), an int for `leaf[layer]` of layer leaves. Memory
    stays about one layer: each leaf has at most one produced slice in flight.
    """
    shapes = param_shapes(cfg)
    if set(dtypes) != set(shapes):
        raise ModelCheckpointError(f"dtypes given for {sorted(dtypes)}, parameters are {sorted(shapes)}")
    tree = unflatten({k: _Pulled(k, shapes[k], dtypes[k], produce) for k in shapes})
    registry = _registry((_Pulled, _PullHandler()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ck:
        ck.save(params_dir, args=ocp.args.PyTreeSave(tree, save_args=params_save_args(tree)))


def _registry(*extra):
    """Orbax's standard handlers plus ours (a registry of only ours makes orbax warn)."""
    return ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()), *extra)


class _StoreRef:
    """Restore type: an open TensorStore, read later slice by slice."""


class _OpenHandler(ocp.type_handlers.NumpyHandler):
    async def deserialize(self, infos, args=None):
        out = []
        for info in infos:
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
            out.append(await ts.open(ts.Spec(spec), open=True, context=info.ts_context))
        return out


class ParamsReader:
    """Lazy access to the params of a model checkpoint or trainer output_dir: `read(name, layer)`
    reads `leaf[layer]` (or the whole leaf) from disk; nothing else is loaded."""

    def __init__(self, path: str | os.PathLike, **runtime):
        self.location = locate(path)
        stored = _stored(self.location)
        self.shapes = {k: tuple(m.shape) for k, m in stored.items()}
        self.dtypes = {k: np.dtype(m.dtype) for k, m in stored.items()}
        self.cfg = _config(self.location, self.dtypes, None, **runtime)
        check_shapes(self.cfg, self.shapes, self.location.params_dir)
        registry = _registry((_StoreRef, _OpenHandler()))
        restore_args = unflatten({k: ocp.RestoreArgs(restore_type=_StoreRef) for k in stored})
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ck:
            stores = ck.restore(self.location.params_dir,
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))
        self._stores = flatten(stores)

    def read(self, name: str, layer: int | None = None) -> np.ndarray:
        t = self._stores[name]
        try:
            x = (t if layer is None else t[layer]).read().result()
        except Exception as e:  # tensorstore raises ValueError/RuntimeError subclasses
            raise ModelCheckpointError(f"{self.location.params_dir}: cannot read {name!r}"
                                       + ("" if layer is None else f" layer {layer}") + f": {e}") from None
        return np.asarray(x)

    def close(self) -> None:
        self._stores = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
