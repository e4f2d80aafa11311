"""Driver for tests/test_train_eval.py (run with XLA_FLAGS giving 3 CPU devices): the trainer's
`evaluate` on a 3-device mesh, whose last global batch holds fewer pairs than devices, against
the eval step run batch by batch on one device without filler pairs. Prints JSON."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from zephyr_jax import data as zdata
from zephyr_jax import sharding, trainer
from zephyr_jax.train_config import load_train_config
from zephyr_jax.train_step import make_eval_step


def main(n_pairs: int, per_device: int) -> None:
    cfg = load_train_config("configs/demo.yaml", ["--per_device_eval_batch_size", str(per_device)])
    model_cfg = trainer.build_model_config(cfg)
    tok = zdata.load_tokenizer()
    rows = zdata.load_mixture(cfg.dataset_mixer, "test").select(range(n_pairs))
    examples, _ = zdata.tokenize_dataset(rows, tok, max_length=cfg.max_length,
                                         max_prompt_length=cfg.max_prompt_length)
    n_dev = jax.device_count()
    batch = per_device * n_dev
    mesh, rules, p_shard = trainer.mesh_and_shardings(cfg, model_cfg, batch)
    params = trainer.build_params(cfg, model_cfg, p_shard)
    eval_fn = make_eval_step(model_cfg, cfg.beta, cfg.loss_chunk_size, cfg.nll_reduction)

    def to_global(b, leading):
        return {k: sharding.global_batch_array(v, mesh, rules, leading) for k, v in b.items()}

    with sharding.use_mesh(mesh, rules):
        got = trainer.evaluate(jax.jit(eval_fn), params, examples, batch, cfg.max_length,
                               tok.pad_token_id, to_global)
    # the reference: one device, each global batch's real pairs alone (no filler), averaged as
    # HF + TRL do (loss by pairs, TRL's metrics by batch)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    ref_fn = jax.jit(eval_fn)
    per_batch, sizes = [], []
    for start in range(0, len(examples), batch):
        part = examples[start:start + batch]
        per_batch.append(jax.device_get(ref_fn(local, zdata.collate(part, cfg.max_length,
                                                                    tok.pad_token_id))))
        sizes.append(len(part))
    want = {}
    for k in per_batch[0]:
        vals = np.stack([np.asarray(m[k], np.float64) for m in per_batch])
        want[k] = vals.sum(0) if k == "num_tokens" else vals.mean(0)
    want["loss"] = float(np.average([float(m["loss"]) for m in per_batch], weights=sizes))
    print(json.dumps({"n_examples": len(examples), "sizes": sizes,
                      "got": {k: np.asarray(v).tolist() for k, v in got.items()},
                      "want": {f"eval_{k}": np.asarray(v).tolist() for k, v in want.items()}}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
