"""Streaming conversion between HF safetensors folders and zephyr_jax model checkpoints.

Both directions go one group at a time (the global tensors, then each decoder layer), so resident
memory stays about one layer whatever the model size: `hf_to_jax` pulls each layer's HF tensors
while orbax writes it (`model_checkpoint.write_params_stream`); `jax_to_hf` reads one layer of the
orbax checkpoint, turns it into HF tensors and appends them to safetensors shards whose headers were
written up front (`ShardedWriter`). Outputs appear only when complete (`staged_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from zephyr_jax import model_checkpoint as mc
from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io import mapping
from zephyr_jax.hf_io.safetensors_io import (
    CheckpointError,
    PlannedTensor,
    SafetensorsReader,
    ShardedWriter,
    dtype_name,
    parse_dtype,
)

TOKENIZER_FILES = mc.TOKENIZER_FILES
GENERATION_CONFIG = "generation_config.json"


class _Progress:
    """tqdm over bytes, with tensors done / total in the postfix. Counts each name once."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool):
        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=desc, disable=not enabled, dynamic_ncols=True)
        self._seen: set[str] = set()
        self._total = total_tensors

    def done(self, name: str, nbytes: int) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self._bar.set_postfix_str(f"tensors {len(self._seen)}/{self._total}", refresh=False)
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()


# ------------------------------------------------------------------------------- HF -> ours


class HFSource:
    """A HF Mixtral folder checked against its config.json: every name, shape and dtype is
    validated from the headers when it is opened; `produce` then reads one layer at a time."""

    def __init__(self, hf_dir: str | os.PathLike, cfg: MixtralConfig | None = None):
        self.folder = os.fspath(hf_dir)
        self.cfg = cfg or MixtralConfig.from_hf(self.folder)
        self.reader = SafetensorsReader(self.folder)
        try:
            self._check()
        except BaseException:
            self.reader.close()
            raise
        self.progress: _Progress | None = None

    def _check(self) -> None:
        tensors = {n: t for n, t in self.reader.tensors.items()
                   if not n.endswith(mapping.IGNORED_SUFFIXES)}
        try:
            self.layout = mapping.detect_layout(tensors)
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        expected = mapping.expected_tensors(self.cfg, self.layout)
        for name, shape in expected.items():
            if name not in tensors:
                raise CheckpointError(f"{self.folder}: missing tensor {name!r} (in no safetensors "
                                      "file of the folder)")
            if tensors[name].shape != shape:
                raise CheckpointError(f"{tensors[name].file}: tensor {name!r} has shape "
                                      f"{tensors[name].shape}, config.json implies {shape}")
        for name, t in tensors.items():
            if name not in expected:
                raise CheckpointError(f"{t.file}: unexpected tensor {name!r} (not a weight of "
                                      f"this config.json's Mixtral in the {self.layout} layout)")
        self.tensors = {n: tensors[n] for n in expected}
        self.total_bytes = sum(t.nbytes for t in self.tensors.values())

    def leaf_dtypes(self, dtype=None) -> dict[str, np.dtype]:
        """Our leaves' dtypes: `dtype` for all, or each leaf's source dtype (which must agree
        across the leaf's HF tensors: one stacked array has one dtype)."""
        out = {}
        for leaf, names in mapping.tensors_of_leaves(self.cfg, self.layout).items():
            first = self.tensors[names[0]]
            for name in names[1:]:
                t = self.tensors[name]
                if dtype is None and t.dtype != first.dtype:
                    raise CheckpointError(
                        f"{t.file}: tensor {name!r} is {t.dtype} but {first.name!r} (in "
                        f"{first.file}) is {first.dtype}; both are parameter {leaf!r}: pass a "
                        "dtype (--dtype) to convert them to one")
            out[leaf] = dtype or first.dtype
        return out

    def read(self, name: str) -> np.ndarray:
        x = self.reader.read(name)
        if self.progress is not None:
            self.progress.done(name, self.tensors[name].nbytes)
        return x

    def produce(self, layer: int | None, leaves=None, dtype=None,
                experts: range | None = None) -> dict[str, np.ndarray]:
        out = mapping.group_to_ours(self.cfg, self.layout, layer, self.read, leaves, experts)
        if dtype is not None:
            out = {k: v.astype(dtype, copy=False) for k, v in out.items()}
        return out

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _copy_sidecars(src: str, dst: str, names=(*TOKENIZER_FILES, GENERATION_CONFIG)) -> list[str]:
    copied = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def hf_to_jax(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype=None,
              overwrite: bool = False, progress: bool = False) -> MixtralConfig:
    """Convert a HF Mixtral folder into a model checkpoint at `out`, one layer at a time.

    dtype: "bfloat16" / "float16" / "float32"; default keeps each tensor's dtype (bitwise).
    Tokenizer files and generation_config.json are copied along. Returns the config written.
    """
    hf_dir = os.fspath(hf_dir)
    dtype = parse_dtype(dtype)
    with HFSource(hf_dir) as src:
        dtypes = src.leaf_dtypes(dtype)
        cfg = src.cfg.replace(param_dtype=dtype_name(dtypes["embed"]))
        with mc.staged_dir(out, overwrite, sources=(hf_dir,)) as tmp:
            mc.write_config(tmp, cfg)
            _copy_sidecars(hf_dir, tmp)
            src.progress = _Progress("hf-to-jax", src.total_bytes, len(src.tensors), progress)
            try:
                mc.write_params_stream(os.path.join(tmp, mc.PARAMS_ITEM), cfg, dtypes,
                                       lambda layer, keys: src.produce(layer, keys, dtype))
            finally:
                src.progress.close()
    return cfg


