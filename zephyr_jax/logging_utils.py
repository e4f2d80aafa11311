"""Run logging: metrics as JSON lines, TensorBoard event files, and a tqdm progress bar.

The metric names are TRL's (`loss`, `rewards/accuracies`, `eval_rewards/accuracies`,
`learning_rate`, `grad_norm`, `epoch`, ...), so curves line up with the seed run's. TensorBoard
tags follow the HF Trainer's TensorBoardCallback: `eval_x` -> `eval/x`, everything else ->
`train/x`. TensorBoard files are written with tensorboardX (no TensorFlow needed).

Example:
    with RunLogger("out/zephyr", logging_steps=10, resume_step=state_step) as logger:
        bar = logger.progress(total=total_steps, initial=state_step)
        for step in range(state_step + 1, total_steps + 1):
            ...
            bar.update(step, loss=loss, lr=lr, tokens=n_tokens)
            if logger.should_log(step):
                logger.log(step, {"loss": loss, "learning_rate": lr, "grad_norm": gn, "epoch": ep,
                                  "router/layer_{}/expert_{}_share": share_LE})
        bar.close()
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "runs"
# "jsonl" is accepted for symmetry: metrics.jsonl is always written.
REPORT_TO = ("tensorboard", "jsonl", "none")

__all__ = [
    "ProgressBar",
    "RunLogger",
    "expand_array_metric",
    "read_metrics",
    "read_tensorboard_scalars",
    "tensorboard_tag",
]


def tensorboard_tag(key: str) -> str:
    """HF TensorBoardCallback's `rewrite_logs`: `eval_x` -> `eval/x`, `test_x` -> `test/x`,
    anything else `x` -> `train/x`."""
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"train/{key}"


def expand_array_metric(key: str, value: Any) -> dict[str, float]:
    """One scalar per element of an array-valued metric, named after its index.

    `{}` placeholders in the key take the indices in order (`router/layer_{}/expert_{}_share`
    with a [layers, experts] value gives `router/layer_0/expert_3_share`, ...); a key without
    exactly `ndim` placeholders gets `/i/j` appended instead.
    """
    arr = np.asarray(value, dtype=np.float64)
    out = {}
    for idx in np.ndindex(arr.shape):
        if key.count("{}") == arr.ndim:
            name = key.format(*idx)
        else:
            name = "/".join([key, *map(str, idx)])
        out[name] = float(arr[idx])
    return out


def _to_json(value: Any) -> Any:
    """Python scalars / nested lists for JSON; takes numpy and jax arrays (without importing jax)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (str, Mapping)) for v in value):
        return [_to_json(v) for v in value]
    arr = np.asarray(value)
    if arr.dtype.kind in "iubf":
        return arr.tolist()  # 0-d arrays become Python scalars
    return arr.astype(np.float64).tolist()  # e.g. bfloat16, whose tolist() JSON can't encode


