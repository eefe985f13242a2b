"""Does the RL update point the right way? Two checks that fail when an advantage's sign or its
token mask is swapped (each test runs the sabotaged update too and asserts that it fails).

1. One PA-GRPO step with the reasoning reward held constant: the loss's gradient on every
   reasoning token's log-prob is exactly 0 (A_R = 0; at the first step the policy is the
   reference, so the KL adds nothing), and on every perception token it is -A_P / (perception
   tokens in the group), with A_P's sign.
2. RL learns a reward anyone can see is learnable: on a random tiny model, the share of a fixed
   half of the vocabulary among the completion's tokens (reasoning) and whether the first token is
   in that half (perception: a completion with no observation has its first token as its
   perception segment, p2r.algorithms.advantages.with_choice_token). GRPO and PA-GRPO raise the
   sampled rewards by more than MARGIN within STEPS steps.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

import p2r.algorithms.pagrpo as pagrpo
from callbacks.reward_callbacks import RewardCallback
from p2r.algorithms.advantages import token_advantages
from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.backbones import TinyQwen25VL

from fixed_step import FixedReward, one_step, train_sample  # tests/fixed_step.py

STEPS, MARGIN = 30, 0.25  # measured rises: 0.42-0.51 (grpo, pa_grpo); sabotaged: -0.19 to -0.48


def _tiny(seed: int = 0) -> TinyQwen25VL:
    return TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1, vocab_size=512, seed=seed)


def swapped_sign(adv_p, adv_r, perception_mask, completion_mask):
    return -token_advantages(adv_p, adv_r, perception_mask, completion_mask)


def swapped_masks(adv_p, adv_r, perception_mask, completion_mask):
    return token_advantages(adv_r, adv_p, perception_mask, completion_mask)


SABOTAGE = {"sign": swapped_sign, "masks": swapped_masks}


def _one_step_gradients(synthetic_root, monkeypatch, sabotage=None):
    """One PA-GRPO step on 4 fixed completions (an unclosed observation of 2 words, then the end
    token) with perception rewards [1, 0, 0, 1] and a constant reasoning reward; returns (grad of
    the loss wrt the log-probs (4, T), perception mask, completion mask)."""
    module = PAGRPOModule(_tiny(), rollout=RolloutSettings(group_size=4, max_completion_length=8),
                          loss=LossSettings(beta=0.04), lr=1e-3, schedule="constant")
    tok = module.backbone.tokenizer
    obs = tok("<observation>", add_special_tokens=False)["input_ids"]
    body = tok(" red", add_special_tokens=False)["input_ids"][:1] * 2
    ids = [obs + body + [module.backbone.eos_token_ids[0]]] * 4  # the unclosed block runs to the end token
    if sabotage is not None:
        monkeypatch.setattr(pagrpo, "token_advantages", SABOTAGE[sabotage])
    rewards = [FixedReward("perception/accuracy", "perception", [1.0, 0.0, 0.0, 1.0]),
               FixedReward("reasoning/accuracy", "reasoning", [1.0] * 4)]
    return one_step(module, train_sample(synthetic_root), ids, rewards, monkeypatch)


def _direction_holds(grad, perception, completion) -> bool:
    """Reasoning tokens: gradient 0. Perception tokens: -A_P / n_P with A_P = +-0.866 (rewards
    [1, 0, 0, 1]: mean 0.5, unbiased std 0.5774), n_P = the group's perception tokens."""
    reasoning = completion & ~perception
    a_p = torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.57735 + 1e-4)
    expected = torch.where(perception, (-a_p / perception.sum())[:, None], torch.zeros_like(grad))
    return bool(reasoning.any() and grad[reasoning].abs().max() < 1e-7
                and torch.allclose(grad[perception], expected[perception], atol=1e-5, rtol=1e-3))


def test_constant_reasoning_reward_moves_only_perception_tokens(synthetic_root, monkeypatch):
    grad, perception, completion = _one_step_gradients(synthetic_root, monkeypatch)
    # The unclosed observation runs to the end token, which is reasoning (METHOD.md).
    assert (perception.sum(1) == completion.sum(1) - 1).all() and (completion & ~perception).sum(1).tolist() == [1] * 4
    assert _direction_holds(grad, perception, completion)


@pytest.mark.parametrize("sabotage", sorted(SABOTAGE))
def test_the_direction_check_catches_a_swapped_sign_or_mask(synthetic_root, monkeypatch, sabotage):
    assert not _direction_holds(*_one_step_gradients(synthetic_root, monkeypatch, sabotage))


# ---- RL learns ---------------------------------------------------------------------------------


def _in_half(ids: list[int]) -> list[bool]:
    return [i % 2 == 0 for i in ids]


class EvenTokenShare(RewardCallback):
    """Reasoning: the share of even token ids among the completion's tokens after the first."""

    name, process = "reasoning/even_share", "reasoning"

    def score(self, rollouts):
        return [sum(_in_half(ids[1:])) / max(1, len(ids) - 1) for ids in rollouts.completion_ids]


class EvenFirstToken(RewardCallback):
    """Perception: 1 when the completion's first token id is even (the choice token of a row with no observation)."""

    name, process = "perception/even_first", "perception"

    def score(self, rollouts):
        return [float(bool(ids) and ids[0] % 2 == 0) for ids in rollouts.completion_ids]


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.rewards: list[dict[str, float]] = []

    def on_rollouts_scored(self, trainer, pl_module, rollouts):
        self.rewards.append({k: sum(v) / len(v) for k, v in rollouts.rewards.items()})


def _learning_curve(synthetic_root, mode: str, sabotage=None, monkeypatch=None) -> list[dict[str, float]]:
    if sabotage is not None:
        monkeypatch.setattr(pagrpo, "token_advantages", SABOTAGE[sabotage])
    torch.manual_seed(0)
    module = PAGRPOModule(_tiny(seed=1), rollout=RolloutSettings(group_size=8, max_completion_length=6, engine="eager"),
                          loss=LossSettings(mode=mode, beta=0.0, aggregation="process_mean"), lr=3e-2, schedule="constant",
                          warmup_ratio=0.0)
    sample = train_sample(synthetic_root)
    loader = torch.utils.data.DataLoader([[sample] * 4] * STEPS, batch_size=None, collate_fn=lambda b: b)
    recorder = Recorder()
    L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[EvenTokenShare(), EvenFirstToken(), recorder]).fit(module, train_dataloaders=loader)
    return recorder.rewards


def _rise(curve: list[dict[str, float]], name: str) -> float:
    k = 5
    return sum(r[name] for r in curve[-k:]) / k - sum(r[name] for r in curve[:k]) / k


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grpo", "pa_grpo"])
def test_rl_raises_a_learnable_reward(synthetic_root, mode):
    curve = _learning_curve(synthetic_root, mode)
    assert _rise(curve, "reasoning/even_share") > MARGIN, curve
    assert _rise(curve, "perception/even_first") > MARGIN, curve


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", sorted(SABOTAGE))
def test_pa_grpo_learning_fails_with_a_swapped_sign_or_mask(synthetic_root, monkeypatch, sabotage):
    curve = _learning_curve(synthetic_root, "pa_grpo", sabotage, monkeypatch)
    # A flipped sign unlearns both rewards; swapped masks give each segment the other process's
    # advantage, which does not depend on its tokens: neither reward rises by the margin.
    assert _rise(curve, "perception/even_first") <= MARGIN, curve
    assert _rise(curve, "reasoning/even_share") <= MARGIN, curve
