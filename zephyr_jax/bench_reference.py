"""The reference ORPO train step: transformers' MixtralForCausalLM + PyTorch, loss as TRL computes it.

What `python -m zephyr_jax.bench --reference hf` compares our step against. It runs in its own
process (the bench starts it), so PyTorch and JAX never share a GPU allocator, CUDA libraries or
CPU threads:

    python -m zephyr_jax.bench_reference --hf-config cfg.json --batch batch.npz --steps 5 --warmup 2

`cfg.json` is `MixtralConfig.to_hf()` plus `"dtype"`, `batch.npz` the bench batch (chosen_* /
rejected_* input_ids, attention_mask, labels, each [pairs, seq]). The last stdout line is JSON.

The step is one HF Trainer + TRL `ORPOTrainer` optimizer step with the trainer's bookkeeping left out:
TRL's own `concatenated_forward` (one forward over [chosen; rejected], `get_batch_logps`, the
chosen NLL) and `odds_ratio_loss`, `loss = nll - mean(beta * logsigmoid(log_odds))` (+ router
aux loss when the config enables it), `backward`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`
(fused on CUDA, as the HF Trainer picks), `zero_grad(set_to_none=True)`. Left out: TRL's per-step
metric `.item()` host syncs, which only make the reference slower.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from transformers import MixtralForCausalLM

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERTS_IMPLS = ("grouped_mm", "eager", "batched_mm")


def hf_config(cfg_dict: dict) -> transformers.MixtralConfig:
    """A transformers MixtralConfig from `MixtralConfig.to_hf()` (sdpa attention, no KV cache)."""
    d = dict(cfg_dict)
    d.pop("architectures", None)
    d.pop("model_type", None)
    config = transformers.MixtralConfig(**d)
    config.use_cache = False
    return config


def build_model(cfg_dict: dict, device: str, experts_impl: str, weights: str | None = None,
                seed: int = 0) -> MixtralForCausalLM:
    """The HF model in the config's dtype: random init, or `weights` (a HF folder) when given."""
    dtype = TORCH_DTYPES[cfg_dict.get("dtype", "float32")]
    if weights:
        model = MixtralForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa")
    else:  # built in place: a 2.4B model initialized on the host first takes minutes
        torch.manual_seed(seed)
        with torch.device(device):
            model = MixtralForCausalLM._from_config(hf_config(cfg_dict), dtype=dtype,
                                                    attn_implementation="sdpa")
    model.set_experts_implementation(experts_impl)
    return model.to(device).train()


def torch_batch(batch: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.long, device=device) for k, v in batch.items()}


def _orpo_trainer_class():
    """TRL's ORPOTrainer (its experimental-API warning silenced)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer
    return ORPOTrainer


def _trl_trainer(model: MixtralForCausalLM, beta: float, device: str) -> SimpleNamespace:
    """Just enough of an ORPOTrainer for its loss methods (as TRL's trainer sets these fields)."""
    ORPOTrainer = _orpo_trainer_class()
    trainer = SimpleNamespace(
        beta=beta,
        accelerator=SimpleNamespace(device=torch.device(device)),
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=bool(getattr(model.config, "output_router_logits", False)),
        aux_loss_coef=float(getattr(model.config, "router_aux_loss_coef", 0.0)),
        concatenated_inputs=ORPOTrainer.concatenated_inputs,  # static methods
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    trainer.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, trainer)
    trainer.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, trainer)
    return trainer


def orpo_loss(trainer: SimpleNamespace, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL `get_batch_loss_metrics`' loss, without its metric syncs."""
    out = trainer.concatenated_forward(model, batch)
    chosen_logps, rejected_logps, _, _, nll = out[:5]
    losses = trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0]
    loss = nll - losses.mean()
    if trainer.aux_loss_enabled:
        loss = loss + trainer.aux_loss_coef * out[5]
    return loss


def make_step(model: MixtralForCausalLM, *, beta: float = 0.05, lr: float = 5e-6,
              max_grad_norm: float = 1.0, compile: bool = False):
    """`step(batch) -> loss` (the loss before the update); the forward is `torch.compile`d if asked."""
    device = next(model.parameters()).device.type
    forward = torch.compile(model) if compile else model
    trainer = _trl_trainer(model, beta, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=device == "cuda")

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = orpo_loss(trainer, forward, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batch, device: str, steps: int, warmup: int) -> tuple[list[float], float]:
    """Per-step wall times (each step synchronized) after `warmup` steps; and the step-0 loss."""
    first = None
    for _ in range(warmup):
        loss = step(batch)
        first = float(loss) if first is None else first
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        first = float(loss) if first is None else first
    return times, first


def run(cfg_dict: dict, batch_np: dict[str, np.ndarray], *, steps: int, warmup: int,
        experts_impl: str = "auto", compile: str = "auto", beta: float = 0.05, lr: float = 5e-6,
        weights: str | None = None) -> dict:
    """Time the reference step; falls back from grouped_mm to eager experts and from compile to eager.

    `experts_impl="auto"` tries grouped_mm, then eager; `compile="auto"` compiles on CUDA only.
    Returns step times, the step-0 loss, what ran, what failed, and peak memory.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["grouped_mm", "eager"] if experts_impl == "auto" else [experts_impl]
    compiles = {"auto": [True, False] if device == "cuda" else [False], "on": [True], "off": [False]}[compile]
    batch = torch_batch(batch_np, device)
    errors = []
    for impl in impls:
        for comp in compiles:
            name = impl + ("+compile" if comp else "")
            model = step = None
            try:
                model = build_model(cfg_dict, device, impl, weights)
                step = make_step(model, beta=beta, lr=lr, compile=comp)
                times, loss0 = time_steps(step, batch, device, steps, warmup)
            except Exception as e:  # any failure means "try the next variant"
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
                model = step = None  # free the failed variant's weights and optimizer state
                torch._dynamo.reset()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if device == "cuda":
                mem, mem_label = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
            else:
                mem, mem_label = _max_rss_bytes(), "process peak RSS (ru_maxrss)"
            return {"impl": name, "device": _device_name(device), "step_times_s": times,
                    "loss_step0": loss0, "peak_memory_bytes": mem, "peak_memory_label": mem_label,
                    "errors": errors, "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads()}
    raise RuntimeError("no reference variant ran: " + "; ".join(errors))


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-config", required=True, help="JSON: MixtralConfig.to_hf() plus 'dtype'")
    p.add_argument("--batch", required=True, help="npz with the bench batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--experts-impl", default="auto", choices=("auto", *EXPERTS_IMPLS))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--weights", default=None, help="a HF folder to load instead of random init")
    a = p.parse_args(argv)
    with open(a.hf_config) as fh:
        cfg_dict = json.load(fh)
    with np.load(a.batch) as z:
        batch = {k: z[k] for k in z.files}
    out = run(cfg_dict, batch, steps=a.steps, warmup=a.warmup, experts_impl=a.experts_impl,
              compile=a.compile, beta=a.beta, lr=a.lr, weights=a.weights)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