class RunLogger:
    """Appends metric dicts to `output_dir/metrics.jsonl` and to TensorBoard in `output_dir/runs/`.

    Each JSON line is `{"step": step, **metrics}`, flushed on every write so a crash loses nothing
    that was logged. Array-valued metrics (per-layer, per-expert) stay one nested list in JSON and
    become one scalar per element in TensorBoard (`expand_array_metric`); strings go to
    TensorBoard as text.

    Resuming: pass `resume_step` (the step of the checkpoint the run restarts from). Lines already
    in metrics.jsonl with a larger step came from the crashed tail and will be logged again, so
    they are dropped; TensorBoard gets `purge_step = resume_step + 1`, which makes it hide the old
    events from that step on. Without `resume_step` an existing file is appended to as it is, and
    TensorBoard's purge starts after its last step (the right point if the caller already cut the
    file back to the checkpoint). A torn last line (a crash mid-write) is always dropped.

    Multi-host: only `jax.process_index() == 0` writes by default (`enabled=None`); on the others
    every method is a no-op and the progress bar is hidden.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        report_to: Iterable[str] | str = ("tensorboard",),
        logging_steps: int = 10,
        *,
        logging_first_step: bool = False,
        resume_step: int | None = None,
        enabled: bool | None = None,
        flush_secs: int = 30,
    ):
        report_to = (report_to,) if isinstance(report_to, str) else tuple(report_to)
        unknown = [r for r in report_to if r not in REPORT_TO]
        if unknown:
            raise ValueError(
                f"report_to={list(report_to)!r}: {unknown} not supported; allowed values: "
                f"{', '.join(REPORT_TO)} (metrics.jsonl is always written)"
            )
        if logging_steps < 0:
            raise ValueError(f"logging_steps must be >= 0, got {logging_steps}")
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.output_dir = Path(output_dir)
        self.logging_steps = logging_steps
        self.logging_first_step = logging_first_step
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        last_step = _prepare_for_append(self.metrics_path, resume_step)
        purge_step = resume_step if resume_step is not None else last_step
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # closed in close()
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=str(self.output_dir / TENSORBOARD_DIR),
                purge_step=None if purge_step is None else purge_step + 1,
                flush_secs=flush_secs,
                # Event file names carry the time in whole seconds + host; a writer opened within
                # the same second (a quick resume) would otherwise overwrite the first file. A
                # nanosecond suffix keeps names unique and in creation order, the order in which
                # TensorBoard (and read_tensorboard_scalars) replays files and applies the purge.
                filename_suffix=f".{time.time_ns()}.{os.getpid()}",
            )

    def should_log(self, step: int) -> bool:
        """HF's DefaultFlowCallback rule: every `logging_steps` optimizer steps (and step 1 if
        `logging_first_step`)."""
        if step == 1 and self.logging_first_step:
            return True
        return self.logging_steps > 0 and step % self.logging_steps == 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record for optimizer step `step` (HF's `global_step`) to every sink."""
        if isinstance(step, Mapping) or not isinstance(metrics, Mapping):
            raise TypeError("RunLogger.log takes (step, metrics)")
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_json(v) for k, v in metrics.items() if k != "step"})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            tag = tensorboard_tag(key)
            if isinstance(value, str):
                self._tb.add_text(tag, value, step)
            elif isinstance(value, list):
                for name, x in expand_array_metric(tag, value).items():
                    self._tb.add_scalar(name, x, step)
            elif isinstance(value, (int, float)):
                self._tb.add_scalar(tag, float(value), step)
        # HF flushes after every log call too: logging is every few steps, so this is cheap.
        self._tb.flush()

    def progress(self, total: int, initial: int = 0, desc: str = "train") -> ProgressBar:
        """A `ProgressBar` over optimizer steps, shown only where this logger writes."""
        return ProgressBar(total, initial, desc=desc, enabled=self.enabled)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's configuration as TensorBoard text `args` (as HF logs TrainingArguments)."""
        if self.enabled and self._tb is not None:
            self._tb.add_text("args", json.dumps(_to_json(config), indent=2, sort_keys=True))
            self._tb.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both sinks; safe to call twice."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepare_for_append(path: Path, resume_step: int | None) -> int | None:
    """Drop a torn last line (crash mid-write) and, when resuming, records after `resume_step`.

    Returns the largest step left in the file (None if there is none).
    """
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    if resume_step is not None:
        lines = [ln for ln in lines if _line_step(ln) is not None and _line_step(ln) <= resume_step]
    kept = "".join(lines)
    if kept != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(kept, encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, not half
    steps = [st for st in map(_line_step, lines) if st is not None]
    return max(steps, default=None)


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of `output_dir/metrics.jsonl`, in file order."""
    path = Path(output_dir) / METRICS_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in `logdir` as {tag: [(step, value), ...]}, without TensorFlow.

    Parses the TFRecord framing (length, masked CRC32C, payload, masked CRC32C; CRCs checked)
    and tensorboardX's Event protos. Files are read in name order (they start with the creation
    time); a `SessionLog.START` at step S hides earlier values at steps >= S, as TensorBoard's
    purge does, so the result is what TensorBoard would plot.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for payload in _read_records(path):
            event = event_pb2.Event.FromString(payload)
            if (
                event.HasField("session_log")
                and event.session_log.status == event.session_log.START
            ):
                for tag, values in scalars.items():
                    scalars[tag] = [(s, v) for s, v in values if s < event.step]
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    x = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    x = value.tensor.float_val[0]
                else:
                    continue  # text and other plugins
                scalars.setdefault(value.tag, []).append((int(event.step), float(x)))
    return scalars


def _read_records(path: Path) -> Iterable[bytes]:
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", f.read(4))
            if length_crc != masked_crc32c(header):
                raise ValueError(f"{path}: corrupt record length")
            payload = f.read(length)
            (payload_crc,) = struct.unpack("<I", f.read(4))
            if payload_crc != masked_crc32c(payload):
                raise ValueError(f"{path}: corrupt record payload")
            yield payload


class ProgressBar:
    """tqdm bar over optimizer steps: `step/total`, ETA (tqdm's), loss, lr and tokens/s.

    `update(step, ...)` takes the absolute step, so a resumed run passes its checkpoint step as
    `initial_step` and the ETA counts only the steps still to run. tokens/s is measured between
    consecutive `update` calls (pass the number of tokens processed since the previous call).
    Usually made by `RunLogger.progress`.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        desc: str = "train",
        enabled: bool = True,
        file: io.TextIOBase | None = None,
        mininterval: float = 1.0,
    ):
        self._file = file
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            unit="step",
            disable=not enabled,
            file=file,
            mininterval=mininterval,
            dynamic_ncols=True,
        )
        self._last_time = time.perf_counter()

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        tokens: float | None = None,
    ) -> None:
        """Move the bar to `step` and show the given values (None ones are left out)."""
        now = time.perf_counter()
        elapsed, self._last_time = now - self._last_time, now
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if lr is not None:
            postfix["lr"] = f"{float(lr):.3e}"
        if tokens is not None and elapsed > 0:
            postfix["tok/s"] = _si(float(tokens) / elapsed)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(message, file=self._file)

    def close(self) -> None:
        self._bar.close()


def _si(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"
