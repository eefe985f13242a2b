"""Typed settings of the RL modules, checked when they are made (before any model is built).

``RolloutSettings`` (how completions are sampled) and ``LossSettings`` (how rewards become
advantages and advantages a loss) are the ``rollout`` and ``loss`` arguments of
:class:`p2r.algorithms.pagrpo.PAGRPOModule`; in YAML they are ``model.init_args.rollout.*`` and
``model.init_args.loss.*``, and ``python -m p2r fit --help`` lists every field with its docstring
(jsonargparse reads them). A value that cannot work raises a ``ValueError`` naming the key and its
allowed range (:class:`SettingError`) when the config is instantiated, so a bad run fails in seconds instead of after the
7B model is loaded (or, for ``group_size: 1``, never: every advantage would be 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from p2r.algorithms.policy_loss import AGGREGATION_MODES, AggregationMode
from p2r.backbones.decoding import DecodeEngine

LossMode = Literal["pa_grpo", "grpo", "sum_of_advantages"]
KEY_PREFIX = "model.init_args."


class SettingError(ValueError):
    """A setting that cannot work; the message names its config key and the allowed range."""


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise :class:`SettingError` naming ``model.init_args.<key>``, the value and the allowed range unless ``ok``."""
    if not ok:
        raise SettingError(f"{KEY_PREFIX}{key} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class RolloutSettings:
    """How the G completions of each prompt are sampled."""

    group_size: int = 8
    """Completions sampled per prompt (G; paper 8); at least 2, since advantages compare a group's samples."""
    max_completion_length: int = 768
    """Most tokens generated per completion (paper 768)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (paper 1.0); log-probs divide the logits by it, as TRL does."""
    top_p: float = 0.95
    """Nucleus mass of rollouts (paper 0.95, Video-R1's)."""
    shuffled_group_size: int | None = None
    """Completions per video prompt sampled on temporally shuffled frames, only when a reward asks for them
    (T-GRPO's TemporalBonusReward); None: group_size // 2, as Video-R1."""
    seed: int = 0
    """Seed of rollout sampling (offset by the step and by each prompt's index in the global batch)."""
    engine: DecodeEngine = "compiled"
    """Decode steps: "compiled" (static KV cache, torch.compile'd step, CUDA graphs on a GPU; falls back to
    "eager", with the reason logged, where the model cannot) or "eager" (dynamic cache, no compile time);
    p2r.backbones.decoding."""

    def __post_init__(self) -> None:
        require("rollout.group_size", self.group_size, self.group_size >= 2,
                ">= 2 (with one completion per prompt every group-relative advantage is 0 and nothing trains)")
        require("rollout.max_completion_length", self.max_completion_length, self.max_completion_length >= 1, ">= 1")
        require("rollout.temperature", self.temperature, self.temperature > 0,
                "> 0 (greedy rollouts give G identical completions, so every advantage would be 0)")
        require("rollout.top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        if self.shuffled_group_size is not None:
            require("rollout.shuffled_group_size", self.shuffled_group_size, self.shuffled_group_size >= 1, ">= 1 or null")

    @property
    def shuffled_samples(self) -> int:
        """Completions per prompt on shuffled frames (at least 1)."""
        return self.shuffled_group_size if self.shuffled_group_size is not None else max(1, self.group_size // 2)


@dataclass(frozen=True)
class LossSettings:
    """How rewards become advantages and advantages the policy loss."""

    mode: LossMode = "pa_grpo"
    """How rewards become advantages: "pa_grpo" (VideoP2R): per-process rewards and advantages, A_P on perception
    tokens and A_R on reasoning tokens; "grpo": every reward summed, one advantage on every token (plain GRPO,
    T-GRPO, and the paper's "without separate assignment" when both processes' rewards are configured);
    "sum_of_advantages": each process normalised in its group, A_P + A_R on every token (the other reading of
    "without separate assignment")."""
    aggregation: AggregationMode = "process_mean"
    """Token-to-scalar reduction: "process_mean" (per group, the mean over its perception tokens plus the mean over
    its reasoning tokens, then over groups: the paper's "averaged per process segment and group"),
    "sequence_mean" (per sample, then over samples: GRPO as in TRL's loss_type grpo and Video-R1),
    "token_mean" (DAPO), "constant" (Dr. GRPO)."""
    beta: float = 0.04
    """Weight of the k3 KL to the reference (the SFT model); 0 skips the reference pass."""
    kl_log_ratio_clip: float | None = None
    """Clamp log(pi_ref / pi) to [-c, c] before the k3 KL (Video-R1 uses 10); None: no clamp."""
    epsilon: float = 0.2
    """Clip range below (and above, unless epsilon_high) the ratio 1."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None: same as epsilon."""
    scale_rewards: bool = True
    """Divide by the group std (False: Dr. GRPO's mean-centering only)."""
    advantage_eps: float = 1e-4
    """Added to the group std (TRL and Video-R1: 1e-4)."""
    mask_truncated: bool = False
    """Leave completions that hit max_completion_length out of the loss."""

    def __post_init__(self) -> None:
        require("loss.mode", self.mode, self.mode in get_args(LossMode), f"one of {get_args(LossMode)}")
        require("loss.aggregation", self.aggregation, self.aggregation in AGGREGATION_MODES, f"one of {AGGREGATION_MODES}")
        require("loss.beta", self.beta, self.beta >= 0, ">= 0")
        if self.kl_log_ratio_clip is not None:
            require("loss.kl_log_ratio_clip", self.kl_log_ratio_clip, self.kl_log_ratio_clip > 0, "> 0 or null")
        require("loss.epsilon", self.epsilon, 0 < self.epsilon < 1, "in (0, 1) (the ratio is clipped to [1 - epsilon, ...])")
        if self.epsilon_high is not None:
            require("loss.epsilon_high", self.epsilon_high, self.epsilon_high > 0, "> 0 or null")
        require("loss.advantage_eps", self.advantage_eps, self.advantage_eps >= 0, ">= 0")