# ------------------------------------------------------------------------------- ours -> HF


def _generation_config(cfg: MixtralConfig) -> dict[str, Any]:
    """What transformers' `GenerationConfig.from_model_config` keeps of config.json: the special
    token ids, the EOS list whole (generate stops at any of them), pad only when set."""
    out = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.to_hf()["eos_token_id"]}
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    return out


def write_hf(out: str | os.PathLike, cfg: MixtralConfig, leaf_dtypes: dict[str, Any],
             produce: Callable[[int | None, list[str]], dict[str, np.ndarray]], *,
             fused_experts: bool = False, max_shard_size: int | str = "5GB", dtype=None,
             tokenizer=None, sidecar_dirs: tuple[str, ...] = (), overwrite: bool = False,
             progress: bool = False, part: tuple[int, int] | None = None,
             sources: tuple[str, ...] = ()) -> None:
    """Write a HF folder from our params, pulled one group at a time with `produce(layer, names)`.

    tokenizer: a tokenizer object (`save_pretrained(dir)`) or a folder of tokenizer files.
    sidecar_dirs: folders whose tokenizer files / generation_config.json are copied when present
        (first wins; an explicit `tokenizer` wins over them).
    part: (i, n) writes only the i-th of n contiguous runs of the shard files, straight into the
        existing folder `out` (no staging: the caller renames it when all n parts are done), and
        reads only the layers they hold; part 0 also writes the index, config, tokenizer and
        generation config. n writers (processes, machines) then share one export.
    sources: folders `produce` reads from. `out` must not be or contain one of them, nor one of
        `sidecar_dirs` or a `tokenizer` folder (`mc.check_not_source`); inside one is fine (the
        trainer stages its parts in `output_dir/.hf.export-partial`, inside the output_dir they
        are read from).
    """
    read_dirs = (*sources, *sidecar_dirs, mc.tokenizer_folder(tokenizer))
    layout = "fused" if fused_experts else mapping.DEFAULT_LAYOUT
    dtype = parse_dtype(dtype)
    hf_dtypes = mapping.hf_dtypes(cfg, layout, {k: np.dtype(v) for k, v in leaf_dtypes.items()})
    plan = [PlannedTensor(name, shape, dtype or hf_dtypes[name])
            for g in mapping.groups(cfg)
            for name, shape in mapping.group_names(cfg, layout, g).items()]
    out_dtype = dtype or np.dtype(leaf_dtypes["embed"])

    def fill(folder: str, files: range | None, extras: bool) -> None:
        writer = ShardedWriter(folder, plan, max_shard_size, files=files, write_index=extras)
        by_name = {t.name: t for t in plan}
        mine = [t for t in plan if writer.wants(t.name)]
        bar = _Progress("jax-to-hf", sum(t.nbytes for t in mine), len(mine), progress)
        try:
            for g in mapping.groups(cfg):
                names = mapping.group_names(cfg, layout, g)
                if not any(writer.wants(n) for n in names):  # another part's layer: not read
                    for name in names:
                        writer.write(name, None)
                    continue
                ours = produce(g, mapping.group_leaves(cfg, layout, g))
                for name, x in mapping.group_to_hf(cfg, layout, g, ours):
                    if writer.wants(name):
                        writer.write(name, x.astype(by_name[name].dtype, copy=False))
                        bar.done(name, by_name[name].nbytes)
                    else:
                        writer.write(name, None)
                del ours
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        if not extras:
            return
        mc.write_config(folder, cfg.replace(param_dtype=dtype_name(out_dtype)))
        copied: list[str] = []
        for d in sidecar_dirs:
            want = [n for n in (*TOKENIZER_FILES, GENERATION_CONFIG)
                    if n not in copied and not (tokenizer is not None and n in TOKENIZER_FILES)]
            copied += _copy_sidecars(d, folder, want)
        if tokenizer is not None:
            mc.save_tokenizer(tokenizer, folder)
        if GENERATION_CONFIG not in copied:
            with open(os.path.join(folder, GENERATION_CONFIG), "w") as fh:
                json.dump(_generation_config(cfg), fh, indent=2)
                fh.write("\n")

    if part is None:
        with mc.staged_dir(out, overwrite, sources=read_dirs) as tmp:
            fill(tmp, None, True)
        return
    i, n = part
    if not 0 <= i < n:
        raise ValueError(f"part {i}/{n}: need 0 <= i < n")
    mc.check_not_source(out, read_dirs)
    folder = os.fspath(out)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: the folder the parts share must exist")
    n_files = len(ShardedWriter(folder, plan, max_shard_size).files)
    fill(folder, range(i * n_files // n, (i + 1) * n_files // n), i == 0)


def jax_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *, max_shard_size: int | str = "5GB",
              tokenizer: str | os.PathLike | None = None, fused_experts: bool = False,
              overwrite: bool = False, dtype=None, progress: bool = False,
              part: tuple[int, int] | None = None) -> MixtralConfig:
    """Convert a model checkpoint (or a trainer output_dir's latest step) into a HF folder that
    `transformers.AutoModelForCausalLM.from_pretrained` loads, one layer at a time.

    tokenizer: a folder whose tokenizer files are copied; default: those in the checkpoint folder.
    fused_experts: write transformers 5's fused expert tensors instead of per-expert ones.
    dtype: default keeps the stored dtypes (bitwise round trips).
    part: (i, n): only the i-th of n runs of shard files, into the existing folder `out` (`write_hf`).
    """
    if tokenizer is not None and not any(
            os.path.isfile(os.path.join(os.fspath(tokenizer), n)) for n in TOKENIZER_FILES):
        raise CheckpointError(f"{os.fspath(tokenizer)}: no tokenizer files (looked for "
                              f"{', '.join(TOKENIZER_FILES)})")
    with mc.ParamsReader(ckpt) as reader:
        write_hf(out, reader.cfg, reader.dtypes,
                 lambda layer, keys: {k: reader.read(k, layer) for k in keys},
                 fused_experts=fused_experts, max_shard_size=max_shard_size, dtype=dtype,
                 tokenizer=tokenizer, sidecar_dirs=(reader.location.root,), overwrite=overwrite,
                 progress=progress, part=part,
                 sources=(reader.location.root, reader.location.params_dir))
    return reader.cfg


def save_hf(params: dict, cfg: MixtralConfig, out: str | os.PathLike, **kwargs) -> None:
    """Write in-memory params (our nested dict of numpy or jax arrays) as a HF folder.
    kwargs: those of `write_hf` (fused_experts, max_shard_size, dtype, tokenizer, sidecar_dirs,
    overwrite)."""
    flat = mc.flatten(params)
    mc.check_shapes(cfg, {k: tuple(v.shape) for k, v in flat.items()}, "params")

    def produce(layer, keys):
        return {k: np.asarray(flat[k] if layer is None else flat[k][layer]) for k in keys}

    write_hf(out, cfg, {k: np.dtype(v.dtype) for k, v in flat.items()}, produce, **kwargs)
