"""Rows -> (prompt, chosen, rejected) texts, as alignment-handbook's `apply_chat_template(task="orpo")`.

Accepted row formats:
- conversational (the capybara schema): `chosen` and `rejected` are whole conversations (lists of
  `{role, content}`) that differ only in the last assistant message. The handbook split:
  prompt = chosen[:-1], chosen = chosen[-1:], rejected = rejected[-1:]. A `prompt` column that is
  not a message list (capybara's is a string) is ignored, as the handbook ignored it.
- conversational with an explicit prompt: `prompt` is a message list and `chosen` / `rejected`
  hold only the answer turn(s); each is rendered as is.
A leading BOS the template puts on the rendered chosen / rejected text is removed (the handbook's
`apply_chat_template(task="orpo")` does so): TRL adds BOS in front of the prompt only.
- plain text: `prompt`, `chosen`, `rejected` are strings, used verbatim (TRL's non-conversational
  format: no template is applied).

For conversations an empty system message is put in front of the prompt when it has none and the
template mentions "system" (the handbook's `maybe_insert_system_message`), then each part is
rendered with `tokenizer.apply_chat_template(messages, tokenize=False)`.

Malformed rows are skipped and counted by reason in a `DataReport`; more than `max_bad_fraction`
of them raises `DataQualityError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from zephyr_jax.data.report import DataReport

ROLES = ("system", "user", "assistant")

# Reasons a row is invalid (the keys of `DataReport.invalid`).
NOT_A_MAPPING = "not_a_mapping"
MISSING_KEY = "missing_key"
MIXED_FORMATS = "mixed_formats"
MALFORMED_MESSAGE = "malformed_message"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
EMPTY_CONTENT = "empty_content"
NOT_ENDING_IN_ASSISTANT = "not_ending_in_assistant"
PROMPT_NOT_ENDING_IN_USER = "prompt_not_ending_in_user"
PROMPT_MISMATCH = "prompt_mismatch"
TEMPLATE_ERROR = "template_error"


@dataclasses.dataclass(frozen=True)
class PreferenceText:
    """One rendered preference pair: `prompt + chosen` and `prompt + rejected` are the sequences."""

    prompt: str
    chosen: str
    rejected: str


class InvalidRow(ValueError):
    """A row that cannot become a preference pair; `reason` is a key of `DataReport.invalid`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(m, Mapping) for m in value)


def _check_messages(messages: Any, what: str) -> list[dict[str, str]]:
    """Validates a message list and returns it as plain `{role, content}` dicts."""
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRow(MALFORMED_MESSAGE, f"{what} is not a non-empty list of messages")
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidRow(MALFORMED_MESSAGE, f"{what} has a message without role/content")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise InvalidRow(UNKNOWN_ROLE, f"{what} has role {role!r}")
        if not isinstance(content, str):
            raise InvalidRow(NON_STRING_CONTENT, f"{what} has {type(content).__name__} content")
        # An empty system message is what the handbook itself inserts; empty turns are not.
        if role != "system" and not content.strip():
            raise InvalidRow(EMPTY_CONTENT, f"{what} has an empty {role} message")
        out.append({"role": role, "content": content})
    return out


