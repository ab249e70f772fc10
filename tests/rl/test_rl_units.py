"""GRPO's pieces on toy data: the loss and its gradients against a hand-written reference, token
log-probabilities, group advantages, the batch layout and its data-parallel split, the prompts
and rewards, and the configuration refusals."""

import math
from types import SimpleNamespace

import pytest
import torch

from recipe.errors import ConfigError
from recipe.rl.loss import grpo_loss, token_logprobs
from recipe.rl.rollouts import build_batch, group_advantages, validate_rl
from recipe.rl.tasks import Prompts, char_accuracy, exact_match


def reference_loss_and_grad(logp, old, adv, mask, eps, n_global):
    """PPO's clipped objective token by token, with its derivative written out: -A * ratio where
    the ratio is inside the clip range (or clipped on the side that does not help), 0 elsewhere."""
    loss, grad = 0.0, torch.zeros_like(logp)
    for idx in zip(*torch.nonzero(mask, as_tuple=True)):
        r, a = math.exp(float(logp[idx] - old[idx])), float(adv[idx])
        clipped = min(max(r, 1 - eps), 1 + eps)
        if r * a <= clipped * a:
            loss -= r * a
            grad[idx] = -a * r / n_global
        else:
            loss -= clipped * a
    return loss / n_global, grad


def test_grpo_loss_and_gradients_match_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 6, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(3, 6, generator=g)  # ratios inside and outside the clip range
    adv = torch.tensor([1.5, -0.7, 0.0])[:, None].expand(3, 6).clone()
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float)
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, global_tokens=20)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(logp.detach(), old, adv, mask, 0.2, 20)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(logp.grad, ref_grad, rtol=1e-6, atol=1e-8)
    ratio = torch.exp(logp.detach() - old)
    on = mask > 0
    assert 0 < stats["clip_fraction"] < 1
    assert stats["clip_fraction"].item() == pytest.approx(((ratio - 1).abs() > 0.2)[on].float().mean().item())
    assert stats["logprob_gap_max"].item() == pytest.approx((logp.detach() - old).abs()[on].max().item())


def test_the_kl_penalty_adds_its_estimate_and_gradient():
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(2, 5, generator=g) * 3).requires_grad_()
    ref = logp.detach() + 0.3 * torch.randn(2, 5, generator=g)
    old, adv = logp.detach().clone(), torch.zeros(2, 5)  # on-policy, no advantage: only the KL term acts
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    loss, stats = grpo_loss(logp, old, adv, mask, 0.2, global_tokens=10, ref_logp=ref, kl_coef=0.5)
    loss.backward()
    r = ref - logp.detach()
    kl = torch.exp(r) - r - 1
    assert loss.item() == pytest.approx(0.5 * (kl * mask).sum().item() / 10, rel=1e-6)
    torch.testing.assert_close(logp.grad, 0.5 * (1 - torch.exp(r)) * mask / 10)  # d/dlogp of exp(r) - r - 1
    assert stats["kl"].item() == pytest.approx(kl[mask > 0].mean().item()) and (kl >= 0).all()


