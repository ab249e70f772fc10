"""Verifiable tasks: prompts with an exact answer, generated from a seed (or read from a file),
and reward functions ``f(completion, answer) -> float``.

Prompt and answer are plain text; the completion is the engine's text up to its first newline.
``python -m recipe.rl.tasks --task reverse --n 20000 --out sft.jsonl`` writes worked examples
("prompt" + answer + newline in a "text" field) for a supervised warm-up on the same task.
"""

from __future__ import annotations

import argparse
import json
import random

from recipe.errors import ConfigError


def reverse_task(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    return f"reverse {digits} =", digits[::-1]


def add_task(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


BUILTIN = {"reverse": reverse_task, "add": add_task}


class Prompts:
    """(prompt, answer) pairs of a built-in task or a JSON-lines file; step ``s`` draws from its own
    seeded generator, so a resumed run sees the prompts an uninterrupted one would."""

    def __init__(self, task: str, seed: int):
        self.seed = seed
        if task in BUILTIN:
            self.make, self.rows = BUILTIN[task], None
            return
        try:
            with open(task) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"rl.task={task!r}: neither a built-in task ({', '.join(BUILTIN)}) nor a readable "
                              f"JSON-lines file ({e.strerror})") from None
        except ValueError as e:
            raise ConfigError(f"rl.task={task!r}: not JSON lines ({e})") from None
        if not self.rows or not all("prompt" in r and "answer" in r for r in self.rows):
            raise ConfigError(f"rl.task={task!r}: every line needs \"prompt\" and \"answer\" fields")

    def for_step(self, step: int, k: int) -> list[tuple[str, str]]:
        rng = random.Random(self.seed * 1_000_003 + step)
        if self.rows is None:
            return [self.make(rng) for _ in range(k)]
        return [(r["prompt"], str(r["answer"])) for r in (rng.choice(self.rows) for _ in range(k))]


def exact_match(completion: str, answer: str) -> float:
    """1 when the completion (up to its first newline) is the answer, else 0."""
    return float(completion.split("\n", 1)[0].strip() == answer.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description="Write worked examples of a built-in task (JSON lines, 'text').")
    ap.add_argument("--task", choices=sorted(BUILTIN), default="reverse")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.n):
            prompt, answer = BUILTIN[args.task](rng)
            f.write(json.dumps({"text": f"{prompt}{answer}\n"}) + "\n")


if __name__ == "__main__":
    main()
