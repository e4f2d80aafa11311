"""Safetensors folders: a checked, lazy reader and a streaming sharded writer.

Reading never unpickles: `.bin`/`.pt` folders are refused. Files are opened with safetensors'
`pread` backend, so a read costs the tensor's bytes and nothing stays mapped. Every check that a
header allows (index vs files, dtypes, duplicate names) runs when the folder is opened, before any
tensor data is read, and each error names the file and the tensor.

Writing streams: the whole plan (names, shapes, dtypes in order) is fixed up front, so each shard's
header goes to disk first and tensors are appended as they are produced; nothing but the tensor
being written is held.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
import struct
import sys

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The dtypes Mixtral checkpoints come in. Others (int8 quantized, float64, ...) are refused rather
# than silently cast.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
_ST_NAME = {v: k for k, v in SUPPORTED_DTYPES.items()}
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def dtype_name(dtype) -> str:
    """"bfloat16" / "float16" / "float32" for a supported numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _ST_NAME:
        raise CheckpointError(f"dtype {dtype} is not supported; use one of bfloat16, float16, float32")
    return dtype.name


def parse_dtype(name) -> np.dtype:
    """numpy dtype from "bfloat16" / "float16" / "float32" (or a dtype)."""
    if name is None:
        return None
    if isinstance(name, str):
        lookup = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16",
                  "half": "F16", "float32": "F32", "fp32": "F32", "float": "F32"}
        if name.lower() not in lookup:
            raise CheckpointError(f"dtype {name!r} is not supported; use bfloat16, float16 or float32")
        return SUPPORTED_DTYPES[lookup[name.lower()]]
    dtype = np.dtype(name)
    dtype_name(dtype)
    return dtype


def refuse_pickles(folder: str) -> None:
    """Raise when `folder` only holds pickle checkpoints (which are never loaded)."""
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_EXTENSIONS))
    if pickles:
        raise CheckpointError(
            f"{os.path.join(folder, pickles[0])}: pickle checkpoints are not supported; safetensors "
            "is required (pickle files are never loaded: they can run code). Convert with "
            "transformers: from_pretrained(...).save_pretrained(dir) writes safetensors.")


