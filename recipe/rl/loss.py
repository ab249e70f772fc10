"""The GRPO policy-gradient loss (runs in the trainer).

Per completion token t: ratio_t = exp(logp_t - logp_engine_t), the trainer's probability of the
sampled token over the engine's; loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
with the completion's advantage A, plus ``kl_coef`` x KL(trainer || reference) estimated per token as
exp(r) - r - 1 with r = logp_reference - logp_trainer (non-negative, unbiased; the "k3" estimator).
The step's loss is the sum over this rank's completion tokens
divided by the completion tokens of the whole step (every data-parallel rank), the convention of
flare's token loss: data parallelism sums gradients, so every layout takes the same update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def token_logprobs(logits, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) at ``temperature`` for every position t: [B, T - 1]
    (the distribution the engine sampled from). Under tensor parallelism the logits are split over
    the vocabulary (loss parallel) and the cross entropy reduces over the shards."""
    b, t = tokens.shape
    pred = logits[:, :-1].flatten(0, 1).float()
    if temperature != 1.0:
        pred = pred / temperature
    logp = -F.cross_entropy(pred, tokens[:, 1:].flatten(), reduction="none")
    if isinstance(logp, DTensor):
        logp = logp.full_tensor()
    return logp.view(b, t - 1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, global_tokens: int, ref_logp: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """This rank's share of the step's loss, and (detached) statistics over its completion tokens:
    the trainer-vs-engine log-probability gap, the fraction of tokens whose ratio was clipped, and
    with a reference the mean KL estimate."""
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl = None
    if ref_logp is not None and kl_coef > 0:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / max(global_tokens, 1)
    with torch.no_grad():
        on = mask > 0
        gap = (logp - old_logp).abs()[on]
        clipped = ((ratio - 1).abs() > clip_eps)[on]
        stats = {"logprob_gap_mean": gap.mean() if gap.numel() else gap.sum(),
                 "logprob_gap_max": gap.max() if gap.numel() else gap.sum(),
                 "clip_fraction": clipped.float().mean() if clipped.numel() else clipped.sum().float()}
        if kl is not None:
            stats["kl"] = kl[on].mean() if on.any() else kl.sum() * 0
    return loss, stats
