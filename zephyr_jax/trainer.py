"""The ORPO training run: data, model, optimizer, checkpoints, logging, eval, export.

`train(cfg)` is what `python -m zephyr_jax.train` calls; notebooks can call it too.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax import data as zdata
from zephyr_jax import sharding
from zephyr_jax.config import ConfigError, MixtralConfig
from zephyr_jax.distributed import any_process, maybe_initialize
from zephyr_jax.logging_utils import RunLogger
from zephyr_jax.model import Mixtral, params_dict
from zephyr_jax.model.expert_parallel import check_exchange
from zephyr_jax.optim import make_optimizer, make_schedule
from zephyr_jax.train_checkpoint import TrainCheckpointer
from zephyr_jax.train_config import TrainConfig
from zephyr_jax.train_step import TrainState, create_train_state, make_eval_step, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad data); the message says where."""


def build_model_config(cfg: TrainConfig) -> MixtralConfig:
    """The model's config alone (config.json of a pretrained model, or the preset): enough to
    plan the mesh before any weight is read."""
    if cfg.model_name_or_path:
        from zephyr_jax.pretrained import resolve_path

        return MixtralConfig.from_hf(resolve_path(cfg.model_name_or_path), **cfg.runtime_overrides())
    return cfg.model_config()


def build_params(cfg: TrainConfig, model_cfg: MixtralConfig, shardings) -> dict:
    """Pretrained weights (HF folder or Hub id, our checkpoint, a trainer output_dir), restored
    onto `shardings`, or a seeded random init computed directly sharded."""
    if cfg.model_name_or_path:
        from zephyr_jax.pretrained import load_params

        _, params = load_params(cfg.model_name_or_path, shardings=shardings,
                                **cfg.runtime_overrides())
        return params
    init = jax.jit(lambda: params_dict(Mixtral(model_cfg, rngs=nnx.Rngs(params=cfg.seed))),
                   out_shardings=shardings)
    return init()


