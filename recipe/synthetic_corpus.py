"""The built-in offline corpus (`training.dataset = "synthetic"`): templated English-like documents.

Document `i` is a pure function of (seed, i), so any shard or resume point is reproducible without
storing text. The text mixes learnable regularities (grammar, fixed templates, correct arithmetic,
counting) with random content, so a small byte-level model's loss falls quickly but not to zero.
"""

from __future__ import annotations

import random

NAMES = "Alice Bob Carla David Emma Farid Grace Hugo Ines Jonas Kira Liam Maya Noah Olga Pablo Rosa Sam Tara Victor".split()
ANIMALS = "cat dog horse rabbit fox owl goat duck bear wolf mouse tiger".split()
OBJECTS = "apple book chair lamp key cup letter stone coin hat map candle".split()
PLACES = "garden kitchen forest market library river harbor school village station bakery museum".split()
CITIES = "Paris Lisbon Oslo Cairo Lima Tokyo Nairobi Quito Dublin Hanoi Perth Vienna".split()
JOBS = "baker teacher farmer doctor painter sailor pilot writer engineer gardener".split()
COLORS = "red blue green yellow white black brown gray orange purple".split()
ADJS = "small large old new quiet bright heavy gentle curious tired happy clever".split()
VERBS = [("found", "finds"), ("painted", "paints"), ("carried", "carries"), ("sold", "sells"),
         ("bought", "buys"), ("lost", "loses"), ("cleaned", "cleans"), ("counted", "counts")]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
TOPICS = ["a day at the", "notes from the", "a letter about the", "the story of the", "a report on the"]


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    if noun.endswith(("s", "x", "ch")):
        return noun + "es"
    if noun == "mouse":
        return "mice"
    return noun + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _count(r: random.Random, noun: str) -> str:
    n = r.randint(1, 12) if r.random() < 0.7 else r.randint(13, 999)
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) and r.random() < 0.5 else str(n)
    return f"{word} {_plural(noun, n)}"


def _sentence(r: random.Random) -> str:
    name, other = r.sample(NAMES, 2)
    past, present = r.choice(VERBS)
    kind = r.randrange(9)
    if kind == 0:
        return f"{name} {past} {_count(r, r.choice(OBJECTS))} in the {r.choice(PLACES)}."
    if kind == 1:
        return f"The {r.choice(ADJS)} {r.choice(ANIMALS)} sleeps near the {r.choice(COLORS)} {r.choice(OBJECTS)}."
    if kind == 2:
        return f"{name} lives in {r.choice(CITIES)} and works as {_a(r.choice(JOBS))}."
    if kind == 3:
        a, b = r.randint(0, 99), r.randint(0, 99)
        op, val = r.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        return f"{a} {op} {b} = {val}."
    if kind == 4:
        a, b = r.randint(1, 12), r.randint(1, 12)
        return f"If {name} has {a} coins and {other} gives {b} more, {name} has {a + b} coins."
    if kind == 5:
        return f"On {r.choice(DAYS)}, {name} and {other} walked to the {r.choice(PLACES)}."
    if kind == 6:
        start, step = r.randint(0, 50), r.randint(1, 9)
        seq = ", ".join(str(start + step * k) for k in range(r.randint(4, 9)))
        return f"Count by {step}: {seq}."
    if kind == 7:
        return f"Every {r.choice(DAYS)}, {name} {present} {_a(r.choice(ADJS))} {r.choice(OBJECTS)}."
    return f"The {r.choice(OBJECTS)} is {r.choice(COLORS)}, and the {r.choice(ANIMALS)} is {r.choice(ADJS)}."


def _list_block(r: random.Random) -> str:
    items = r.sample(OBJECTS, r.randint(2, 6))
    lines = "\n".join(f"- {_count(r, item)}" for item in items)
    return f"{r.choice(NAMES)}'s list for {r.choice(DAYS)}:\n{lines}"


def _qa_block(r: random.Random) -> str:
    a, b = r.randint(1, 50), r.randint(1, 50)
    return f"Q: What is {a} plus {b}?\nA: {a + b}."


def document(seed: int, index: int) -> str:
    """Document `index` of the corpus seeded by `seed` (deterministic, a few bytes to ~10 KB)."""
    r = random.Random(f"flare-synthetic:{seed}:{index}")  # str seeds hash stably across processes
    roll = r.random()  # heavy tail: most documents are short, a few are longer than typical seq_len
    n = r.randint(1, 8) if roll < 0.7 else r.randint(9, 40) if roll < 0.95 else r.randint(60, 160)
    parts = [f"{r.choice(TOPICS).capitalize()} {r.choice(PLACES)}"]
    paragraph: list[str] = []
    for _ in range(n):
        block = r.random()
        if block < 0.08:
            parts += [" ".join(paragraph), _list_block(r)] if paragraph else [_list_block(r)]
            paragraph = []
        elif block < 0.14:
            parts += [" ".join(paragraph), _qa_block(r)] if paragraph else [_qa_block(r)]
            paragraph = []
        else:
            paragraph.append(_sentence(r))
            if len(paragraph) >= r.randint(3, 7):
                parts.append(" ".join(paragraph))
                paragraph = []
    if paragraph:
        parts.append(" ".join(paragraph))
    return "\n\n".join(parts)
