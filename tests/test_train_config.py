"""`load_train_config`: every value checked against its declared type (a ConfigError naming the key,
the value and the type, never a traceback), command-line parsing, and the step counts of
`TrainConfig.resolved_steps` against transformers' own resolution of ratios."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import yaml

from zephyr_jax.config import ConfigError
from zephyr_jax.train_config import TrainConfig, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def load(*argv: str) -> TrainConfig:
    return load_train_config(DEMO, list(argv))


# ----------------------------------------------------------------------------- types

BAD_VALUES = [  # (argv, the value as the message shows it, the expected type)
    (["--eval_steps", "ten"], "'ten'", "a number or null"),  # `int | None` fields: TypeError before
    (["--save_total_limit", "two"], "'two'", "an integer or null"),
    (["--logging_steps", "true"], "True", "a number"),  # booleans are not numbers
    (["--num_train_epochs", "true"], "True", "a number"),
    (["--per_device_train_batch_size", "true"], "True", "an integer"),
    (["--max_length", "130.5"], "130.5", "an integer"),  # no fraction for an int field
    (["--save_total_limit", "0.5"], "0.5", "an integer or null"),
    (["--max_length", ".inf"], "inf", "an integer"),
    (["--learning_rate", ".nan"], "nan", "a number"),
    (["--learning_rate", "fast"], "'fast'", "a number"),
    (["--export_hf", "1"], "1", "true or false"),
    (["--gradient_checkpointing", "full"], "'full'", "true or false"),
    (["--mesh", "4"], "4", "a mapping"),
    (["--model_overrides", "[remat]"], "['remat']", "a mapping"),
    (["--dataset_splits", "{train: 1}"], "{'train': 1}", "a list"),
]


@pytest.mark.parametrize("argv,shown,expected", BAD_VALUES, ids=lambda x: str(x))
def test_a_wrong_type_is_a_config_error_naming_key_value_and_type(argv, shown, expected):
    key = argv[0][2:]
    with pytest.raises(ConfigError) as err:
        load(*argv)
    msg = str(err.value)
    assert msg.startswith(f"{key}: expected {expected}"), msg
    assert msg.endswith(f"got {shown}"), msg


def test_yaml_file_values_are_checked_too(tmp_path):
    base = open(DEMO).read()
    for line, key in (("max_length: true", "max_length"), ("output_dir: 2024", "output_dir"),
                      ("eval_steps: [50]", "eval_steps"), ("report_to: [1]", "report_to")):
        path = tmp_path / "c.yaml"
        path.write_text(f"{base}\n{line}\n")
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_train_config(str(path))


def test_direct_construction_is_checked():
    good = load()
    with pytest.raises(ConfigError, match="^max_length: expected an integer, got True"):
        dataclasses.replace(good, max_length=True)
    with pytest.raises(ConfigError, match="^warmup_steps: expected a number, got '10'"):
        dataclasses.replace(good, warmup_steps="10")  # text is converted by the loader only


def test_conversions_that_loaded_before_still_load(tmp_path):
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        cfg = load_train_config(path)
        # the resolved config the trainer writes (train_config.yaml) reads back as itself
        out = tmp_path / os.path.basename(path)
        out.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        assert load_train_config(str(out)) == cfg
    cfg = load("--learning_rate", "1e-4", "--max_length", "256.0", "--num_train_epochs", "2",
               "--logging_steps", "20.0", "--export_max_shard_size", "1000000",
               "--save_total_limit", "null")
    assert cfg.learning_rate == 1e-4 and cfg.max_length == 256 and type(cfg.max_length) is int
    assert cfg.num_train_epochs == 2 and cfg.logging_steps == 20 and type(cfg.logging_steps) is int
    assert cfg.export_max_shard_size == 1000000 and cfg.save_total_limit is None
    # YAML 1.1 reads 5e-6 (no dot) as a string: still a number
    path = tmp_path / "lr.yaml"
    path.write_text(open(DEMO).read() + "\nlearning_rate: 5e-6\nmax_length: '256'\n")
    cfg = load_train_config(str(path))
    assert cfg.learning_rate == 5e-6 and cfg.max_length == 256


def test_string_keys_take_the_command_line_text_as_typed():
    assert load("--output_dir", "2024").output_dir == "2024"
    assert load("--eval_strategy", "no").eval_strategy == "no"
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not YAML
    assert load("--chat_template", template).chat_template == template
    assert load("--model_preset", "null", "--model_name_or_path", "x/y").model_preset is None
    with pytest.raises(ConfigError, match="eval_strategy"):  # YAML's `off` (False) is not `no`
        load("--eval_strategy", "off")


def test_bad_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="^--mesh: cannot parse"):
        load("--mesh", "{data: 2")
    path = tmp_path / "broken.yaml"
    path.write_text("max_length: [128\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(str(path))


# ----------------------------------------------------------------------------- command line

def test_a_non_boolean_key_without_a_value_names_the_key():
    for argv in (["--max_steps"], ["--max_steps", "--export_hf"], ["--learning-rate"]):
        with pytest.raises(ConfigError, match="^--(max_steps|learning_rate): missing value"):
            load(*argv)


def test_bare_boolean_flags_with_dashes_before_another_option():
    cfg = load("--export_hf", "false", "--export-hf", "--max_steps", "5")
    assert cfg.export_hf is True and cfg.max_steps == 5
    cfg = load("--export_hf", "false", "--max-steps", "7", "--export-hf")
    assert cfg.export_hf is True and cfg.max_steps == 7
    cfg = load("--gradient-checkpointing", "--max-steps=3")
    assert cfg.gradient_checkpointing is True and cfg.max_steps == 3


# ----------------------------------------------------------------------------- step ratios

def test_step_ratios_are_accepted_where_transformers_accepts_them():
    cfg = load("--warmup_steps", "0.1", "--eval_steps", "0.25", "--logging_steps", "0.05",
               "--save_steps", "0.5")
    got = (cfg.warmup_steps, cfg.eval_steps, cfg.logging_steps, cfg.save_steps)
    assert got == (0.1, 0.25, 0.05, 0.5)
    for key, value in (("eval_steps", "1.5"), ("save_steps", "100.5"), ("logging_steps", "2.5")):
        with pytest.raises(ConfigError, match=f"^{key}: must be a whole number"):
            load(f"--{key}", value)  # transformers: "must be an integer if bigger than 1"
    for key in ("eval_steps", "save_steps", "logging_steps"):
        with pytest.raises(ConfigError, match=f"^{key}: must be"):
            load(f"--{key}", "0")
    with pytest.raises(ConfigError, match="^warmup_steps: must be >= 0"):
        load("--warmup_steps", "-0.1")


# warmup, logging, eval (None: logging's), save; 0.07 * 100 = 7.000000000000001 ceils to 8 in HF
STEP_CASES = [
    (0, 10, None, 500),
    (20, 10, 50, 100),
    (0.1, 0.07, 0.25, 0.5),
    (0.03, 0.01, None, 0.3333),
    (0.999, 0.5, 0.001, 0.2),
    (2.5, 1.0, 1, 1),  # HF truncates a fractional warmup >= 1; 1.0 is one step
    (1, 7.0, 0.1, 0.9),
]
TOTALS = [1, 3, 7, 100, 333, 1000, 12345]


@pytest.mark.parametrize("warmup,logging,eval_,save", STEP_CASES, ids=str)
def test_resolved_steps_match_transformers(tmp_path, warmup, logging, eval_, save):
    from transformers import TrainingArguments
    from transformers.trainer_callback import TrainerState

    hf = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, logging_steps=logging,
                           eval_strategy="steps", eval_steps=eval_, save_strategy="steps",
                           save_steps=save, report_to="none", use_cpu=True)
    cfg = dataclasses.replace(load(), warmup_steps=warmup, logging_steps=logging, eval_steps=eval_,
                              save_steps=save)
    for total in TOTALS:
        state = TrainerState()
        state.compute_steps(hf, total)  # what Trainer does with the ratios at the start of a run
        want = {"warmup_steps": hf.get_warmup_steps(total), "logging_steps": state.logging_steps,
                "eval_steps": state.eval_steps, "save_steps": state.save_steps}
        got = cfg.resolved_steps(total)
        assert got == want, (total, got, want)
        assert all(type(v) is int for v in got.values()), got
        assert min(got["logging_steps"], got["eval_steps"], got["save_steps"]) >= 1


def test_resolved_steps_rejects_a_bad_total():
    with pytest.raises(ValueError):
        load().resolved_steps(-1)
    with pytest.raises(ValueError):
        load().resolved_steps(10.0)
