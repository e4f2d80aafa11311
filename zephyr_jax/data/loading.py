"""Finding preference data: Hub datasets, local files and folders, and the handbook's mixer.

A spec is one of:
- a local `.jsonl` / `.json` / `.parquet` file: the train split (a train split's name contains
  "train"); asking it for a test split is an error, not the same rows again;
- a folder written by `datasets.save_to_disk` (a `DatasetDict` is indexed by split; a single
  `Dataset` is the train split, as a file is), or a folder holding one such folder per split (the
  handbook's `load_from_disk(os.path.join(ds, split))`);
- a folder holding `{split}.jsonl` (or `.json` / `.parquet`), like `SAMPLE_DATA`;
- any other folder `datasets.load_dataset(folder, split=split)` reads (e.g. a Hub snapshot);
- `"sample"` (when no such local path exists): the shipped `SAMPLE_DATA`;
- otherwise a Hugging Face Hub dataset id, loaded with `datasets.load_dataset(spec, split=...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import datasets
import pyarrow as pa

from zephyr_jax.data.paths import SAMPLE_DATA
from zephyr_jax.data.report import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HANDBOOK_SEED = 42  # alignment-handbook's `mix_datasets` shuffles with seed 42
HANDBOOK_COLUMNS = ("prompt", "chosen", "rejected")  # run_orpo.py's `columns_to_keep`
SAMPLE_ALIAS = "sample"  # names the shipped sample set in configs


class DatasetLoadError(DataError):
    """A spec that names no readable dataset; the message says what was tried."""


def _read_json_rows(path: str) -> tuple[list, list[str]]:
    """The rows of a .jsonl / .json file and where each came from ("line 7", "row 3")."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows, where = [], []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetLoadError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    where.append(f"line {lineno}")
            return rows, where
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetLoadError(f"{path}: not valid JSON ({e})") from None
    if isinstance(rows, Mapping):  # {"data": [...]} or column-oriented {"col": [...]}
        rows = rows["data"] if "data" in rows else [dict(zip(rows, v, strict=True))
                                                    for v in zip(*rows.values(), strict=True)]
    if not isinstance(rows, list):
        raise DatasetLoadError(f"{path}: expected a list of rows, found a {type(rows).__name__}")
    return rows, [f"row {i}" for i in range(len(rows))]


def _first_conflict(values: list) -> int:
    """Index of the first value Arrow cannot put in one column with the values before it (the
    values before a conflict convert, so the first failing prefix ends at it)."""
    lo, hi = 1, len(values)  # pa.array(values[:hi]) fails; find the shortest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            pa.array(values[:mid])
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _load_file(path: str) -> datasets.Dataset:
    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    # Read JSON ourselves: no Arrow cache written next to the user's data, nested lists kept.
    rows, where = _read_json_rows(path)
    for row, at in zip(rows, where, strict=True):
        if not isinstance(row, Mapping):
            raise DatasetLoadError(f"{path} ({at}): a row must be a JSON object, found a "
                                   f"{type(row).__name__}")
    # Arrow infers the columns from the first row: give every row every key (missing -> None) so
    # a row lacking a key is counted by validation instead of the key vanishing for all rows.
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        # Arrow names neither the row nor the column (often it quotes a valid value): find them.
        for k in keys:
            values = [r.get(k) for r in rows]
            try:
                pa.array(values)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                i = _first_conflict(values)
                raise DatasetLoadError(
                    f"{path} ({where[i]}): key {k!r} = {_short(values[i])} does not have the "
                    f"type this key has in the rows before it (a file is one table: one type per "
                    f"key; null is allowed)") from None
        raise DatasetLoadError(f"{path}: not readable as one table ({type(e).__name__}: {e})") from e


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "state.json"))


def _one_table(spec: str, split: str, what: str) -> None:
    """A file or a saved `Dataset` has no split names: it is the train split (what
    `datasets.load_dataset` makes of one), never a test split, or the run would evaluate on the
    rows it trains on."""
    if "train" not in split:
        raise DatasetLoadError(
            f"{spec} is {what} without split names, read as the train split; split {split!r} is "
            f"not in it. Put those rows in a folder as {split}.jsonl (or a save_to_disk "
            f"DatasetDict with a {split!r} split) and name the folder")


def _load_folder(path: str, split: str) -> datasets.Dataset:
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetLoadError(f"{path} has splits {list(loaded)}, not {split!r}")
            return loaded[split]
        _one_table(path, split, "one save_to_disk Dataset")
        return loaded
    split_dir = os.path.join(path, split)
    if os.path.isdir(split_dir) and _is_saved_dataset(split_dir):
        return datasets.load_from_disk(split_dir)
    for suffix in FILE_SUFFIXES:
        candidate = os.path.join(path, split + suffix)
        if os.path.isfile(candidate):
            return _load_file(candidate)
    # Any other layout `datasets.load_dataset(folder, split=...)` reads, as the handbook called
    # it: e.g. a Hub snapshot (`hf download --repo-type dataset --local-dir`), data/train-*.parquet.
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many types here (FileNotFoundError, ValueError, ...)
        raise DatasetLoadError(
            f"{path} is a folder but holds no save_to_disk dataset, no {split}/ dataset, no "
            f"{split}{{{','.join(FILE_SUFFIXES)}}} file, and datasets.load_dataset({path!r}, "
            f"split={split!r}) failed: {type(e).__name__}: {e}") from e


