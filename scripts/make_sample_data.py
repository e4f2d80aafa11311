"""Generate the shipped sample preference set (zephyr_jax/assets/sample/{train,test}.jsonl).

    python scripts/make_sample_data.py [--out zephyr_jax/assets/sample] [--seed 0]

Rows follow the exact schema of argilla/distilabel-capybara-dpo-7k-binarized (every column), so
the real pipeline runs on them unchanged. The content is templated so that a tiny model learns
the preference in minutes on a CPU:

- chosen answers are correct and always in one terse style ("The capital of Peru is Lima.");
- rejected answers are wrong in systematic ways a small model can pick up: a wrong value from
  a small fact table that repeats across rows (wrong capital, naive plural, the word itself as
  its opposite, an off-by-one sum, words in the wrong order), hedging words the chosen answers
  never use ("Hmm, I am not sure, but I think ..."), an echo of the prompt, or a refusal;
- about a quarter of the rows are multi-turn (a follow-up question after a correct first
  answer) and some start with a system message.

The same seed gives byte-identical files; test rows never repeat a train row's (prompt, chosen,
rejected) triple.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "zephyr_jax" / "assets" / "sample"
NUM_TRAIN, NUM_TEST = 400, 100

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("strong", "weak"),
    ("young", "old"), ("high", "low"), ("rich", "poor"), ("soft", "hard"), ("wet", "dry"),
    ("loud", "quiet"), ("clean", "dirty"),
]
PLURALS = [  # (singular, plural, the naive wrong plural)
    ("child", "children", "childs"), ("mouse", "mice", "mouses"), ("foot", "feet", "foots"),
    ("tooth", "teeth", "tooths"), ("leaf", "leaves", "leafs"), ("knife", "knives", "knifes"),
    ("city", "cities", "citys"), ("baby", "babies", "babys"), ("box", "boxes", "boxs"),
    ("bus", "buses", "buss"), ("person", "people", "persons"), ("goose", "geese", "gooses"),
]
WORDS = [
    "apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "candle", "orbit",
    "maple", "silver", "rocket", "garden", "pencil", "ocean", "window", "honey", "violet", "bridge",
]
SYSTEM_PROMPTS = ["You are Zephyr, a helpful assistant.", "Answer briefly and correctly."]
HEDGES = ["Hmm, I am not sure, but I think", "Honestly, I would guess that", "Maybe, probably,"]
REFUSALS = [
    "I am sorry, but I cannot help with that request.",
    "As an AI language model, I do not have an answer to that.",
]
REJECTED_MODELS = [
    "argilla/notus-7b-v1", "teknium/OpenHermes-2.5-Mistral-7B", "mlabonne/NeuralBeagle14-7B",
]
CHOSEN_MODEL = "gpt4"


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


# Each task returns (question, correct answer, wrong answer in the same style).
def task_capital(rng):
    (country, capital), (_, wrong) = rng.sample(CAPITALS, 2)
    q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}."]).format(c=country)
    return q, f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."


def task_opposite(rng):
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return (f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{opposite}".',
            f'The opposite of "{word}" is "{word}".')


def task_plural(rng):
    singular, plural, naive = rng.choice(PLURALS)
    return (f"What is the plural of {singular}?", f"The plural of {singular} is {plural}.",
            f"The plural of {singular} is {naive}.")


def task_add(rng):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    return f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}.", f"{a} plus {b} equals {wrong}."


def task_repeat(rng):
    words = rng.sample(WORDS, 3)
    wrong = words[:]
    while wrong == words:
        rng.shuffle(wrong)
    return f"Repeat these words in order: {' '.join(words)}", " ".join(words), " ".join(wrong)


def task_reverse(rng):
    words = rng.sample(WORDS, 3)
    return (f"Write these words in reverse order: {' '.join(words)}", " ".join(words[::-1]),
            " ".join(words))


def task_upper(rng):
    words = rng.sample(WORDS, 2)
    return (f"Write these words in capital letters: {' '.join(words)}",
            " ".join(w.upper() for w in words), " ".join(words))


def task_lines(rng):
    words = rng.sample(WORDS, 3)
    return (f"Write each of these words on its own line: {' '.join(words)}", "\n".join(words),
            " ".join(words))


SINGLE_TURN = {  # task -> (source, weight)
    task_capital: ("Know-Logic", 3), task_opposite: ("General-Instruct", 2),
    task_plural: ("EverythingLM", 2), task_add: ("GOAT", 2), task_repeat: ("Dove", 1),
    task_reverse: ("SuperCOT", 1), task_upper: ("TaskSource", 1), task_lines: ("Airoboros", 1),
}


def follow_up_capital(rng):
    (c1, cap1), (c2, cap2), (_, wrong) = rng.sample(CAPITALS, 3)
    first = (f"What is the capital of {c1}?", f"The capital of {c1} is {cap1}.")
    return first, (f"And what about {c2}?", f"The capital of {c2} is {cap2}.",
                   f"The capital of {c2} is {wrong}.")


def follow_up_add(rng):
    a, b, k = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    s = a + b
    wrong = s + k + rng.choice([-2, -1, 1, 2])
    return (f"What is {a} plus {b}?", f"{a} plus {b} equals {s}."), (
        f"Now add {k} to that.", f"{s} plus {k} equals {s + k}.", f"{s} plus {k} equals {wrong}.")


def follow_up_opposite(rng):
    (w1, o1), (w2, o2) = rng.sample(OPPOSITES, 2)
    return (f'What is the opposite of "{w1}"?', f'The opposite of "{w1}" is "{o1}".'), (
        f'And the opposite of "{w2}"?', f'The opposite of "{w2}" is "{o2}".',
        f'The opposite of "{w2}" is "{w2}".')


MULTI_TURN = {follow_up_capital: "Know-Logic", follow_up_add: "GOAT",
              follow_up_opposite: "General-Instruct"}


def reject(rng, question: str, wrong: str) -> str:
    """A rejected answer: the wrong value, hedged, an echo of the prompt, or a refusal."""
    kind = rng.choices(["wrong", "hedge", "echo", "refuse"], weights=[4, 3, 1.5, 1.5])[0]
    if kind == "wrong":
        return wrong
    if kind == "hedge":
        return f"{rng.choice(HEDGES)} {_lower_first(wrong)}"
    if kind == "echo":
        return f"You asked: {question}"
    return rng.choice(REFUSALS)


def _zephyr_prompt(messages: list[dict]) -> str:
    """The generation prompt string, as capybara's `generation_prompt` column holds one."""
    parts = [f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


def make_row(rng: random.Random) -> dict:
    history: list[tuple[str, str]] = []
    if rng.random() < 0.25:
        task = rng.choice(list(MULTI_TURN))
        source = MULTI_TURN[task]
        first, (question, correct, wrong) = task(rng)
        history.append(first)
    else:
        tasks = list(SINGLE_TURN)
        task = rng.choices(tasks, weights=[SINGLE_TURN[t][1] for t in tasks])[0]
        source = SINGLE_TURN[task][0]
        question, correct, wrong = task(rng)
    rejected_answer = reject(rng, question, wrong)

    prefix = []
    if rng.random() < 0.2:
        prefix.append({"content": rng.choice(SYSTEM_PROMPTS), "role": "system"})
    for q, a in history:
        prefix += [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]
    prefix.append({"content": question, "role": "user"})

    others = [reject(rng, question, wrong) for _ in range(2)]
    generations = [rejected_answer, *others]
    rating_chosen = rng.choice([4, 5])
    return {
        "source": source,
        "conversation": [{"input": q, "output": a} for q, a in [*history, (question, correct)]],
        "original_response": correct,
        "generation_prompt": [_zephyr_prompt(prefix) for _ in generations],
        "raw_generation_responses": generations,
        "new_generations": generations,
        "prompt": question,
        "chosen": [*prefix, {"content": correct, "role": "assistant"}],
        "rejected": [*prefix, {"content": rejected_answer, "role": "assistant"}],
        "rating_chosen": rating_chosen,
        "rating_rejected": rng.randint(1, rating_chosen - 2),
        "chosen_model": CHOSEN_MODEL,
        "rejected_model": rng.choice(REJECTED_MODELS),
    }


def _key(row: dict) -> str:
    return json.dumps([row["chosen"], row["rejected"]])


def make_splits(seed: int, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST):
    rng = random.Random(seed)
    train = [make_row(rng) for _ in range(num_train)]
    seen = {_key(r) for r in train}
    test = []
    while len(test) < num_test:
        row = make_row(rng)
        if _key(row) not in seen:
            seen.add(_key(row))
            test.append(row)
    return train, test


def write_jsonl(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = make_splits(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
