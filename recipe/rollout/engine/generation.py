"""The engine's half of RL: serve the trainer's generation requests (runs in the inference engine).

After applying weight version ``v`` the engine takes the trainer's next request, which names
``v``, generates ``n`` completions per prompt with their per-token log-probabilities, and replies
(keys and order: ``recipe/rollout/protocol.py``). ``GenerationService`` does the store side for
any engine: flare's reference receiver samples with ``sample_from_logits``; a vLLM driver passes
``vllm.LLM.generate`` (``scripts/tools/serve_vllm_rollouts.py``). Imports only torch and the
standard library.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from recipe.rollout.protocol import rl_reply_key, rl_request_key

# generate(prompts, n, max_new_tokens, temperature, seed, stop_ids) -> (completions, logprobs),
# each a list per prompt of n lists (token ids; the log-probability of each sampled token)
Generate = Callable[[list, int, int, float, int, list], tuple[list, list]]


class GenerationService:
    def __init__(self, store=None, *, address: str | None = None, port: int | None = None):
        """The engine's store (``ReceiverEndpoint.store``), or a client of it at address:port."""
        self.store = store if store is not None else dist.TCPStore(
            address, int(port), is_master=False, timeout=timedelta(days=365), wait_for_workers=False)
        self.served = 0

    def next_request(self, wait_s: float | None = None) -> dict | None:
        """The trainer's next request (None if ``wait_s`` passed first)."""
        key = rl_request_key(self.served + 1)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while not self.store.check([key]):
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        request = json.loads(self.store.get(key))
        request["n_request"] = self.served + 1
        return request

    def reply(self, request: dict, completions: list, logprobs: list) -> None:
        self.store.set(rl_reply_key(request["n_request"]), json.dumps(
            {"version": request["version"], "completions": completions, "logprobs": logprobs}))
        self.served = request["n_request"]

    def serve(self, version: int, generate: Generate, wait_s: float | None = None) -> bool:
        """Answer the trainer's request for ``version``; False if none came within ``wait_s`` or
        the trainer said it is done (its last version is exported but not sampled)."""
        request = self.next_request(wait_s)
        if request is None:
            return False
        if request.get("done"):  # the trainer finished: no completions of this version are wanted
            self.served = request["n_request"]
            return False
        if request["version"] != version:
            raise RuntimeError(f"the trainer asked for completions of version {request['version']}, the engine "
                               f"holds version {version}")
        completions, logprobs = generate(request["prompts"], request["n"], request["max_new_tokens"],
                                         request["temperature"], request["seed"], request["stop_ids"])
        self.reply(request, completions, logprobs)
        return True


@torch.no_grad()
def sample_from_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], prompts: list, n: int, max_new_tokens: int,
                       temperature: float, seed: int, stop_ids: list) -> tuple[list, list]:
    """Sampling as an engine does it, from a full forward per token (no KV cache; for small models):
    ``logits_fn(ids [B, T]) -> logits [B, T, V]``. Log-probabilities are at ``temperature``."""
    generator = torch.Generator().manual_seed(seed)
    completions, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt] * n)
        done = torch.zeros(n, dtype=torch.bool)
        tokens, lps = [[] for _ in range(n)], [[] for _ in range(n)]
        for _ in range(max_new_tokens):
            logp = (logits_fn(ids)[:, -1].float() / temperature).log_softmax(-1).cpu()
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            for i in range(n):
                if not done[i]:
                    tokens[i].append(int(nxt[i]))
                    lps[i].append(float(logp[i, nxt[i]]))
                    done[i] = int(nxt[i]) in stop_ids
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
        completions.append(tokens)
        logprobs.append(lps)
    return completions, logprobs
