"""Build the shipped Mixtral v1 tokenizer (zephyr_jax/assets/tokenizer/) from mistral-common.

    python scripts/build_tokenizer.py [--out zephyr_jax/assets/tokenizer]

mistral-common ships `tokenizer.model.v1`, the SentencePiece model of Mixtral-8x22B-v0.1 (32000
pieces). transformers converts it once (this needs `sentencepiece`); the saved `tokenizer.json`
then loads with `AutoTokenizer` alone.

Two choices made here, both to reproduce what the 2024 Hub tokenizer did:
- `legacy=True`: every stretch of text between special tokens gets SentencePiece's dummy prefix,
  so `</s>\\n` encodes as `</s> ▁ \\n` (2, 28705, 13), as the Hub's legacy `tokenizer.json` did
  and as SentencePiece does when each stretch is encoded on its own. transformers 5 rebuilds the
  Llama pipeline from the class on every load and does not save `legacy`, so it is written into
  `tokenizer_config.json` explicitly.
- No pad token is stored: the handbook sets pad = eos at load time (see `load_tokenizer`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile

import mistral_common

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "zephyr_jax" / "assets" / "tokenizer"
SP_MODEL = pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build(out: pathlib.Path) -> None:
    from transformers import LlamaTokenizer  # the sentencepiece-reading path; needs sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(SP_MODEL, os.path.join(tmp, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False, legacy=True)
    if len(tok) != 32000 or (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) != (1, 2, 0):
        raise RuntimeError(f"unexpected tokenizer: len={len(tok)} bos/eos/unk={tok.bos_token_id}/"
                           f"{tok.eos_token_id}/{tok.unk_token_id}")
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # Machine-local keys written by save_pretrained; meaningless in a shipped asset.
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["legacy"] = True
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