def _tokenizer_source(cfg: TrainConfig) -> str | None:
    """tokenizer_name_or_path, else the model's folder when it has tokenizer files, else None
    (the shipped Mixtral v1 tokenizer)."""
    if cfg.tokenizer_name_or_path:
        return cfg.tokenizer_name_or_path
    path = cfg.model_name_or_path
    if path and os.path.isdir(path):
        has = any(os.path.exists(os.path.join(path, f))
                  for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
        return path if has else None
    return path  # a Hub id (or None)


def build_data(cfg: TrainConfig, tokenizer, process_index: int, process_count: int):
    """Tokenized (train, eval) examples; eval is None without a test split.

    Splits go by name, as the handbook's `mix_datasets` sorts them: every split whose name has
    "train" is training data, every other ("test" in its name) held-out data, in any order.
    """
    mixed = zdata.mix_datasets(cfg.dataset_mixer, cfg.dataset_splits)  # the handbook's seed 42
    if "train" not in mixed:
        raise ConfigError(f"dataset_splits: {list(cfg.dataset_splits)} names no train split "
                          "(a split whose name contains 'train')")
    out = {}
    for kind, rows in mixed.items():
        names = zdata.splits_by_kind(cfg.dataset_splits)[kind]
        examples, report = zdata.tokenize_dataset(
            rows, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            max_bad_fraction=cfg.max_bad_row_fraction, source=f"{kind} split {'+'.join(names)}")
        if process_index == 0:
            print(f"[data] {kind} ({'+'.join(names)}): {report.summary()}", flush=True)
        if not examples:
            raise zdata.DataError(f"{kind} split {'+'.join(names)}: no pair is left after "
                                  f"processing ({report.summary()}); check max_prompt_length="
                                  f"{cfg.max_prompt_length} and the data")
        out[kind] = examples
    return out["train"], out.get("test")


def _stack_micro(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# HF logs these as they were at the logging step (its own grad norm, the lr that step used), and
# window means for the loss and TRL's stored metrics
_AT_STEP = ("learning_rate", "grad_norm")


def _mean_window(window: list[dict]) -> dict:
    out = {}
    for k in window[0]:
        vals = np.stack([np.asarray(m[k], np.float64) for m in window])
        out[k] = vals.sum(0) if k == "num_tokens" else vals[-1] if k in _AT_STEP else vals.mean(0)
    return out


class _StopFlag:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def eval_batches(examples, batch_size: int, max_length: int, pad_token_id: int,
                 shard_index: int = 0, shard_count: int = 1):
    """`(this process's rows, real pairs)` of each global eval batch of `batch_size` pairs, in order;
    the process loads block `shard_index` of `shard_count` (`sharding.process_batch_block`).

    Every pair is evaluated: the last global batch is filled up with empty pairs (no attended
    token, no label, so they count in no metric), which keeps one shape for every batch and lets
    it split over any number of devices and processes."""
    if batch_size % shard_count:
        raise ValueError(f"eval batch of {batch_size} pairs does not split into {shard_count} "
                         "equal blocks: some pairs would be evaluated by no process")
    local = batch_size // shard_count
    n = len(examples)
    filler = {k: np.zeros(0, np.int32) for k in zdata.BATCH_KEYS}
    for start in range(0, n, batch_size):
        mine = range(min(start + shard_index * local, n), min(start + (shard_index + 1) * local, n))
        rows = [examples[i] for i in mine] + [filler] * (local - len(mine))
        yield zdata.collate(rows, max_length, pad_token_id), min(batch_size, n - start)


def evaluate(eval_fn, params, examples, batch_size: int, max_length: int, pad_token_id: int,
             to_global=lambda b, leading: b, shard_index: int = 0, shard_count: int = 1) -> dict:
    """The eval step's metrics over every held-out pair, `eval_` names, as HF + TRL report them:
    `eval_loss` the mean over pairs (HF's evaluation loop weighs each batch's loss by its size),
    TRL's metrics the mean over batches of each batch's value (its `store_metrics`)."""
    window, sizes = [], []
    for batch, real in eval_batches(examples, batch_size, max_length, pad_token_id,
                                    shard_index, shard_count):
        window.append(jax.device_get(eval_fn(params, to_global(batch, 0))))
        sizes.append(real)
    if not window:
        return {}
    out = _mean_window(window)
    out["loss"] = np.average([np.float64(m["loss"]) for m in window], weights=sizes)
    return {f"eval_{k}": v for k, v in out.items()}


def mesh_and_shardings(cfg: TrainConfig, model_cfg: MixtralConfig, global_batch: int,
                       devices=None):
    """(mesh, rules, params shardings) for `cfg` on all devices (or `devices`: the planner's
    compile-only GPUs); raises ShardingError naming the keys when `global_batch` pairs per
    micro-batch or the experts cannot be split."""
    mesh = sharding.make_mesh(sharding.MeshConfig.from_dict(cfg.mesh, source="mesh"), devices)
    rules = sharding.normalize_rules(cfg.sharding_rules) if cfg.sharding_rules else sharding.DEFAULT_RULES
    sharding.validate(mesh, model_cfg, global_batch, rules)
    return mesh, rules, sharding.params_dict_shardings(model_cfg, mesh, rules)


def make_tx(cfg: TrainConfig, total_steps: int):
    """(schedule, optimizer) of the run."""
    schedule = make_schedule(cfg.lr_scheduler_type, cfg.learning_rate,
                             cfg.resolved_steps(total_steps)["warmup_steps"], total_steps)
    tx = make_optimizer(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                        moment_dtype=jnp.dtype(cfg.optimizer_moment_dtype))
    return schedule, tx


# XLA options for the train step on a multi-device mesh (`overlap_collectives`): on GPUs the
# layer loop's FSDP all-gathers / reduce-scatters are pipelined one layer ahead and the loop
# double-buffered, so they run under the previous layer's compute (NVIDIA JAX-Toolbox's FSDP
# settings). XLA renamed the pipelining switches: jax 0.11's takes an enum (default / off / on /
# explicit), jax 0.10's booleans, and each refuses the other's names, hence one set per
# generation, the first the installed XLA accepts. Other backends ignore these fields.
_COMMON = {"xla_gpu_enable_latency_hiding_scheduler": True,
           "xla_gpu_enable_while_loop_double_buffering": True}
OVERLAP_COMPILER_OPTIONS = (
    MappingProxyType({**_COMMON, **{f"xla_gpu_pipeline_{c}": "COLLECTIVE_PIPELINING_MODE_ON"
                                   for c in ("all_gather", "reduce_scatter", "all_reduce")}}),
    MappingProxyType({**_COMMON, **{f"xla_gpu_enable_pipelined_{c}": True
                                   for c in ("all_gather", "reduce_scatter", "all_reduce")}}),
)


@functools.cache
def overlap_compiler_options() -> dict | None:
    """The first of `OVERLAP_COMPILER_OPTIONS` this XLA accepts (a tiny compile tells), or None."""
    for options in OVERLAP_COMPILER_OPTIONS:
        try:
            jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0.0).compile()
        except jax.errors.JaxRuntimeError as e:
            if "compile option" in str(e) or "enum value" in str(e):
                continue
            raise
        return dict(options)
    return None


def sharded_steps(cfg: TrainConfig, model_cfg: MixtralConfig, params, tx, schedule, mesh, p_shard):
    """(abstract TrainState, its shardings, jitted train step, jitted eval step).

    `params` may be arrays or ShapeDtypeStructs (only shapes are read): `zephyr_jax.plan` lowers
    these very steps from abstract inputs. Trace them under `sharding.use_mesh(mesh, rules)`.
    """
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
    s_shard = TrainState(step=sharding.mirror_shardings(abstract_state.step, {}, mesh),
                         params=p_shard,
                         opt_state=sharding.mirror_shardings(abstract_state.opt_state, p_shard, mesh))
    replicated = sharding.mirror_shardings(0, {}, mesh)
    options = overlap_compiler_options() if cfg.overlap_collectives and mesh.size > 1 else None
    train_step = jax.jit(
        make_train_step(model_cfg, tx, schedule, cfg.beta, cfg.loss_chunk_size, cfg.nll_reduction),
        in_shardings=(s_shard, None), out_shardings=(s_shard, replicated), donate_argnums=0,
        compiler_options=options)
    eval_step = jax.jit(make_eval_step(model_cfg, cfg.beta, cfg.loss_chunk_size, cfg.nll_reduction),
                        in_shardings=(p_shard, None), out_shardings=replicated)
    return abstract_state, s_shard, train_step, eval_step


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `cfg`; returns the last logged metrics."""
    maybe_initialize(cfg.distributed)  # before anything asks JAX about devices
    os.makedirs(cfg.output_dir, exist_ok=True)
    process_index, process_count = jax.process_index(), jax.process_count()
    n_devices = jax.device_count()

    model_cfg = build_model_config(cfg)
    micro_batch = cfg.per_device_train_batch_size * n_devices  # global pairs per micro-batch
    accum = cfg.gradient_accumulation_steps
    if process_count > 1 and cfg.export_hf and cfg.save_strategy == "no":
        raise ConfigError("export_hf: on several processes the export streams the final "
                          "checkpoint; set save_strategy to steps or epoch")
    # every check that can fail does so before data loading and compiles
    mesh, rules, p_shard = mesh_and_shardings(cfg, model_cfg, micro_batch)
    # which rows this process loads: its block of every global batch (hosts the batch axes do
    # not split share a block and load the same rows)
    block, blocks = sharding.process_batch_block(mesh, rules, micro_batch)
    if model_cfg.moe_exchange == "ragged":  # unproven on GPUs: checked on these devices first
        err = check_exchange(mesh, rules)
        if process_index == 0:
            print("[train] moe_exchange ragged: the mesh does not split the experts, no exchange "
                  "runs" if err is None else "[train] moe_exchange ragged agrees with the padded "
                  f"exchange on this mesh (largest relative difference {err:.1e})", flush=True)

    tokenizer = zdata.load_tokenizer(_tokenizer_source(cfg), chat_template=cfg.chat_template)
    train_examples, eval_examples = build_data(cfg, tokenizer, process_index, process_count)

    if len(train_examples) < micro_batch:
        raise ConfigError(f"dataset_mixer: {len(train_examples)} train pairs are fewer than one "
                          f"micro-batch of {micro_batch} (per_device_train_batch_size * devices)")
    loader = zdata.PreferenceLoader(train_examples, batch_size=micro_batch // blocks,
                                    max_length=cfg.max_length, pad_token_id=tokenizer.pad_token_id,
                                    seed=cfg.seed, num_epochs=None, shard_index=block,
                                    shard_count=blocks)
    # HF: an epoch is every micro-batch of the loader; its last optimizer step takes the
    # micro-batches left over when `accum` does not divide them (`micro_count`)
    steps_per_epoch = math.ceil(loader.steps_per_epoch / accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    schedule, tx = make_tx(cfg, total_steps)

    abstract_params = jax.eval_shape(
        lambda: params_dict(Mixtral(model_cfg, rngs=nnx.Rngs(params=cfg.seed))))
    with sharding.use_mesh(mesh, rules):  # the MoE picks expert parallelism at trace time
        abstract_state, s_shard, train_step, eval_step = sharded_steps(
            cfg, model_cfg, abstract_params, tx, schedule, mesh, p_shard)
        ckpt = TrainCheckpointer(cfg.output_dir, cfg.save_total_limit, cfg.async_checkpointing)
        resumed = ckpt.latest_step()
        if resumed is not None:
            target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  abstract_state, s_shard)
            state, meta = ckpt.restore(target)  # no weights are read from the base model
            # process 0 wrote the meta; every process stands at the same step of its own shard
            data_state = meta["data_state"]
            try:
                loader.set_state({**data_state, "config": {**data_state["config"],
                                                           "shard_index": block}})
            except ValueError as e:  # other batch size, device or process count, or data
                raise ConfigError(
                    f"cannot resume {ckpt.directory}/{resumed}: {e}. Resume with the run's "
                    "per_device_train_batch_size, devices, processes, seed and data, or start a "
                    "new output_dir") from None
            print(f"[train] resumed from {ckpt.directory}/{resumed}", flush=True)
        else:
            params = build_params(cfg, model_cfg, p_shard)
            state = jax.jit(lambda p: create_train_state(p, tx), out_shardings=s_shard)(params)
            del params
        try:
            return _loop(cfg, model_cfg, mesh, rules, state, loader, ckpt, train_step, eval_step,
                         eval_examples, tokenizer, steps_per_epoch, total_steps, accum, resumed,
                         n_devices, process_index, process_count, block, blocks)
        finally:  # a save still being written (async) finishes before the process ends
            ckpt.close()


def _loop(cfg, model_cfg, mesh, rules, state, loader, ckpt, train_step, eval_step, eval_examples,
          tokenizer, steps_per_epoch, total_steps, accum, resumed, n_devices, process_index,
          process_count, block, blocks):
    if process_index == 0:
        _write_run_files(cfg, model_cfg)

    def to_global(batch, leading):
        return {k: sharding.global_batch_array(v, mesh, rules, leading, blocks)
                for k, v in batch.items()}

    micro_per_epoch = loader.steps_per_epoch

    def micro_count(step: int) -> int:
        """Micro-batches of optimizer step `step` (0-based): `accum`, but the epoch's last step
        takes only what is left of the epoch (HF's last, shorter accumulation)."""
        return min(accum, micro_per_epoch - (step % steps_per_epoch) * accum)

    def epoch_at(steps: int) -> float:
        """Epochs done after `steps` optimizer steps, in micro-batches as HF counts them."""
        full, part = divmod(steps, steps_per_epoch)
        return full + part * accum / micro_per_epoch

    def next_batch(step: int):
        return to_global(_stack_micro([next(loader) for _ in range(micro_count(step))]), leading=1)

    # the loader runs one batch ahead of the state (below), so checkpoints record the position
    # after the batches the saved state has consumed, not the loader's own
    data_state = loader.get_state()

    def save_meta() -> dict:
        return {"step": int(state.step), "data_state": data_state, "config": cfg.to_dict(),
                "model_config": model_cfg.to_hf()}

    # resume_step drops what an earlier run logged past the step this one starts from (all of
    # it on a fresh start: a run that died before its first save), so the log has no duplicates
    every = cfg.resolved_steps(total_steps)  # HF: a value below 1 is a ratio of total_steps
    logger = RunLogger(cfg.output_dir, report_to=cfg.report_to, logging_steps=every["logging_steps"],
                       logging_first_step=cfg.logging_first_step, resume_step=int(state.step))
    logger.log_config(cfg.to_dict())  # TensorBoard text "args", as HF's callback writes it
    # HF: eval_steps defaults to logging_steps (resolved_steps applies it)
    eval_every = every["eval_steps"] if cfg.eval_strategy == "steps" and cfg.do_eval else None
    step, window, last_logged = int(state.step), [], {}
    # HF's end-of-training summary covers this session's steps only
    session = {"start": time.time(), "steps": 0, "pairs": 0, "loss_sum": 0.0}
    progress = logger.progress(total=total_steps, initial=step)
    with _StopFlag() as stop:
        batch = next_batch(step) if step < total_steps else None
        while step < total_steps:
            session["pairs"] += math.prod(batch["chosen_input_ids"].shape[:2])  # [A, B, T]
            state, metrics = train_step(state, batch)  # dispatched: the device runs it from here
            data_state = loader.get_state()
            # read and send the next batch while this step runs, instead of after it: the
            # device_get below is the loop's only wait for the device
            batch = next_batch(step + 1) if step + 1 < total_steps else None
            metrics = jax.device_get(metrics)
            step += 1
            if not metrics.pop("finite"):
                ckpt.wait()  # a save in flight lands first, so the step named below is on disk
                raise TrainingError(
                    f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; "
                    f"stopping. The update was not applied; the last good checkpoint in "
                    f"{ckpt.directory} (step {ckpt.latest_step()}) is intact.")
            window.append(metrics)
            session["steps"] += 1
            session["loss_sum"] += float(metrics["loss"])
            progress.update(step, loss=float(metrics["loss"]), lr=float(metrics["learning_rate"]),
                            tokens=float(metrics["num_tokens"]))
            if logger.should_log(step):  # HF's rule; the last steps' window goes into the summary
                last_logged = {**_mean_window(window), "epoch": epoch_at(step)}
                logger.log(step, last_logged)
                window = []
            at_epoch_end = step % steps_per_epoch == 0
            if (eval_examples is not None and step < total_steps and cfg.do_eval
                    and ((eval_every and step % eval_every == 0)
                         or (cfg.eval_strategy == "epoch" and at_epoch_end))):
                logger.log(step, {**evaluate(eval_step, state.params, eval_examples,
                                             cfg.per_device_eval_batch_size * n_devices,
                                             cfg.max_length, tokenizer.pad_token_id, to_global,
                                             block, blocks), "epoch": epoch_at(step)})
            if cfg.save_strategy == "steps" and step % every["save_steps"] == 0:
                ckpt.save(state, save_meta())
            if cfg.save_strategy == "epoch" and at_epoch_end:
                ckpt.save(state, save_meta())
            if any_process(stop.signal is not None):  # all hosts stop at the same step
                ckpt.save(state, save_meta())
                progress.close()
                logger.close()
                ckpt.close()
                print(f"[train] signal {stop.signal or 'on another process'}: saved step {step} "
                      f"to {ckpt.directory}; run the same command again to resume", flush=True)
                return {"stopped_by_signal": stop.signal, "step": step}
    progress.close()
    final = dict(last_logged)
    ran = session["steps"] > 0  # 0: a finished run started again (its end is logged and saved)
    if ran and eval_examples is not None and cfg.eval_strategy != "no" and cfg.do_eval:
        ev = {**evaluate(eval_step, state.params, eval_examples,
                         cfg.per_device_eval_batch_size * n_devices, cfg.max_length,
                         tokenizer.pad_token_id, to_global, block, blocks), "epoch": epoch_at(step)}
        logger.log(step, ev)
        final.update(ev)
    if ran and cfg.save_strategy != "no":
        ckpt.save(state, save_meta())
    if ran:
        summary = train_summary(session, epoch_at(step))
        logger.log(step, summary)
        final.update(summary)
    logger.close()
    ckpt.close()
    if cfg.export_hf:
        export_dir = _export_hf(cfg, model_cfg, state, tokenizer, process_index, process_count)
        if process_index == 0:
            print(f"[train] exported Hugging Face model to {export_dir}", flush=True)
    final["step"] = step
    return final


def train_summary(session: dict, epoch: float) -> dict:
    """HF Trainer's end-of-training record (its `speed_metrics("train", ...)` and `train_loss`)
    for this session: runtime (export excluded), pairs and optimizer steps per second, and the
    mean loss of its steps. (HF's `total_flos` is left out.)"""
    runtime = time.time() - session["start"]
    return {"train_runtime": round(runtime, 4),
            "train_samples_per_second": round(session["pairs"] / runtime, 3),
            "train_steps_per_second": round(session["steps"] / runtime, 3),
            "train_loss": session["loss_sum"] / max(session["steps"], 0.001), "epoch": epoch}


def _export_hf(cfg, model_cfg, state, tokenizer, process_index: int, process_count: int) -> str:
    """`output_dir/hf`. One process: from the params in memory. Several: the params span hosts,
    so each process converts its part of the shard files from the final checkpoint (which all
    of them wrote), layer by layer, in a single-process CPU subprocess (`zephyr_jax.convert
    --part I/N`) into one shared staging folder, which process 0 renames into place once every
    part succeeded (or removes, leaving any earlier export as it was)."""
    export_dir = os.path.join(cfg.output_dir, "hf")
    if process_count == 1:
        from zephyr_jax.pretrained import save_pretrained

        save_pretrained(jax.device_get(state.params), export_dir, config=model_cfg, format="hf",
                        tokenizer=tokenizer, overwrite=True,
                        max_shard_size=cfg.export_max_shard_size)
        return export_dir
    import shutil
    import subprocess
    import tempfile

    from zephyr_jax.model_checkpoint import replace_dir, save_tokenizer

    # Every step that can fail is caught and agreed on (any_process) before anyone moves on: a
    # process that raised alone would leave the others waiting in a collective forever.
    staging = os.path.join(cfg.output_dir, ".hf.export-partial")  # the same path on every host
    error = None
    if process_index == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)  # a killed export's leftovers
            os.makedirs(staging)
        except OSError as e:
            error = f"could not create {staging}: {e}"
    if any_process(error is not None):
        raise TrainingError(f"export_hf: {error or 'process 0 could not create ' + staging}; "
                            "the checkpoint is intact")
    cmd = [sys.executable, "-m", "zephyr_jax.convert", "jax-to-hf", "--ckpt", cfg.output_dir,
           "--out", staging, "--max-shard-size", str(cfg.export_max_shard_size), "--part",
           f"{process_index}/{process_count}", "--quiet"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the accelerators belong to this run
    try:
        with tempfile.TemporaryDirectory(dir=cfg.output_dir) as tok_dir:
            if process_index == 0:  # part 0 writes the tokenizer with the config and index
                save_tokenizer(tokenizer, tok_dir)
                cmd += ["--tokenizer", tok_dir]
            returncode = subprocess.run(cmd, env=env).returncode
        if returncode:
            error = f"failed here (exit {returncode})"
    except Exception as e:  # reported below, after every process has agreed
        error = f"failed here ({type(e).__name__}: {e})"
    failed = any_process(error is not None)  # every process learns whether all parts made it
    if process_index == 0:
        try:
            if failed:
                shutil.rmtree(staging, ignore_errors=True)
            else:
                replace_dir(staging, export_dir)
        except OSError as e:
            error = f"could not move {staging} to {export_dir}: {e}"
    if any_process(failed or error is not None):
        raise TrainingError(
            f"export_hf: part {process_index}/{process_count} of `python -m zephyr_jax.convert "
            f"jax-to-hf --ckpt {cfg.output_dir} --out {staging}` "
            f"{error or 'succeeded here, another process failed'}; the checkpoint is intact"
            f" and {export_dir} is as it was")
    return export_dir


def _write_run_files(cfg: TrainConfig, model_cfg: MixtralConfig) -> None:
    """config.json (the model, HF format) and train_config.yaml (resolved), written atomically."""
    import yaml

    for name, text in (("config.json", json.dumps(model_cfg.to_hf(), indent=2)),
                       ("train_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))):
        path = os.path.join(cfg.output_dir, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)


def main_guard(fn, *args) -> int:
    """Turn the errors we raise for bad input into one clear line and exit code 2."""
    try:
        fn(*args)
    except (ConfigError, TrainingError, zdata.DataError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["TrainState", "TrainingError", "build_model_config", "build_params", "evaluate", "train"]