def load_preference_dataset(spec: str, split: str = "train") -> datasets.Dataset:
    """Loads one split of a preference dataset from a local file or folder, or the Hub (see the
    module docstring for the forms of `spec`)."""
    spec = os.fspath(spec)
    if spec == SAMPLE_ALIAS and not os.path.exists(spec):
        spec = SAMPLE_DATA
    if os.path.isfile(spec):
        if not spec.endswith(FILE_SUFFIXES):
            raise DatasetLoadError(f"{spec}: expected a {'/'.join(FILE_SUFFIXES)} file")
        _one_table(spec, split, "one file")
        return _load_file(spec)
    if os.path.isdir(spec):
        return _load_folder(spec, split)
    if spec.endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        # A path, not a Hub id ("name" or "org/name"): do not ask the Hub about it.
        raise DatasetLoadError(f"{spec}: no such file or folder")
    try:
        return datasets.load_dataset(spec, split=split)
    except Exception as e:  # offline: ConnectionError, LocalEntryNotFoundError, OSError, ...
        raise DatasetLoadError(
            f"could not load {spec!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}. Offline? Pass a local .jsonl/.json/.parquet file, a "
            f"save_to_disk folder or a folder with {split}.jsonl (e.g. zephyr_jax.data.SAMPLE_DATA)."
        ) from e


def _check_mixer(dataset_mixer: Mapping[str, float], splits: Sequence[str]) -> None:
    if not dataset_mixer:
        raise DataError("dataset_mixer is empty")
    for spec, frac in dataset_mixer.items():
        if not 0 <= frac <= 1:
            raise DataError(f"dataset_mixer[{spec!r}] = {frac}: fractions must be in [0, 1]")
    for split in splits:
        if "train" not in split and "test" not in split:
            raise DataError(f"split {split!r} is neither a train nor a test split")


def _mix(dataset_mixer, splits, columns_to_keep, shuffle, seed) -> datasets.Dataset:
    parts = []
    for spec, frac in dataset_mixer.items():
        for split in splits:
            ds = load_preference_dataset(spec, split)
            ds = ds.remove_columns([c for c in ds.column_names if c not in columns_to_keep])
            # Train splits are subsampled; test splits are kept whole (fair comparison).
            parts.append(ds.select(range(int(frac * len(ds)))) if "train" in split else ds)
    mixed = datasets.concatenate_datasets(parts)
    return mixed.shuffle(seed=seed) if shuffle else mixed


def load_mixture(
    dataset_mixer: Mapping[str, float],
    split: str = "train",
    *,
    columns_to_keep: Sequence[str] = HANDBOOK_COLUMNS,
    shuffle: bool = True,
    seed: int = HANDBOOK_SEED,
) -> datasets.Dataset:
    """One split of the handbook's `dataset_mixer` (`{spec: fraction}`): each dataset's split
    keeps `columns_to_keep`; a train split (name contains "train") keeps its first
    `int(fraction * len)` rows, a test split all rows; concatenated in mixer order, then shuffled
    with `seed` (42 in the handbook: `datasets.Dataset.shuffle(seed=42)`)."""
    _check_mixer(dataset_mixer, [split])
    return _mix(dataset_mixer, [split], columns_to_keep, shuffle, seed)


def mix_datasets(
    dataset_mixer: Mapping[str, float],
    splits: Sequence[str] = ("train",),
    *,
    columns_to_keep: Sequence[str] = HANDBOOK_COLUMNS,
    shuffle: bool = True,
    seed: int = HANDBOOK_SEED,
) -> dict[str, datasets.Dataset]:
    """The handbook's `mix_datasets(dataset_mixer, splits)`: {"train": ..., "test": ...}, all
    splits of a kind concatenated (dataset by dataset) before the shuffle (see `load_mixture`)."""
    _check_mixer(dataset_mixer, splits)
    return {kind: _mix(dataset_mixer, names, columns_to_keep, shuffle, seed)
            for kind, names in splits_by_kind(splits).items()}


def splits_by_kind(splits: Sequence[str]) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} (kinds without a split left out): a name with "train" is a
    train split, any other (with "test") a test split, as the handbook's `mix_datasets` sorts them."""
    out: dict[str, list[str]] = {}
    for split in splits:
        out.setdefault("train" if "train" in split else "test", []).append(split)
    return out
