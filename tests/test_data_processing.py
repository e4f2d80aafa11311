"""Row validation and the handbook's prompt/chosen/rejected split and rendering."""

from __future__ import annotations

import copy

import pytest

from zephyr_jax.data import (
    SAMPLE_DATA,
    DataQualityError,
    PreferenceText,
    load_preference_dataset,
    load_tokenizer,
    process_rows,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def msg(role, content):
    return {"content": content, "role": role}


def conv(*turns):
    """Alternating user/assistant messages from strings."""
    return [msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


GOOD = {"prompt": "Q2", "chosen": conv("Hi", "Hello", "Q2", "A2"),
        "rejected": conv("Hi", "Hello", "Q2", "B2")}


def handbook_reference(row, tokenizer):
    """The handbook's apply_chat_template(task="orpo"), written from its description."""
    if isinstance(row.get("prompt"), list):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = row["chosen"][:-1], row["chosen"][-1:], row["rejected"][-1:]
    if prompt[0]["role"] != "system":
        prompt = [msg("system", ""), *prompt]
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False)
    return PreferenceText(render(prompt), render(chosen), render(rejected))


def test_handbook_split_literal(tok):
    (text,), report = process_rows([GOOD], tok)
    assert text == PreferenceText(
        "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nQ2</s>\n",
        "<|assistant|>\nA2</s>\n",
        "<|assistant|>\nB2</s>\n")
    assert (report.rows, report.kept, report.num_invalid) == (1, 1, 0)


def test_existing_system_message_is_kept(tok):
    row = {"chosen": [msg("system", "Be brief."), *conv("Q", "A")],
           "rejected": [msg("system", "Be brief."), *conv("Q", "B")]}
    (text,), _ = process_rows([row], tok)
    assert text.prompt == "<|system|>\nBe brief.</s>\n<|user|>\nQ</s>\n"


def test_no_system_insert_when_disabled_or_template_lacks_it(tok):
    row = {"chosen": conv("Q", "A"), "rejected": conv("Q", "B")}
    (text,), _ = process_rows([row], tok, auto_insert_empty_system_msg=False)
    assert text.prompt == "<|user|>\nQ</s>\n"
    plain = load_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }};{% endfor %}")
    (text,), _ = process_rows([row], plain)
    assert text == PreferenceText("Q;", "A;", "B;")


def test_explicit_prompt_column(tok):
    row = {"prompt": [msg("user", "Q")], "chosen": [msg("assistant", "A")],
           "rejected": [msg("assistant", "B")]}
    (text,), _ = process_rows([row], tok)
    assert text == PreferenceText("<|system|>\n</s>\n<|user|>\nQ</s>\n",
                                  "<|assistant|>\nA</s>\n", "<|assistant|>\nB</s>\n")


def test_plain_text_rows_are_verbatim(tok):
    row = {"prompt": "Question: 2+2?\n", "chosen": "4", "rejected": "5"}
    (text,), _ = process_rows([row], tok)
    assert text == PreferenceText("Question: 2+2?\n", "4", "5")


def test_sample_rows_match_handbook_reference(tok):
    rows = list(load_preference_dataset(SAMPLE_DATA, "test"))
    texts, report = process_rows(rows, tok)
    assert report.kept == len(rows) == len(texts) and not report.invalid
    assert texts == [handbook_reference(r, tok) for r in rows]


def _bad(**changes):
    row = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is KeyError:
            del row[k]
        else:
            row[k] = v
    return row


BAD_ROWS = {
    "not_a_mapping": ["just a string"],
    "missing_key": [_bad(chosen=KeyError), _bad(rejected=None),
                    {"chosen": "text", "rejected": "text"}],
    "malformed_message": [_bad(chosen=[]), _bad(chosen=[{"role": "user"}]),
                          _bad(rejected=["Hi", "A"])],
    "unknown_role": [_bad(chosen=[msg("human", "Hi"), msg("assistant", "A")])],
    "non_string_content": [_bad(chosen=[msg("user", "Hi"), msg("assistant", 42)]),
                           _bad(rejected=[msg("user", None), msg("assistant", "B")])],
    "empty_content": [_bad(chosen=conv("Hi", "Hello", "Q2", "   ")),
                      _bad(rejected=conv("", "Hello", "Q2", "B2")),
                      {"prompt": "Q", "chosen": "", "rejected": "B"}],
    "not_ending_in_assistant": [_bad(chosen=conv("Hi", "Hello", "Q2")),
                                _bad(rejected=conv("Hi", "Hello", "Q2"))],
    "prompt_not_ending_in_user": [_bad(chosen=conv("Hi", "A", "Q")[1:2], rejected=conv("Hi", "B")[1:2]),
                                  _bad(chosen=[*conv("Hi", "A"), msg("assistant", "A2")],
                                       rejected=[*conv("Hi", "A"), msg("assistant", "B2")])],
    "prompt_mismatch": [_bad(rejected=conv("Hi", "Howdy", "Q2", "B2"))],
    "mixed_formats": [{"prompt": "Q", "chosen": "A", "rejected": conv("Q", "B")},
                      {"prompt": conv("Q"), "chosen": "A", "rejected": "B"}],
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_rows_are_counted_by_reason(tok, reason):
    bad = BAD_ROWS[reason]
    texts, report = process_rows([GOOD] * 100 + bad, tok, max_bad_fraction=0.5)
    assert len(texts) == report.kept == 100
    assert dict(report.invalid) == {reason: len(bad)}
    assert report.summary() == f"{100 + len(bad)} rows -> 100 examples; invalid {len(bad)} ({reason}={len(bad)})"


def test_too_many_bad_rows_raise_naming_counts_and_threshold(tok):
    rows = [GOOD] * 18 + [_bad(chosen=KeyError), _bad(rejected=conv("Hi", "X", "Q2", "B2"))]
    process_rows(rows, tok, max_bad_fraction=0.1)  # exactly 10% is allowed
    with pytest.raises(DataQualityError) as e:
        process_rows(rows, tok, source="train split")  # default 0.05
    message = str(e.value)
    assert message.startswith("train split: ")
    for part in ("2 of 20", "max_bad_row_fraction=0.05", "missing_key=1", "prompt_mismatch=1",
                 # what was wrong with which row, not only how often
                 "row 18 (missing_key: no 'chosen')",
                 "row 19 (prompt_mismatch: chosen and rejected differ before the last turn)"):
        assert part in message


BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
                "{{ eos_token }}{% endif %}{% endfor %}")


def test_a_template_bos_is_stripped_from_the_answers_as_the_handbook_does():
    """A template that starts with BOS (Mistral / Llama style) renders it in front of every part;
    the handbook removes it from chosen and rejected (TRL adds BOS to the prompt only). Left
    there, TRL's tokenization puts a BOS in the middle of each sequence, as a label."""
    from test_data_tokenization import trl_tokenize

    from zephyr_jax.data import tokenize_texts

    tok = load_tokenizer(chat_template=BOS_TEMPLATE)
    row = {"chosen": conv("Hi", "Hello"), "rejected": conv("Hi", "Bye")}
    [text], _ = process_rows([row], tok)
    assert text == PreferenceText("<s>[INST] Hi [/INST]", "Hello</s>", "Bye</s>")
    [example], _ = tokenize_texts([text], tok, max_length=64, max_prompt_length=32)
    want = trl_tokenize(tok, text)  # TRL's own tokenize_row on the handbook's texts
    for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert list(example[key]) == list(want[key]), key
    assert list(example["chosen_input_ids"]).count(tok.bos_token_id) == 1
