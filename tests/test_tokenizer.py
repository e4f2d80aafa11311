"""The shipped tokenizer: ids equal SentencePiece's, the Zephyr template, pad = eos, no sentencepiece."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import mistral_common
import pytest
import sentencepiece
import yaml

from zephyr_jax.data import (
    SAMPLE_DATA,
    ZEPHYR_CHAT_TEMPLATE,
    load_preference_dataset,
    load_tokenizer,
)

SP_MODEL = pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# The `chat_template:` line of alignment-handbook's recipes/zephyr-141b-A35b/orpo/config_full.yaml.
HANDBOOK_YAML = r"""chat_template: "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
"""

ORDINARY_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "line one\nline two\n\nline four\n",
    "\tindented\ttabs and trailing newline\n",
    "Digits 0123456789, 3.14159, 1e-5, 2048 and 7,563 rows.",
    "Unicode: café naïve Zürich — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "Emoji 🙂🚀 and symbols ∑∫√∞ ≠ ≤ ≥ € £ ¥",
    "def f(x):\n\treturn {'a': [1, 2, 3]} # tab-indented\n",
    "What is the capital of France?",
    "<|user|> looks special but is plain text here",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))


def sp_reference(sp, text: str) -> list[int]:
    """SentencePiece on each stretch between `</s>`s, `</s>` as id 2: what the 2024 Hub (legacy)
    tokenizer.json gave, since it split on special tokens and prefixed every stretch."""
    ids = []
    for i, part in enumerate(text.split("</s>")):
        if i:
            ids.append(sp.eos_id())
        if part:
            ids.extend(sp.encode(part))
    return ids


def test_special_ids(tok, sp):
    assert len(tok) == sp.get_piece_size() == 32000
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1) == (sp.id_to_piece(1), sp.bos_id())
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2) == (sp.id_to_piece(2), sp.eos_id())
    assert tok.unk_token_id == 0 == sp.unk_id()
    # The handbook's get_tokenizer: Mixtral has no pad token, so pad = eos.
    assert (tok.pad_token, tok.pad_token_id) == ("</s>", 2)


def test_vocab_equals_sentencepiece(tok, sp):
    vocab = tok.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(sp.get_piece_size()))


@pytest.mark.parametrize("text", ORDINARY_TEXTS)
def test_ordinary_text_matches_sentencepiece(tok, sp, text):
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok(text)["input_ids"] == [1, *sp.encode(text)]  # BOS only, no EOS


def test_template_strings_match_sentencepiece(tok, sp):
    messages = [
        {"role": "system", "content": "You are Zephyr, a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Q2 — ünïcode 42"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp_reference(sp, text)
    # After each </s> the next stretch gets the dummy prefix: </s> ▁ \n (legacy behaviour).
    assert ids[ids.index(2): ids.index(2) + 3] == [2, 28705, 13]
    for special in ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "</s>\n<|user|>\n"):
        assert tok(special, add_special_tokens=False)["input_ids"] == sp_reference(sp, special)


def test_sample_data_matches_sentencepiece(tok, sp):
    """Every rendered sample conversation tokenizes exactly as SentencePiece does."""
    rows = list(load_preference_dataset(SAMPLE_DATA, "test"))
    for row in rows:
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(row[side], tokenize=False)
            assert "  " not in text  # no runs of 2+ spaces: the known divergence never arises
            assert tok(text, add_special_tokens=False)["input_ids"] == sp_reference(sp, text)


def test_known_divergence_on_space_runs(tok, sp):
    """The converted fast tokenizer differs from SentencePiece on runs of 2+ spaces (BPE merge
    order vs SentencePiece scores); nothing here relies on such text. If this starts failing the
    divergence is gone: drop this test and the caveat in the tokenizer docs."""
    for text in ("Hi  there", "def f(x):\n    return x\n"):
        assert tok(text, add_special_tokens=False)["input_ids"] != sp.encode(text)


def test_chat_template_is_the_handbooks(tok):
    assert ZEPHYR_CHAT_TEMPLATE == yaml.safe_load(HANDBOOK_YAML)["chat_template"]
    assert tok.chat_template == ZEPHYR_CHAT_TEMPLATE
    custom = load_tokenizer(chat_template="{{ messages[0]['content'] }}")
    assert custom.chat_template == "{{ messages[0]['content'] }}"


def test_a_tokenizers_own_template_is_kept_unless_one_is_given(tok, tmp_path):
    """The handbook's get_tokenizer: the config's template if given, else the tokenizer's own,
    else the Zephyr default (the shipped tokenizer has none, so it gets the default above)."""
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path)
    saved = load_tokenizer(str(tmp_path))
    saved.chat_template = own
    saved.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).chat_template == own
    assert load_tokenizer(str(tmp_path), chat_template=ZEPHYR_CHAT_TEMPLATE).chat_template == (
        ZEPHYR_CHAT_TEMPLATE)


def test_rendering(tok):
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Q2"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nQ2</s>\n")
    assert tok.apply_chat_template(msgs[-1:], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nQ2</s>\n<|assistant|>\n")
    assert tok.apply_chat_template([{"role": "assistant", "content": "A2"}], tokenize=False) == (
        "<|assistant|>\nA2</s>\n")


def test_loads_from_a_path(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "<|user|>\nHi</s>\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token_id == 2 and again.chat_template == ZEPHYR_CHAT_TEMPLATE


def test_loading_needs_no_sentencepiece():
    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"  # any import of it now fails
        "from zephyr_jax.data import load_tokenizer\n"
        "t = load_tokenizer()\n"
        "assert t('Hello world')['input_ids'] == [1, 22557, 1526], t('Hello world')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
