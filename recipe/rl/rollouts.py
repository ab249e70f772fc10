"""The step's batch from the engine's rollouts (runs in the trainer).

Every step, on-policy and synchronous: the weights of the previous step are in the engine (the
``rollout`` hook exported them as version ``step - 1``; the initial weights go out as version 0
before the first step). Rank 0 takes ``rl.prompts_per_step`` prompts, asks the engine for
``rl.group_size`` completions of each (``recipe/rollout/engine/generation.py`` serves them),
scores them with ``rl.reward`` and broadcasts the result; every rank then builds the same global
batch and takes its data-parallel slice. Advantages are the reward minus its group's mean
(divided by the group's standard deviation with ``rl.normalize_std``), one value per completion.

An asynchronous pipeline (generate step ``s + 1`` while training on step ``s``) would keep this
batch format and add one version of staleness: the engine's log-probabilities would then come
from the weights one step old, which the clipped ratio of the loss already accounts for.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from recipe.errors import ConfigError
from recipe.rl.tasks import Prompts, exact_match
from recipe.rollout.protocol import RL_COUNTER, rl_reply_key, rl_request_key
from recipe.rollout.trainer.hook import rollout_hook_listed

logger = logging.getLogger(__name__)


def validate_rl(job_config) -> None:
    rl, rollout = job_config.rl, job_config.rollout
    if not rl.enable:
        return
    if not rollout_hook_listed(job_config):
        raise ConfigError("rl.enable needs the weights in the engine every step: set rollout.enable = true and list "
                          "\"rollout\" in hooks.post_step")
    if rollout.interval != 1 or rollout.on_failure != "raise":
        raise ConfigError(f"rl.enable: rollout.interval must be 1 and rollout.on_failure \"raise\" (got "
                          f"{rollout.interval}, {rollout.on_failure!r}): every step samples from the last step's weights")
    for key in ("prompts_per_step", "group_size", "max_new_tokens"):
        if getattr(rl, key) < 1:
            raise ConfigError(f"rl.{key}={getattr(rl, key)}: must be at least 1")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size={rl.group_size}: advantages compare completions of one prompt, use >= 2")
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature={rl.temperature}: sampling needs a positive temperature")
    if rl.kl_coef < 0:
        raise ConfigError(f"rl.kl_coef={rl.kl_coef}: must be >= 0")
    if rl.kl_coef > 0 and not job_config.model.init_from_hf:
        raise ConfigError("rl.kl_coef > 0 penalizes drifting from the starting weights: name them in "
                          "model.init_from_hf (the reference model is loaded from that folder)")
    load_reward(rl.reward)


def load_reward(spec: str):
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"rl.reward={spec!r}: cannot import it ({e}); give 'package.module:function'") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec!r} is not a function")
    return fn


def group_advantages(rewards: torch.Tensor, normalize_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """rewards [prompts, group] -> advantages of the same shape: reward minus the group mean,
    divided by the group's standard deviation (unbiased) when ``normalize_std``."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


@dataclass
class RLBatch:
    """This rank's slice of the step: ``tokens`` [B, T] (prompt, completion, padding), and per
    position t of ``tokens[:, 1:]``: ``mask`` (1 on completion tokens), the engine's
    ``old_logprobs`` and the sequence's ``advantages``. ``global_tokens``: completion tokens of
    the whole step (every rank), the loss's normalizer."""

    tokens: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    global_tokens: int
    metrics: dict


def build_batch(prompts: list[list[int]], completions: list[list[list[int]]], logprobs: list[list[list[float]]],
                advantages: torch.Tensor, pad_id: int, rank: int, world: int) -> RLBatch:
    """Rows are prompt x completion, in order; rank ``rank`` of ``world`` data-parallel ranks gets
    its contiguous share of the rows."""
    rows = [(p, c, lp, float(advantages[i, j])) for i, p in enumerate(prompts)
            for j, (c, lp) in enumerate(zip(completions[i], logprobs[i]))]
    if len(rows) % world:
        raise ConfigError(f"rl.prompts_per_step x rl.group_size = {len(rows)} completions do not split over "
                          f"{world} data-parallel ranks")
    global_tokens = sum(len(c) for _, c, _, _ in rows)
    share = len(rows) // world
    rows = rows[rank * share:(rank + 1) * share]
    length = max(len(p) + len(c) for p, c, _, _ in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1)
    old = torch.zeros(len(rows), length - 1)
    adv = torch.zeros(len(rows), length - 1)
    for r, (p, c, lp, a) in enumerate(rows):
        tokens[r, :len(p) + len(c)] = torch.tensor(p + c)
        # position t predicts tokens[t + 1]: the completion's tokens are predicted from len(p) - 1 on
        span = slice(len(p) - 1, len(p) - 1 + len(c))
        mask[r, span] = 1.0
        old[r, span] = torch.tensor(lp)
        adv[r, span] = a
    return RLBatch(tokens, mask, old, adv, global_tokens, {})


