"""The tokenizer: the Mixtral v1 vocabulary with the Zephyr chat template, as the handbook set it up.

`load_tokenizer()` gives the shipped copy (built offline from mistral-common's SentencePiece model
by `scripts/build_tokenizer.py`); `load_tokenizer(path)` loads any Hugging Face tokenizer folder or
Hub id. Either way the handbook's `get_tokenizer` choices are applied:

- chat template: the one given (the recipe gives the Zephyr template below, verbatim), else the
  tokenizer's own, else the Zephyr template (the handbook's DEFAULT_CHAT_TEMPLATE fallback);
- pad token: when the tokenizer has none (Mixtral has none), pad = eos (`</s>`, id 2). Pad ids
  never reach the loss: ORPO masks pads out of the NLL by the attention mask and out of the
  log-probs by labels = -100 (TRL's `label_pad_token_id`), so the choice only fixes what the
  model reads at right-padded positions, which causal attention hides from real tokens.

The shipped tokenizer is "legacy" Llama tokenization, like the 2024 Hub `tokenizer.json` of
Mixtral-8x22B: each stretch of text between special tokens gets SentencePiece's dummy prefix, so
`</s>\n` is `</s> ▁ \n` (2, 28705, 13), and ids equal SentencePiece's on each stretch. Known
divergence from SentencePiece: runs of 2+ spaces (and a stretch that starts with a space) can
split differently; the chat template itself produces none.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zephyr_jax.data.paths import TOKENIZER_DIR

ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
"""alignment-handbook's `recipes/zephyr-141b-A35b/orpo/config_full.yaml` chat_template, verbatim."""


def load_tokenizer(path: str | None = None, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Loads a fast tokenizer and applies the handbook's settings (chat template, pad = eos).

    Args:
      path: a folder with Hugging Face tokenizer files, or a Hub model id; None loads the shipped
        Mixtral v1 tokenizer (`zephyr_jax/assets/tokenizer`, bos `<s>`=1, eos `</s>`=2, unk 0).
      chat_template: a Jinja chat template; None keeps the tokenizer's own, and sets
        `ZEPHYR_CHAT_TEMPLATE` where it has none (the shipped tokenizer, a base model's).
    """
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR if path is None else path)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{path!r} loaded a {type(tokenizer).__name__}, not a fast tokenizer")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} needs bos and eos tokens (TRL's ORPO adds both)")
    if getattr(tokenizer, "legacy", None) is not None:
        # transformers 5 rebuilds Llama-type pipelines from this flag on every load but does not
        # save it; keep it so a saved copy (e.g. next to a checkpoint) tokenizes the same.
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):  # the handbook's get_tokenizer keeps a model's own template
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    return tokenizer