def _check_answer(messages: list[dict[str, str]], what: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise InvalidRow(NOT_ENDING_IN_ASSISTANT, f"{what} ends with a {messages[-1]['role']} turn")


def _check_prompt(messages: list[dict[str, str]]) -> None:
    if not messages or messages[-1]["role"] != "user":
        raise InvalidRow(PROMPT_NOT_ENDING_IN_USER, "the prompt does not end with a user turn")


def split_conversation(row: Mapping[str, Any]) -> tuple[list, list, list]:
    """The handbook split of a conversational row into (prompt, chosen, rejected) message lists.

    Raises `InvalidRow` for a malformed row.
    """
    chosen = _check_messages(row["chosen"], "chosen")
    rejected = _check_messages(row["rejected"], "rejected")
    _check_answer(chosen, "chosen")
    _check_answer(rejected, "rejected")
    if _is_message_list(row.get("prompt")):
        prompt = _check_messages(row["prompt"], "prompt")
    else:
        prompt = chosen[:-1]
        if prompt != rejected[:-1]:
            raise InvalidRow(PROMPT_MISMATCH, "chosen and rejected differ before the last turn")
        chosen, rejected = chosen[-1:], rejected[-1:]
    _check_prompt(prompt)
    return prompt, chosen, rejected


def _template_mentions_system(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "system" in template or "<|im_start|>" in template


def render_row(
    row: Any, tokenizer, *, auto_insert_empty_system_msg: bool = True
) -> PreferenceText:
    """One row -> `PreferenceText`, or `InvalidRow` naming why not."""
    if not isinstance(row, Mapping):
        raise InvalidRow(NOT_A_MAPPING, f"row is a {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise InvalidRow(MISSING_KEY, f"no {key!r}")
    chosen, rejected = row["chosen"], row["rejected"]

    if isinstance(chosen, str) or isinstance(rejected, str):
        prompt = row.get("prompt")
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise InvalidRow(MIXED_FORMATS, "one of chosen/rejected is text, the other is not")
        if prompt is None:
            raise InvalidRow(MISSING_KEY, "plain-text rows need a 'prompt'")
        if not isinstance(prompt, str):
            raise InvalidRow(MIXED_FORMATS, "plain-text chosen/rejected with a non-text prompt")
        if not (prompt.strip() and chosen.strip() and rejected.strip()):
            raise InvalidRow(EMPTY_CONTENT, "empty prompt, chosen or rejected text")
        return PreferenceText(prompt, chosen, rejected)

    prompt_msgs, chosen_msgs, rejected_msgs = split_conversation(row)
    if auto_insert_empty_system_msg and prompt_msgs[0]["role"] != "system":
        if _template_mentions_system(tokenizer):
            prompt_msgs = [{"role": "system", "content": ""}, *prompt_msgs]
    try:
        texts = [tokenizer.apply_chat_template(m, tokenize=False)
                 for m in (prompt_msgs, chosen_msgs, rejected_msgs)]
    except ImportError:  # no jinja2: a broken install, not a bad row
        raise
    except Exception as e:  # a template may raise on content it refuses (jinja raise_exception)
        raise InvalidRow(TEMPLATE_ERROR, str(e)) from e
    # the handbook strips a template's leading BOS from the answers (not the prompt): TRL adds
    # BOS to the prompt only, and one left on an answer would sit mid-sequence, as a label
    bos = tokenizer.bos_token
    texts[1:] = [t[len(bos):] if bos and t.startswith(bos) else t for t in texts[1:]]
    return PreferenceText(*texts)


def process_rows(
    rows: Iterable[Any],
    tokenizer,
    *,
    auto_insert_empty_system_msg: bool = True,
    max_bad_fraction: float = 0.05,
    source: str = "data",
    report: DataReport | None = None,
) -> tuple[list[PreferenceText], DataReport]:
    """Validates and renders rows (handbook semantics); returns the texts and a `DataReport`.

    Args:
      rows: mappings in one of the formats of this module's docstring (a `datasets.Dataset` works).
      tokenizer: a tokenizer with the chat template set (see `load_tokenizer`).
      auto_insert_empty_system_msg: the handbook's flag of the same name.
      max_bad_fraction: raise `DataQualityError` when a larger fraction of rows is invalid.
      source: what the rows are (e.g. "train split"), for messages.
      report: a report to add the counts to (a fresh one by default).
    """
    report = DataReport(source=source) if report is None else report
    texts = []
    for i, row in enumerate(rows):
        report.rows += 1
        try:
            texts.append(render_row(row, tokenizer,
                                    auto_insert_empty_system_msg=auto_insert_empty_system_msg))
        except InvalidRow as e:
            report.add_invalid(e.reason, f"row {i} ({e})")
    report.kept = len(texts)
    report.check(max_bad_fraction)
    return texts, report

