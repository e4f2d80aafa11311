"""Training configuration: the alignment-handbook / HF TrainingArguments names, from YAML + CLI.

`load_train_config("configs/demo.yaml", ["--learning_rate", "1e-4"])` reads the file, applies the
overrides (values parsed as YAML scalars), rejects unknown keys naming the nearest known one, and
validates everything that can be checked before a compile.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from typing import Any

import yaml

from zephyr_jax.config import CONFIG_DIR, ConfigError, MixtralConfig
from zephyr_jax.hf_io.safetensors_io import parse_size

SCHEDULERS = ("inverse_sqrt", "linear", "cosine", "constant", "constant_with_warmup")
# HF `optim` values we accept; all run optax AdamW (see README: adamw_bnb_8bit is approximated by
# full-precision AdamW, optionally with bfloat16 moments).
OPTIMS = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit")
STRATEGIES = ("no", "steps", "epoch")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- model ---
    model_name_or_path: str | None = None  # HF folder / Hub id / zephyr_jax checkpoint
    model_preset: str | None = None  # configs/model/NAME.yaml or a YAML path: random init
    model_overrides: dict = dataclasses.field(default_factory=dict)  # MixtralConfig fields
    torch_dtype: str | None = None  # handbook name: parameter + compute dtype
    gradient_checkpointing: bool = False
    tokenizer_name_or_path: str | None = None
    chat_template: str | None = None
    # --- data ---
    dataset_mixer: dict = dataclasses.field(default_factory=dict)
    dataset_splits: tuple = ("train", "test")
    preprocessing_num_workers: int = 1
    max_length: int = 2048
    max_prompt_length: int = 1792
    max_bad_row_fraction: float = 0.05
    # --- ORPO ---
    beta: float = 0.05
    # TRL takes the NLL's token mean per device batch; with 1 pair per device (the seed run) that
    # is a mean over sequences of each sequence's token mean: "sequences" reproduces it.
    nll_reduction: str = "tokens"
    # --- optimization ---
    optim: str = "adamw"
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "inverse_sqrt"
    # HF: >= 1 is a step count (a float is truncated, as HF's int()), < 1 a ratio of the total
    # optimizer steps; `resolved_steps` gives the count
    warmup_steps: int | float = 0
    num_train_epochs: float = 3
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer_moment_dtype: str = "float32"
    seed: int = 42
    # --- bookkeeping ---
    output_dir: str = "outputs/run"
    # logging/eval/save_steps as HF: an integer >= 1, or a float in (0, 1) = a ratio of the total
    # optimizer steps; eval_steps null means logging_steps. `resolved_steps` gives the counts.
    logging_steps: int | float = 10
    logging_first_step: bool = False  # HF: also log step 1
    eval_strategy: str = "steps"
    eval_steps: int | float | None = None
    save_strategy: str = "steps"
    save_steps: int | float = 500
    save_total_limit: int | None = None
    # here: not a HF key. Checkpoints are copied to host memory and written by a background
    # thread while training goes on (orbax async); false waits for each write.
    async_checkpointing: bool = True
    report_to: tuple = ("tensorboard",)
    export_hf: bool = False
    # here: save_pretrained's max_shard_size for export_hf: a size ("5GB") or a byte count
    export_max_shard_size: str | int = "5GB"
    loss_chunk_size: int = 512
    # --- scale ---
    mesh: dict = dataclasses.field(default_factory=dict)
    sharding_rules: tuple | None = None
    distributed: dict = dataclasses.field(default_factory=dict)
    # here: not a HF key. On a multi-device mesh, compile the train step so XLA overlaps the
    # FSDP collectives with compute on GPUs (trainer.OVERLAP_COMPILER_OPTIONS)
    overlap_collectives: bool = True
    do_eval: bool = True  # false: no evaluation, whatever eval_strategy says
    # --- accepted for recipe compatibility, no effect here ---
    bf16: bool = True
    log_level: str = "info"
    hub_model_id: str | None = None
    push_to_hub: bool = False

    def __post_init__(self):
        for key in FIELD_TYPES:  # every value against its declared type, before any comparison
            value = getattr(self, key)
            checked = check_type(key, value)
            if checked is not value:
                object.__setattr__(self, key, checked)

        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ConfigError(f"{key}: {msg} (got {getattr(self, key)!r})")

        need(bool(self.model_name_or_path) != bool(self.model_preset), "model_name_or_path",
             "set exactly one of model_name_or_path (pretrained) and model_preset (random init)")
        need(isinstance(self.dataset_mixer, dict) and len(self.dataset_mixer) > 0, "dataset_mixer",
             "needs at least one dataset: {name_or_path: fraction}")
        for name, frac in (self.dataset_mixer or {}).items():
            if isinstance(frac, bool) or not (isinstance(frac, int | float) and 0 < frac <= 1):
                raise ConfigError(f"dataset_mixer[{name!r}]: fraction must be in (0, 1], got {frac!r}")
        need(self.max_length > 0, "max_length", "must be > 0")
        need(0 < self.max_prompt_length < self.max_length, "max_prompt_length",
             f"must be > 0 and < max_length={self.max_length}")
        need(0 <= self.max_bad_row_fraction <= 1, "max_bad_row_fraction", "must be in [0, 1]")
        need(self.beta > 0, "beta", "must be > 0")
        need(self.nll_reduction in ("tokens", "sequences"), "nll_reduction",
             "must be tokens or sequences")
        need(self.optim in OPTIMS, "optim", f"must be one of {OPTIMS}")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", f"must be one of {SCHEDULERS}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs",
             "must be > 0 unless max_steps is set")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "loss_chunk_size"):
            need(getattr(self, key) > 0, key, "must be a positive integer")
        for key in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, key)
            if value is None:
                continue
            need(value > 0, key, "must be an integer >= 1 or a ratio of the total steps in (0, 1)")
            if isinstance(value, float) and value >= 1:  # HF: "must be an integer if bigger than 1"
                need(value == int(value), key, "must be a whole number of steps when >= 1, "
                     "or a ratio in (0, 1) of the total steps")
                object.__setattr__(self, key, int(value))
        need(self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit",
             "must be > 0 or null")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.optimizer_moment_dtype in ("float32", "bfloat16"), "optimizer_moment_dtype",
             "must be float32 or bfloat16")
        need(self.torch_dtype in (None, "float32", "bfloat16", "float16"), "torch_dtype",
             "must be float32, bfloat16 or float16")
        need(self.eval_strategy in STRATEGIES, "eval_strategy", f"must be one of {STRATEGIES}")
        need(self.save_strategy in STRATEGIES, "save_strategy", f"must be one of {STRATEGIES}")
        for key in ("dataset_splits", "report_to"):
            need(all(isinstance(x, str) for x in getattr(self, key)), key,
                 "must be a list of names")
        need(set(self.report_to) <= {"tensorboard", "jsonl", "none"}, "report_to",
             "supports tensorboard (metrics.jsonl is always written)")
        need(not self.push_to_hub, "push_to_hub", "is not supported; export with --export_hf")
        try:
            shard_bytes = parse_size(self.export_max_shard_size)
        except (ValueError, AttributeError):
            shard_bytes = 0
        need(shard_bytes > 0 and not isinstance(self.export_max_shard_size, bool),
             "export_max_shard_size", "must be a positive size such as 5GB, 500MB or 2GiB")

    def resolved_steps(self, total_steps: int) -> dict[str, int]:
        """The step counts of a run of `total_steps` optimizer steps, as transformers resolves them.

        Returns {"warmup_steps", "logging_steps", "eval_steps", "save_steps"}, all ints:
        - warmup_steps: `TrainingArguments.get_warmup_steps`: int(warmup_steps) when >= 1, else
          ceil(total_steps * warmup_steps) (a ratio; 0 stays 0).
        - logging/eval/save_steps: `TrainerState.compute_steps`: a value < 1 is a ratio,
          ceil(total_steps * value); a value >= 1 is a count. eval_steps null is logging_steps
          (`TrainingArguments.__post_init__` with eval_strategy "steps"; only used then).
        For total_steps >= 1 the last three are >= 1.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
            raise ValueError(f"total_steps must be an integer >= 0, got {total_steps!r}")

        def every(value) -> int:
            return int(value) if value >= 1 else math.ceil(total_steps * value)

        warmup = self.warmup_steps
        eval_steps = self.logging_steps if self.eval_steps is None else self.eval_steps
        return {
            "warmup_steps": int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup),
            "logging_steps": every(self.logging_steps),
            "eval_steps": every(eval_steps),
            "save_steps": every(self.save_steps),
        }

    def model_config(self) -> MixtralConfig:
        """The MixtralConfig of a random-init run (pretrained runs read config.json instead)."""
        if self.model_preset is None:
            raise ConfigError("model_preset is not set")
        if os.path.exists(self.model_preset):
            cfg = MixtralConfig.from_yaml(self.model_preset)
        else:
            cfg = MixtralConfig.preset(self.model_preset)
        return cfg.replace(**self.runtime_overrides())

    def runtime_overrides(self) -> dict:
        over = dict(self.model_overrides)
        if self.torch_dtype:
            over.setdefault("dtype", self.torch_dtype)
            over.setdefault("param_dtype", self.torch_dtype)
        if self.gradient_checkpointing:
            over.setdefault("remat", "full")
        return over

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# key -> the declared types, e.g. (int, float, NoneType) for `int | float | None`
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    key: typing.get_args(hint) or (hint,)
    for key, hint in typing.get_type_hints(TrainConfig).items() if key in FIELDS
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", tuple: "a list", type(None): "null"}


