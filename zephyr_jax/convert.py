"""Convert Mixtral weights between Hugging Face safetensors and zephyr_jax model checkpoints.

    python -m zephyr_jax.convert hf-to-jax --hf ~/models/Mixtral-8x22B-v0.1 --out ckpt/mixtral-8x22b
    python -m zephyr_jax.convert jax-to-hf --ckpt runs/zephyr-orpo --out hf/zephyr-141b --max-shard-size 5GB

Both directions stream one decoder layer at a time (memory stays about one layer), keep the
source dtypes unless --dtype is given (so round trips are bitwise), and write to a temporary
sibling folder renamed into place only when complete. `--ckpt` takes a model checkpoint or a
trainer output_dir (its latest step). Bad input exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from zephyr_jax.config import ConfigError
from zephyr_jax.hf_io.safetensors_io import CheckpointError, parse_size
from zephyr_jax.hf_io.streaming import hf_to_jax, jax_to_hf
from zephyr_jax.model_checkpoint import ModelCheckpointError

DTYPES = ("bfloat16", "float16", "float32")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text!r}: need 0 <= I < N")
    return i, n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zephyr_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-jax", help="HF safetensors folder -> model checkpoint (orbax)")
    a.add_argument("--hf", required=True, help="HF folder: config.json + *.safetensors")
    a.add_argument("--out", required=True, help="model checkpoint folder to write")
    b = sub.add_parser("jax-to-hf", help="model checkpoint or trainer output_dir -> HF folder")
    b.add_argument("--ckpt", required=True, help="model checkpoint or trainer output_dir")
    b.add_argument("--out", required=True, help="HF folder to write")
    b.add_argument("--max-shard-size", default="5GB", type=_size,
                   help="largest safetensors shard: 5GB, 500MB, 2GiB (default 5GB)")
    b.add_argument("--tokenizer", help="folder whose tokenizer files to include "
                                       "(default: those in --ckpt)")
    b.add_argument("--fused-experts", action="store_true",
                   help="write transformers 5's fused mlp.experts.* tensors, not per-expert ones")
    b.add_argument("--part", type=_part, metavar="I/N",
                   help="write only the I-th (from 0) of N runs of shard files into --out, which "
                        "must exist; N writers (processes, machines) each run one part, part 0 "
                        "also writes the index, config and tokenizer; rename --out when all are done")
    for s in (a, b):
        s.add_argument("--dtype", choices=DTYPES, help="convert weights (default: keep source dtypes)")
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "hf-to-jax":
            hf_to_jax(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not args.quiet)
        else:
            jax_to_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size,
                      tokenizer=args.tokenizer, fused_experts=args.fused_experts,
                      overwrite=args.overwrite, dtype=args.dtype, progress=not args.quiet,
                      part=args.part)
    except (CheckpointError, ModelCheckpointError, ConfigError, FileExistsError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