class RolloutSource:
    def __init__(self, job_config, tokenizer, rank: int, dp_rank: int, dp_world: int):
        self.cfg, self.rollout_cfg = job_config.rl, job_config.rollout
        self.tokenizer = tokenizer
        self.rank, self.dp_rank, self.dp_world = rank, dp_rank, dp_world
        self.prompts = Prompts(self.cfg.task, self.cfg.seed)
        self.reward = load_reward(self.cfg.reward)
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop_ids = sorted({*tokenizer.encode("\n", add_special_tokens=False),
                                *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.store = None

    def _client(self):
        if self.store is None:
            self.store = dist.TCPStore(self.rollout_cfg.engine_address, self.rollout_cfg.engine_port, is_master=False,
                                       timeout=timedelta(seconds=self.cfg.request_timeout_s), wait_for_workers=False)
        return self.store

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos, *ids] if self.bos is not None else ids

    def request(self, version: int, prompts: list[list[int]]) -> tuple[list, list]:
        """Rank 0: the engine's completions of ``prompts`` under weight version ``version``."""
        store = self._client()
        n = int(store.add(RL_COUNTER, 1))
        store.set(rl_request_key(n), json.dumps({
            "version": version, "prompts": prompts, "n": self.cfg.group_size, "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature, "seed": self.cfg.seed * 1_000_003 + version,
            "stop_ids": self.stop_ids}))
        try:
            store.wait([rl_reply_key(n)], timedelta(seconds=self.cfg.request_timeout_s))
        except Exception:  # noqa: BLE001 - the store's own error is a long C++ message
            raise RuntimeError(f"rl: the engine sent no completions for version {version} within "
                               f"{self.cfg.request_timeout_s:.0f}s (rl.request_timeout_s)") from None
        reply = json.loads(store.get(rl_reply_key(n)))
        return reply["completions"], reply["logprobs"]

    def next_batch(self, version: int, device) -> RLBatch:
        """The batch of the step that trains on the completions of weight version ``version``."""
        payload = [None]
        if self.rank == 0:
            pairs = self.prompts.for_step(version + 1, self.cfg.prompts_per_step)
            prompts = [self._encode(p) for p, _ in pairs]
            completions, logprobs = self.request(version, prompts)
            texts = [[self.tokenizer.decode(c, skip_special_tokens=True) for c in group] for group in completions]
            rewards = [[float(self.reward(t, answer)) for t in group] for group, (_, answer) in zip(texts, pairs)]
            exact = sum(exact_match(t, answer) for group, (_, answer) in zip(texts, pairs) for t in group)
            payload = [(prompts, completions, logprobs, rewards, exact / sum(len(g) for g in texts))]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0)
        prompts, completions, logprobs, rewards, exact = payload[0]
        rewards_t = torch.tensor(rewards)
        adv = group_advantages(rewards_t, self.cfg.normalize_std)
        batch = build_batch(prompts, completions, logprobs, adv, self.pad, self.dp_rank, self.dp_world)
        lengths = [len(c) for group in completions for c in group]
        batch.metrics = {"reward_mean": float(rewards_t.mean()), "exact_match": exact, "reward_std": float(rewards_t.std()),
                         "advantage_std": float(adv.std()), "completion_len": sum(lengths) / len(lengths)}
        for name in ("tokens", "mask", "old_logprobs", "advantages"):
            setattr(batch, name, getattr(batch, name).to(device))
        return batch

    def close(self) -> None:
        """Tell the engine that no request follows (it is waiting for one for the last version)."""
        if self.rank == 0 and self.store is not None:
            try:
                n = int(self.store.add(RL_COUNTER, 1))
                self.store.set(rl_request_key(n), json.dumps({"version": -1, "done": True}))
            except Exception as e:  # noqa: BLE001 - an engine that is gone needs no goodbye
                logger.warning(f"rl: could not tell the engine that training ended ({e})")