class SafetensorsReader:
    """All tensors of a HF folder (sharded with an index, or plain *.safetensors files).

    `tensors` maps name -> TensorInfo from the headers; `read(name)` returns a numpy array.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{self.folder}: not a folder")
        self._handles: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._scan()
        except BaseException:
            self.close()
            raise

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="np", backend="pread")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: file not found") from None
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file "
                                      f"(truncated or corrupt?): {e}") from None
        return self._handles[file]

    def _file_tensors(self, file: str) -> dict[str, TensorInfo]:
        handle = self._open(file)
        out = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            st_dtype = sl.get_dtype()
            if st_dtype not in SUPPORTED_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has dtype {st_dtype}; only "
                    f"{'/'.join(SUPPORTED_DTYPES)} (bfloat16/float16/float32) are supported")
            out[name] = TensorInfo(name, file, SUPPORTED_DTYPES[st_dtype], tuple(sl.get_shape()))
        return out

    def _scan(self) -> None:
        folder = self.folder
        st_files = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
        index_path = os.path.join(folder, INDEX_FILE)
        if not st_files and not os.path.exists(index_path):
            refuse_pickles(folder)
            raise CheckpointError(f"{folder}: no *.safetensors files")
        if os.path.exists(index_path):
            try:
                with open(index_path) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            by_file: dict[str, list[str]] = {}
            for name, rel in weight_map.items():
                by_file.setdefault(rel, []).append(name)
            for rel, names in sorted(by_file.items()):
                file = os.path.join(folder, rel)
                if not os.path.exists(file):
                    raise CheckpointError(f"{index_path}: names tensor {names[0]!r} in file {rel!r}, "
                                          f"which does not exist ({file})")
                have = self._file_tensors(file)
                for name in names:
                    if name not in have:
                        raise CheckpointError(f"{file}: has no tensor {name!r}, but {INDEX_FILE} "
                                              "maps it to this file")
                for name, info in have.items():
                    if weight_map.get(name) != rel:
                        raise CheckpointError(f"{file}: tensor {name!r} is missing from {INDEX_FILE}"
                                              + (f" (which maps it to {weight_map[name]!r})"
                                                 if name in weight_map else ""))
                    self.tensors[name] = info
            listed = {os.path.normpath(os.path.join(folder, rel)) for rel in by_file}
            for file in st_files:
                base = os.path.basename(file)
                # Shards of this model that the index does not list: a broken or mixed-up folder.
                # Other safetensors files (consolidated.safetensors, adapters) are not ours to judge.
                if os.path.normpath(file) not in listed and re.match(r"model[-.]", base):
                    raise CheckpointError(f"{file}: file is not in {INDEX_FILE}; the index does not "
                                          "list any tensor from it")
        else:
            for file in st_files:
                for name, info in self._file_tensors(file).items():
                    if name in self.tensors:
                        raise CheckpointError(f"{file}: tensor {name!r} also appears in "
                                              f"{self.tensors[name].file}")
                    self.tensors[name] = info

    def read(self, name: str) -> np.ndarray:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
        try:
            x = self._open(info.file).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} "
                                  f"(truncated or corrupt?): {e}") from None
        if x.dtype != info.dtype or tuple(x.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} read as {x.dtype}{x.shape}, "
                                  f"header says {info.dtype}{info.shape}")
        return x

    def close(self) -> None:
        for h in self._handles.values():
            try:
                h.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------ writing


def parse_size(size: int | str) -> int:
    """Bytes from 5GB / 500MB / 2GiB / 1000 (decimal units as transformers uses them)."""
    if isinstance(size, int):
        return size
    # "I" only after a prefix: a bare "5IB" once matched and then failed the unit lookup
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]I?)?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB")
    unit = m.group(2)
    base = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * base)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class ShardedWriter:
    """Writes planned tensors, in plan order, into `model-0000X-of-0000N.safetensors` shards of at
    most `max_shard_size` bytes (a single tensor larger than that gets a shard of its own) plus
    `model.safetensors.index.json`; one shard is written as `model.safetensors`, as transformers does.
    """

    def __init__(self, folder: str, plan: list[PlannedTensor], max_shard_size: int | str,
                 metadata: dict[str, str] | None = None, files: range | None = None,
                 write_index: bool = True):
        """`files`: the shards this writer writes (indices into `self.files`; default all); the
        tensors of the others are passed over (`write(name, None)`), so several writers, e.g. one
        per process, can share one folder. `write_index`: whether this one writes the index."""
        if sys.byteorder != "little":  # safetensors is little-endian; we write raw bytes
            raise RuntimeError("writing safetensors needs a little-endian host")
        self.folder = folder
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_size)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            dtype_name(t.dtype)
            if shards[-1] and size + t.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.files = ([SINGLE_FILE] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._shards = shards
        self._shard_of = [i for i, shard in enumerate(shards) for _ in shard]  # plan order
        self.mine = range(n) if files is None else files
        self.write_index = write_index
        self._next = 0  # index into plan
        self._shard = -1
        self._fh = None
        self.bytes_written = 0

    def wants(self, name: str) -> bool:
        """Whether `name` (a planned tensor) goes into one of this writer's shards."""
        return self._shard_of[self._index[name]] in self.mine

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.plan)}

    def _start_shard(self, i: int) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for t in self._shards[i]:
            header[t.name] = {"dtype": _ST_NAME[np.dtype(t.dtype)], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
        self._fh = open(os.path.join(self.folder, self.files[i]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = i

    def write(self, name: str, array: np.ndarray | None) -> None:
        """The next planned tensor; None for one of another writer's shards (`wants` is False)."""
        if self._next >= len(self.plan):
            raise ValueError(f"tensor {name!r} is not in the write plan (all tensors written)")
        t = self.plan[self._next]
        if name != t.name:
            raise ValueError(f"expected tensor {t.name!r} next, got {name!r}")
        shard = self._shard_of[self._next]
        self._next += 1
        if shard not in self.mine:
            return
        if array is None:
            raise ValueError(f"tensor {name!r}: no data, and it belongs to this writer's shard "
                             f"{self.files[shard]}")
        if tuple(array.shape) != t.shape or np.dtype(array.dtype) != np.dtype(t.dtype):
            raise ValueError(f"tensor {name!r}: planned {np.dtype(t.dtype)}{t.shape}, "
                             f"got {array.dtype}{tuple(array.shape)}")
        if shard != self._shard:
            if self._fh is not None:
                self._fh.close()
            self._start_shard(shard)
        self._fh.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.bytes_written += t.nbytes

    def close(self) -> None:
        """Finish the last shard and write the index. Raises if tensors are missing."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next != len(self.plan):
            raise ValueError(f"only {self._next} of {len(self.plan)} planned tensors were written; "
                             f"next was {self.plan[self._next].name!r}")
        if len(self.files) > 1 and self.write_index:
            weight_map = {t.name: self.files[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan),
                                  "total_parameters": sum(math.prod(t.shape) for t in self.plan)},
                     "weight_map": weight_map}
            with open(os.path.join(self.folder, INDEX_FILE), "w") as fh:
                json.dump(index, fh, indent=2, sort_keys=True)
                fh.write("\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
