"""Rewards for the RL tests: a random model's completions differ in reward, so every group has advantages."""


def byte_parity(completion: str, answer: str) -> float:
    return float(sum(completion.encode()) % 2)