def test_token_logprobs_are_the_log_softmax_of_the_next_token():
    g = torch.Generator().manual_seed(1)
    logits, tokens = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    expected = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    hot = (logits / 0.7).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), hot)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(group_advantages(rewards, False), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))
    normalized = group_advantages(rewards, True)
    torch.testing.assert_close(normalized[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (rewards[0].std() + 1e-6))
    assert torch.equal(normalized[1], torch.zeros(4))  # a group that agrees teaches nothing


def test_batch_rows_masks_and_the_data_parallel_split():
    prompts = [[256, 1, 2], [256, 3]]
    completions = [[[5, 6], [7]], [[8, 9, 10], [11, 12]]]
    logprobs = [[[-0.1, -0.2], [-0.3]], [[-0.4, -0.5, -0.6], [-0.7, -0.8]]]
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    full = build_batch(prompts, completions, logprobs, adv, pad_id=258, rank=0, world=1)
    assert full.global_tokens == 8 and full.tokens.shape == (4, 5)
    assert full.tokens[2].tolist() == [256, 3, 8, 9, 10] and full.tokens[1].tolist() == [256, 1, 2, 7, 258]
    # position t predicts token t + 1: row 2's completion is predicted from position 1 on
    assert full.mask[2].tolist() == [0, 1, 1, 1] and full.old_logprobs[2, 1:].tolist() == pytest.approx([-0.4, -0.5, -0.6])
    assert full.advantages[3].tolist() == [0, -0.5, -0.5, 0]
    halves = [build_batch(prompts, completions, logprobs, adv, 258, r, 2) for r in (0, 1)]
    assert [h.tokens.shape[0] for h in halves] == [2, 2] and all(h.global_tokens == 8 for h in halves)
    assert halves[1].tokens[0].tolist() == [256, 3, 8, 9, 10]
    with pytest.raises(ConfigError, match="do not split over 3 data-parallel ranks"):
        build_batch(prompts, completions, logprobs, adv, 258, 0, 3)


def test_prompts_are_the_same_for_a_step_whatever_came_before(tmp_path):
    a, b = Prompts("reverse", seed=3), Prompts("reverse", seed=3)
    a.for_step(1, 8)
    assert a.for_step(2, 8) == b.for_step(2, 8) != b.for_step(3, 8)
    prompt, answer = a.for_step(5, 1)[0]
    digits = prompt.removeprefix("reverse ").removesuffix(" =")
    assert answer == digits[::-1] and exact_match(f" {answer}\nreverse", answer) == 1.0
    assert exact_match("12", "21") == 0.0
    assert char_accuracy("4321\n", "4321") == 1.0 and char_accuracy("4301", "4321") == 0.75
    assert char_accuracy("43210", "4321") == 0.8 and char_accuracy("", "4321") == 0.0
    rows = tmp_path / "task.jsonl"
    rows.write_text('{"prompt": "2+2=", "answer": 4}\n')
    assert Prompts(str(rows), 0).for_step(1, 2) == [("2+2=", "4")] * 2
    rows.write_text('{"question": "2+2="}\n')
    with pytest.raises(ConfigError, match="needs \"prompt\" and \"answer\""):
        Prompts(str(rows), 0)


def job(**rl):
    rl = {"enable": True, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "temperature": 1.0,
          "reward": "recipe.rl.tasks:exact_match", "kl_coef": 0.0, **rl}
    return SimpleNamespace(rl=SimpleNamespace(**rl), hooks=SimpleNamespace(post_step=["rollout"]),
                           rollout=SimpleNamespace(enable=True, interval=1, on_failure="raise"))


@pytest.mark.parametrize("change,message", [
    ({"group_size": 1}, "rl.group_size=1"),
    ({"temperature": 0.0}, "rl.temperature=0.0"),
    ({"reward": "no_such_module:f"}, "rl.reward='no_such_module:f': cannot import it"),
])
def test_bad_rl_settings_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate_rl(job(**change))
    assert "\n" not in str(e.value)


def test_a_kl_penalty_needs_the_starting_weights_in_a_folder():
    config = job(kl_coef=0.1)
    config.model = SimpleNamespace(init_from_hf=None)
    with pytest.raises(ConfigError, match="rl.kl_coef > 0 penalizes drifting from the starting weights"):
        validate_rl(config)
    config.model.init_from_hf = "/some/folder"
    validate_rl(config)


def test_rl_needs_an_export_every_step():
    config = job()
    config.rollout.interval = 2
    with pytest.raises(ConfigError, match="rollout.interval must be 1"):
        validate_rl(config)
    config = job()
    config.hooks.post_step = []
    with pytest.raises(ConfigError, match="list \"rollout\" in hooks.post_step"):
        validate_rl(config)
