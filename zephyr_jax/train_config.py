"""Training configuration: the alignment-handbook / HF TrainingArguments names, from YAML + CLI.

`load_train_config("configs/demo.yaml", ["--learning_rate", "1e-4"])` reads the file, applies the
overrides (values parsed as YAML scalars), rejects unknown keys naming the nearest known one, and
validates everything that can be checked before a compile.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
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
    warmup_steps: int = 0
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
    logging_steps: int = 10
    eval_strategy: str = "steps"
    eval_steps: int | None = None
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    # here: not a HF key. Checkpoints are copied to host memory and written by a background
    # thread while training goes on (orbax async); false waits for each write.
    async_checkpointing: bool = True
    report_to: tuple = ("tensorboard",)
    export_hf: bool = False
    export_max_shard_size: str = "5GB"  # here: save_pretrained's max_shard_size for export_hf
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
        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ConfigError(f"{key}: {msg} (got {getattr(self, key)!r})")

        need(bool(self.model_name_or_path) != bool(self.model_preset), "model_name_or_path",
             "set exactly one of model_name_or_path (pretrained) and model_preset (random init)")
        need(isinstance(self.dataset_mixer, dict) and len(self.dataset_mixer) > 0, "dataset_mixer",
             "needs at least one dataset: {name_or_path: fraction}")
        for name, frac in (self.dataset_mixer or {}).items():
            if not (isinstance(frac, int | float) and 0 < frac <= 1):
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
                    "gradient_accumulation_steps", "logging_steps", "save_steps", "loss_chunk_size"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key,
                 "must be a positive integer")
        need(self.eval_steps is None or self.eval_steps > 0, "eval_steps", "must be > 0")
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
        need(set(self.report_to) <= {"tensorboard", "jsonl", "none"}, "report_to",
             "supports tensorboard (metrics.jsonl is always written)")
        need(not self.push_to_hub, "push_to_hub", "is not supported; export with --export_hf")
        try:
            shard_bytes = parse_size(self.export_max_shard_size)
        except (ValueError, AttributeError):
            shard_bytes = 0
        need(shard_bytes > 0 and not isinstance(self.export_max_shard_size, bool),
             "export_max_shard_size", "must be a positive size such as 5GB, 500MB or 2GiB")

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


def _check_keys(keys, source: str) -> None:
    for key in keys:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values parsed as YAML scalars (1e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and key in FIELDS
                                       and FIELDS[key].type in ("bool",)):
                raw, i = "true", i + 1  # bare flag: --export_hf
            else:
                raw, i = argv[i + 1], i + 2
        key = key.replace("-", "_")
        out[key] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_train_config(path: str | os.PathLike | None, argv: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        try:
            with open(path) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of training keys")
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
    for key, f in FIELDS.items():  # ints and floats written as YAML ints/strings ("5e-6")
        if key in values and f.type in ("float", "int") and isinstance(values[key], str):
            try:
                values[key] = float(values[key]) if f.type == "float" else int(values[key])
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {values[key]!r}") from None
    return TrainConfig(**values)


DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.yaml")