def _expected(types: tuple[type, ...]) -> str:
    if int in types and float in types:  # "an integer or a number" reads oddly
        types = tuple(t for t in types if t is not int)
    return " or ".join(_TYPE_NAMES[t] for t in types)


def check_type(key: str, value: Any, from_text: bool = False) -> Any:
    """`value` checked against the declared type of field `key`, normalized: a whole float for an
    integer field becomes an int; with `from_text` (YAML/command-line values), a string such as
    "5e-6" for a numeric field is converted. Raises ConfigError naming the key, the value and the
    expected type: booleans are not numbers, numbers are finite, an int field takes no fraction."""
    types = FIELD_TYPES[key]

    def bad():
        return ConfigError(f"{key}: expected {_expected(types)}, got {value!r}")

    if value is None:
        if type(None) in types:
            return value
        raise bad()
    if isinstance(value, bool):
        if bool in types:
            return value
        raise bad()
    numeric = int in types or float in types
    if numeric and str not in types and isinstance(value, str) and from_text:
        text = value.strip()
        try:
            number: Any = int(text) if int in types else float(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise bad() from None
        return check_type(key, number)
    if isinstance(value, int) and numeric:
        return value
    if isinstance(value, float) and numeric:
        if not math.isfinite(value):
            raise bad()
        if float in types:
            return value
        if value != int(value):
            raise bad()
        return int(value)
    if tuple in types and isinstance(value, list):  # as YAML writes a tuple
        return tuple(tuple(x) if isinstance(x, list) else x for x in value)
    if not isinstance(value, bool | int | float) and isinstance(value, types):
        return value
    raise bad()


def _check_keys(keys, source: str) -> None:
    for key in keys:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values parsed as YAML scalars (1e-4, true, [a, b]).

    A bare `--key` (last, or followed by another option) is `true` for a boolean key and an error
    for any other. A string key takes the text as typed when YAML would read it as something else
    (`--output_dir 2024`, `--eval_strategy no`, a chat template); `null` stays null.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            key = key.replace("-", "_")
            i += 1
        else:
            key = key.replace("-", "_")  # before the look-up: --export-hf is export_hf
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                types = FIELD_TYPES.get(key, (bool,))  # unknown keys: _check_keys names them
                if bool not in types:
                    raise ConfigError(f"--{key}: missing value (expected {_expected(types)})")
                raw, i = "true", i + 1  # bare flag: --export_hf
            else:
                raw, i = argv[i + 1], i + 2
        out[key] = _parse_value(key, raw)
    return out


def _parse_value(key: str, raw: str) -> Any:
    if key not in FIELD_TYPES:
        return raw  # _check_keys names the unknown key
    types = FIELD_TYPES[key]
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        if str in types:
            return raw
        raise ConfigError(f"--{key}: cannot parse {raw!r} as YAML: {_one_line(e)}") from None
    if str in types and value is not None and not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, types):
            return raw
    return value


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def load_train_config(path: str | os.PathLike | None, argv: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        try:
            with open(path) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of training keys")
        for key in values:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be names, got {key!r}")
        _check_keys(values, path)
    overrides = parse_overrides(argv or [])
    _check_keys(overrides, "command line")
    values.update(overrides)
    for key in ("eval_strategy", "save_strategy"):  # YAML 1.1 reads an unquoted `no` as False
        if values.get(key) is False:
            values[key] = "no"
    for key in ("dataset_splits", "report_to", "sharding_rules"):
        if isinstance(values.get(key), list):
            values[key] = tuple(tuple(x) if isinstance(x, list) else x for x in values[key])
        elif isinstance(values.get(key), str):
            values[key] = (values[key],)
    for key in values:  # numbers written as YAML strings ("5e-6"), every type checked
        values[key] = check_type(key, values[key], from_text=True)
    return TrainConfig(**values)


DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.yaml")
