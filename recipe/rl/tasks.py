"""Verifiable tasks: prompts with an exact answer, generated from a seed (or read from a file),
and reward functions ``f(completion, answer) -> float``.

Prompt and answer are plain text; the completion is the engine's text up to its first newline.
``python -m recipe.rl.tasks --task reverse --n 20000 --out sft.jsonl`` writes worked examples
("prompt" + answer + newline in a "text" field) for a supervised warm-up on the same task;
``python -m recipe.rl.tasks --task reverse --eval outputs/rl/sft/hf/step-150`` prints the exact-match
rate of an HF model folder (flare's byte tokenizer) on fresh prompts, sampled and greedy.
"""

from __future__ import annotations

import argparse
import json
import os
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


def char_accuracy(completion: str, answer: str) -> float:
    """Partial credit: the fraction of the answer's characters the completion (up to its first
    newline) has in the same place, over the longer of the two (extra characters cost)."""
    got, want = completion.split("\n", 1)[0].strip(), answer.strip()
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)


def evaluate(folder: str, task: str, prompts: int, samples: int, max_new_tokens: int, seed: int) -> dict:
    """Exact-match rate of an HF model folder on ``prompts`` fresh prompts: ``samples`` completions
    each at temperature 1 (what RL starts from), and greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipe.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    pairs = Prompts(task, seed).for_step(0, prompts)
    hits = {"sampled": 0, "greedy": 0}
    torch.manual_seed(seed)
    for prompt, answer in pairs:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]], device=device)
        for mode, n in (("sampled", samples), ("greedy", 1)):
            with torch.no_grad():
                out = model.generate(ids.expand(n, -1), do_sample=mode == "sampled", temperature=1.0 if mode == "sampled"
                                     else None, top_k=0 if mode == "sampled" else None, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(ids.expand(n, -1)))
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            hits[mode] += sum(exact_match(text, answer) for text in texts)
    return {"sampled": hits["sampled"] / (prompts * samples), "greedy": hits["greedy"] / prompts}


def main() -> None:
    ap = argparse.ArgumentParser(description="Write worked examples of a built-in task (JSON lines, 'text'), or "
                                 "evaluate an HF model folder on it.")
    ap.add_argument("--task", default="reverse", help="a built-in task, or (with --eval) a JSON-lines file")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write worked examples here")
    ap.add_argument("--eval", help="an HF model folder to evaluate (prints one JSON line)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=8)
    args = ap.parse_args()
    if args.eval:
        print(json.dumps(evaluate(args.eval, args.task, args.prompts, args.samples, args.max_new_tokens, args.seed)))
        return
    if not args.out or args.task not in BUILTIN:
        ap.error("writing examples needs --out and a built-in --task")
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for _ in range(args.n):
            prompt, answer = BUILTIN[args.task](rng)
            f.write(json.dumps({"text": f"{prompt}{answer}\n"}) + "\n")


if __name__ == "__main__":
    main()
