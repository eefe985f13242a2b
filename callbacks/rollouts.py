"""The contract between an RL module and the reward callbacks: one batch of grouped rollouts.

The module (the producer) fills everything but ``rewards``; reward callbacks fill ``rewards`` and
``reward_process``; the module then sums per process (PA-GRPO) or over everything (plain GRPO)
without knowing any reward by name.

A reward value of NaN means "drop this sample's group from the update": the perception judge
writes it under its ``drop_group`` failure policy when it could not judge a sample. NaN
propagates through :meth:`Rollouts.process_totals` and :meth:`Rollouts.total`, and
:meth:`Rollouts.dropped_prompts` tells which groups hold one; the consumer must leave those
groups out of the advantages and the loss (never normalise a group that holds a NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from callbacks.segments import split_segments

PROCESSES = ("perception", "reasoning")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


@dataclass
class Rollouts:
    """B prompts x G sampled completions, grouped contiguously: sample ``i`` answers prompt ``i // G``.

    Per prompt (``prompts``, length B) a dict with ``id``, ``question`` (with the options as shown
    to the model), ``options`` (list of str, empty unless multiple choice), ``answer`` (ground-truth
    answer text, e.g. "B"), ``problem_type`` (one of :data:`PROBLEM_TYPES`) and ``facts`` (dict or
    None; ``facts["evidence"]`` is a list of groups of phrases for the rule-based judge). An optional
    ``solution`` (the record's ``solution`` field as stored, ``<answer>B</answer>``) is what the
    reasoning accuracy reads, as Video-R1 does, when present. An optional ``data_type`` ("video" or
    "image") lets the temporal bonus skip images.

    Per sample (length B*G): ``completions`` (decoded WITHOUT special tokens),
    ``completion_ids`` (generated ids incl. EOS when generated, no padding), ``truncated`` (hit
    the length limit without EOS), ``perception_token_lengths`` / ``reasoning_token_lengths``
    (token counts of each segment, filled by the producer; the length rewards need them).
    The per-sample fields other than ``completions`` may be left ``None`` when no reward needs them.

    ``shuffled_completions`` (T-GRPO's contrast, filled when a reward asks for it) holds
    ``shuffled_group_size`` completions per prompt (default: ``group_size``; Video-R1 samples
    G // 2) sampled on the prompt's frames in a random order, grouped contiguously like
    ``completions``; entries of image prompts may be empty strings.
    """

    group_size: int
    prompts: list[dict[str, Any]]
    completions: list[str]
    completion_ids: list[list[int]] | None = None
    truncated: list[bool] | None = None
    perception_token_lengths: list[int] | None = None
    reasoning_token_lengths: list[int] | None = None
    shuffled_completions: list[str] | None = None
    shuffled_group_size: int | None = None
    rewards: dict[str, list[float]] = field(default_factory=dict)
    reward_process: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"Rollouts: group_size must be >= 1, got {self.group_size}")
        n = len(self.prompts) * self.group_size
        per_sample = {
            "completions": self.completions,
            "completion_ids": self.completion_ids,
            "truncated": self.truncated,
            "perception_token_lengths": self.perception_token_lengths,
            "reasoning_token_lengths": self.reasoning_token_lengths,
        }
        for name, values in per_sample.items():
            if values is not None and len(values) != n:
                raise ValueError(
                    f"Rollouts: {name} has {len(values)} entries, expected B*G = "
                    f"{len(self.prompts)}*{self.group_size} = {n}"
                )
        k = self.shuffled_samples
        if k < 1:
            raise ValueError(f"Rollouts: shuffled_group_size must be >= 1, got {k}")
        if self.shuffled_completions is not None and len(self.shuffled_completions) != len(self.prompts) * k:
            raise ValueError(
                f"Rollouts: shuffled_completions has {len(self.shuffled_completions)} entries, expected "
                f"B*shuffled_group_size = {len(self.prompts)}*{k} = {len(self.prompts) * k}"
            )
        for name, values in self.rewards.items():
            self._check_reward(name, values, self.reward_process.get(name))

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def shuffled_samples(self) -> int:
        """Completions per prompt in ``shuffled_completions``."""
        return self.group_size if self.shuffled_group_size is None else self.shuffled_group_size

    def prompt_of(self, i: int) -> dict[str, Any]:
        """The metadata of the prompt that sample ``i`` answers."""
        return self.prompts[i // self.group_size]

    def observation(self, i: int) -> str:
        """Inner text of sample ``i``'s perception segment (empty when it has none)."""
        return split_segments(self.completions[i]).observation

    def set_reward(self, name: str, values: list[float], process: str) -> None:
        """Store one reward's per-sample values and the process it feeds."""
        values = [float(v) for v in values]
        self._check_reward(name, values, process)
        self.rewards[name] = values
        self.reward_process[name] = process

    def process_totals(self) -> dict[str, list[float]]:
        """Per process, the per-sample sum of its rewards (NaN when any term is NaN)."""
        totals = {p: [0.0] * len(self) for p in PROCESSES}
        for name, values in self.rewards.items():
            target = totals[self.reward_process[name]]
            for i, value in enumerate(values):
                target[i] += value
        return totals

    def total(self) -> list[float]:
        """Per sample, the sum of every reward: plain GRPO's single reward."""
        totals = self.process_totals()
        return [p + r for p, r in zip(totals["perception"], totals["reasoning"])]

    def dropped_prompts(self) -> list[bool]:
        """Per prompt, ``True`` when any reward of any of its samples is NaN (drop the group)."""
        dropped = [False] * self.num_prompts
        for values in self.rewards.values():
            for i, value in enumerate(values):
                if math.isnan(value):
                    dropped[i // self.group_size] = True
        return dropped

    def _check_reward(self, name: str, values: list[float], process: str | None) -> None:
        if process not in PROCESSES:
            raise ValueError(f"Rollouts: reward {name!r} feeds process {process!r}, expected one of {PROCESSES}")
        if len(values) != len(self):
            raise ValueError(f"Rollouts: reward {name!r} has {len(values)} values for {len(self)} samples")
