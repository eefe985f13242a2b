"""Reward callbacks for tests: they vary inside every group even for an untrained model, so that
advantages and gradients are not zero (the real rewards give a tiny random model all-equal scores).

Importable as ``varied_rewards`` in-process (pytest puts tests/ on sys.path for conftest.py) and in
the subprocesses the tests start with tests/ on PYTHONPATH; a YAML or a flag names them as
``varied_rewards.TokenSumReward``.
"""

from __future__ import annotations

from callbacks.reward_callbacks import RewardCallback


class TokenSumReward(RewardCallback):
    """Reasoning reward: the sum of a completion's token ids modulo 5."""

    name, process = "reasoning/token_sum", "reasoning"

    def score(self, rollouts):
        return [float(sum(ids) % 5) for ids in rollouts.completion_ids]


class TokenParityReward(RewardCallback):
    """Perception reward: the parity of the sum of a completion's token ids."""

    name, process = "perception/token_parity", "perception"

    def score(self, rollouts):
        return [float(sum(ids) % 2) for ids in rollouts.completion_ids]
