r"""Chat with a Mixtral checkpoint from the command line.

    python -m zephyr_jax.chat --model outputs/run/hf \
        --system "You are Zephyr, a helpful assistant." --prompt "What is a mixture of experts?"

With `--prompt` the answer is printed and the program exits. Without it, an interactive multi-turn
chat reads one user message per line from stdin, streams the answer as it is generated, keeps the
conversation history, and ends on EOF (Ctrl-D) or `/exit`. Sampling defaults are the Zephyr model
card's (temperature 0.7, top_k 50, top_p 0.95, 512 new tokens); `--temperature 0` is greedy.
Weights load in their stored dtype, spread over every visible device (`--mesh`): Zephyr-141B in
bfloat16 (282 GB) needs a node of 8 H100s, where each GPU holds one expert of every layer.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, TextIO

import jax

from zephyr_jax.generation import generate, stream_generate
from zephyr_jax.pretrained import as_mesh, config_of, from_pretrained, resolve_path
from zephyr_jax.sharding import MeshConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_chat_tokenizer(path: str) -> Any:
    """The tokenizer saved at `path` if it has a chat template, else `zephyr_jax.data`'s.

    A saved tokenizer without a template (a base model's) goes through `load_tokenizer(path)`,
    which adds the Zephyr template the model was aligned with; a path without tokenizer files
    (e.g. a checkpoint directory) gets the shipped Mixtral tokenizer.
    """
    has_files = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    if has_files:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
    # Imported only here: the data package pulls in dataset tooling (seconds of imports).
    from zephyr_jax.data import load_tokenizer

    return load_tokenizer(path if has_files else None)


def interactive(model, tokenizer, history: list[dict[str, str]], sampling: dict[str, Any],
                stdin: TextIO, stdout: TextIO) -> None:
    """Multi-turn loop: one user message per input line, answers streamed to `stdout`."""
    prompt = "user> " if stdin.isatty() else ""
    while True:
        if prompt:
            stdout.write(prompt)
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        pieces = []
        for piece in stream_generate(model, tokenizer, history, **sampling):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def chat_mesh(spec: str, model_path: str):
    """The mesh for `--mesh`: None (one device) for 'none' or a single device; for 'auto', all
    devices with `expert` the largest divisor of both the device count and the expert count
    (8 GPUs, 8 experts: expert=8) and the rest FSDP over `data`."""
    if spec == "none":
        return None
    n = jax.device_count()
    if spec != "auto":
        return as_mesh(spec)
    if n == 1:
        return None
    experts = config_of(model_path).num_local_experts
    expert = math.gcd(n, experts)
    return as_mesh(MeshConfig(data=n // expert, expert=expert))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model path for zephyr_jax.from_pretrained (e.g. an HF folder)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message at the start of the conversation "
                        "(default: an empty one, as the handbook inserted in training)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables")
    parser.add_argument("--top-p", type=float, default=0.95, help="1.0 disables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        default="auto", help="parameter and compute dtype (default auto: as "
                        "stored in the checkpoint, like transformers' dtype='auto')")
    parser.add_argument("--mesh", default="auto",
                        help="devices to spread the model over, e.g. 'expert=8' or "
                        "'data=2,expert=4' (experts split over `expert`, the rest FSDP); "
                        "'none' = one device; default auto: every device, experts split as "
                        "evenly as they divide")
    args = parser.parse_args(argv)

    try:
        # A Hub id becomes its downloaded snapshot here, once: the tokenizer (and its chat
        # template) must come from that folder too, not be looked up by the raw id.
        path = resolve_path(args.model)
        mesh = chat_mesh(args.mesh, path)
        dtype = config_of(path, param_dtype=args.dtype).param_dtype  # auto: as stored
        model = from_pretrained(path, mesh=mesh, param_dtype=dtype, dtype=dtype)
    except (ValueError, OSError) as e:  # bad --mesh / --dtype, unreadable model: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"mesh {dict(mesh.shape)}" if mesh is not None else str(jax.devices()[0])
    print(f"[chat] {args.model}: {model.config.param_dtype} on {where}", file=sys.stderr)
    tokenizer = load_chat_tokenizer(path)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    # Training prompts carried an empty system turn (the handbook's auto_insert_empty_system_msg):
    # start chats the same way unless the user gives a system message.
    history = [{"role": "system", "content": args.system or ""}]
    if args.prompt is not None:
        print(generate(model, tokenizer, [*history, {"role": "user", "content": args.prompt}],
                       **sampling))
        return 0
    interactive(model, tokenizer, history, sampling, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
