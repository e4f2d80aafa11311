"""Chat layer and `python -m zephyr_jax.chat`, on a tiny model folder with a word-level tokenizer."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

import zephyr_jax
from zephyr_jax import chat
from zephyr_jax.chat import load_chat_tokenizer, main
from zephyr_jax.data import ZEPHYR_CHAT_TEMPLATE
from zephyr_jax.generation import chat_prompt_ids, generate, generate_ids, stream_generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["hi", "hello", "how", "are", "you", "zephyr", "a", "helpful", "assistant", "the", "is"]
N_NEW = 8  # one length for every test: each new shape costs compilations


def word_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Whole words, ids 0..127: <unk> <s> </s>, the Zephyr role markers, some words, then w0, w1..."""
    names = ["<unk>", "<s>", "</s>", *MARKERS, *WORDS]
    names += [f"w{i}" for i in range(VOCAB - len(names))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_tokens([AddedToken(m, normalized=False) for m in MARKERS])  # never split by punctuation
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    fast.chat_template = ZEPHYR_CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An HF model folder: random fp32 Mixtral weights, config.json and the tokenizer files."""
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_chat")
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(folder):
    return zephyr_jax.from_pretrained(folder), load_chat_tokenizer(folder)


CONV = [{"role": "system", "content": "you are zephyr"}, {"role": "user", "content": "hi"}]


def test_prompt_is_template_with_generation_prompt_and_bos(loaded):
    _, tok = loaded
    ids = chat_prompt_ids(tok, CONV)
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>", "<|system|>", "you", "are", "zephyr", "</s>", "<|user|>", "hi", "</s>",
        "<|assistant|>"]


def test_generate_decodes_generate_ids_until_eos(loaded):
    model, tok = loaded
    answer = generate(model, tok, CONV, N_NEW, temperature=0.0)
    ids = generate_ids(model, [chat_prompt_ids(tok, CONV)], N_NEW, temperature=0.0,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0]
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert isinstance(answer, str) and answer
    assert answer == tok.decode(ids, skip_special_tokens=True).strip()

    other = [{"role": "user", "content": "how are you"}]
    batch = generate(model, tok, [CONV, other], N_NEW, temperature=0.7, seed=3)
    assert isinstance(batch, list) and len(batch) == 2
    assert generate(model, tok, [CONV, other], N_NEW, temperature=0.7, seed=3) == batch


def test_stream_joins_to_generate(loaded):
    model, tok = loaded
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, seed=5)
    pieces = list(stream_generate(model, tok, CONV, **kw))
    assert len(pieces) > 1  # streamed, not one block at the end
    assert "".join(pieces).strip() == generate(model, tok, CONV, **kw)


def test_cli_prompt_prints_answer(folder, loaded):
    model, tok = loaded
    want = generate(model, tok, CONV, N_NEW, temperature=0.0)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "zephyr_jax.chat", "--model", folder, "--system", "you are zephyr",
         "--prompt", "hi", "--max-new-tokens", str(N_NEW), "--temperature", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_cli_spreads_the_model_over_all_devices(folder, loaded, capsys):
    """4 CPU devices, --mesh left at auto: the 4 experts go one per device, the answer is the
    one-device answer; a mesh that does not fit is one clear error line."""
    model, tok = loaded
    want = generate(model, tok, CONV, N_NEW, temperature=0.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    cmd = [sys.executable, "-m", "zephyr_jax.chat", "--model", folder, "--system", "you are zephyr",
           "--prompt", "hi", "--max-new-tokens", str(N_NEW), "--temperature", "0"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
    assert "float32 on mesh {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}" in out.stderr
    assert "Warning" not in out.stderr, out.stderr

    assert main([*cmd[3:], "--mesh", "expert=8"]) == 2  # here: one device
    err = capsys.readouterr().err
    assert err.startswith("error: mesh:") and "1 devices cannot be split" in err, err
    assert "expert=8" in err


def test_cli_interactive_keeps_history_and_exits(folder, loaded, monkeypatch, capsys):
    model, tok = loaded
    sampling = dict(max_new_tokens=N_NEW, temperature=0.0)
    system = {"role": "system", "content": ""}  # the CLI starts like training prompts did
    first = generate(model, tok, [system, {"role": "user", "content": "hi"}], **sampling)
    second = generate(model, tok, [system, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": first},
                                   {"role": "user", "content": "how are you"}], **sampling)
    args = ["--model", folder, "--max-new-tokens", str(N_NEW), "--temperature", "0"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you\n"))  # then EOF
    assert main(args) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\nhow are you\n"))
    assert main(args) == 0
    assert capsys.readouterr().out == f"{first}\n"


def test_tokenizer_choice(tmp_path, folder):
    assert load_chat_tokenizer(folder).chat_template == ZEPHYR_CHAT_TEMPLATE  # the saved one
    custom = word_level_tokenizer()
    custom.chat_template = "{{ messages[0]['content'] }}"
    custom.save_pretrained(tmp_path / "custom")
    assert load_chat_tokenizer(str(tmp_path / "custom")).chat_template == custom.chat_template
    bare = word_level_tokenizer()
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    base = load_chat_tokenizer(str(tmp_path / "bare"))  # a base model's: the Zephyr template
    assert base.chat_template == ZEPHYR_CHAT_TEMPLATE and len(base) == VOCAB
    default = load_chat_tokenizer(str(tmp_path))  # no tokenizer files: the shipped one
    assert default.chat_template == ZEPHYR_CHAT_TEMPLATE and default.vocab_size == 32000


def test_cli_takes_a_hub_models_tokenizer_from_its_snapshot(tmp_path, folder, monkeypatch, capsys):
    """`--model org/name`: the tokenizer (and chat template) is the downloaded snapshot's, not
    the shipped Mixtral one that the raw id, not being a folder, used to fall back to."""
    import huggingface_hub

    snapshot = shutil.copytree(folder, tmp_path / "snapshot")
    custom = word_level_tokenizer()
    custom.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    custom.save_pretrained(snapshot)
    fetched, used = [], []

    def snapshot_download(repo_id, **kw):
        fetched.append(repo_id)
        return str(snapshot)

    def fake_generate(model, tokenizer, messages, **kw):
        used.append(tokenizer)
        return "answer"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(chat, "generate", fake_generate)
    assert main(["--model", "someorg/somemodel", "--prompt", "hi", "--mesh", "none"]) == 0
    assert capsys.readouterr().out == "answer\n"
    (tok,) = used
    assert tok.chat_template == custom.chat_template and len(tok) == VOCAB
    assert fetched == ["someorg/somemodel"]  # resolved once, then the folder is used


def test_chat_stops_at_any_eos_id_of_the_model_config(loaded):
    """config.json may list several EOS ids (transformers' generate stops at any): the chat stops
    at the second one too, not only at the tokenizer's."""
    model, tok = loaded
    free = generate_ids(model, [chat_prompt_ids(tok, CONV)], N_NEW, temperature=0.0)[0]
    # the first token after the first that is new, before any tokenizer EOS
    k = next(i for i, t in enumerate(free) if i > 0 and t not in free[:i])
    assert tok.eos_token_id not in free[:k + 1]
    cfg = model.config.replace(eos_token_id=(tok.eos_token_id, free[k]))
    two_eos = zephyr_jax.model_from_params(cfg, zephyr_jax.params_dict(model))
    want = tok.decode(free[:k], skip_special_tokens=True).strip()
    assert want and want != tok.decode(free, skip_special_tokens=True).strip()
    assert generate(two_eos, tok, CONV, N_NEW, temperature=0.0) == want
    assert "".join(stream_generate(two_eos, tok, CONV, N_NEW, temperature=0.0)).strip() == want
