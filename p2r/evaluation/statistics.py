"""Means, standard errors and paired differences for experiments over seeds and held-out clips.

The RL comparison (tools/compare_rl.py) scores every method and seed on the same held-out clips,
so differences are paired per clip. Two standard errors are reported, because they measure
different noise:

- over clips (``paired_difference``): the per-clip difference, averaged over seeds first, then its
  mean and the standard error of that mean over clips. It says how sure we are of the difference
  on clips like these, for these trained models; it cannot see how much another training seed
  would move the models.
- over seeds (``seed_difference``): the per-seed accuracy difference, its mean and standard error
  over seeds (for two methods: Welch's, the seeds of two methods are not paired). It sees the
  training noise, but with 3 seeds it is itself a rough estimate.

Standard errors use the sample standard deviation (n - 1); with one value they are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Estimate(NamedTuple):
    """A mean, its standard error and how many values it rests on."""

    mean: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.4f} +- {self.se:.4f}"


def mean_se(values: Sequence[float]) -> Estimate:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)``.

    >>> mean_se([1.0, 2.0, 3.0])
    Estimate(mean=2.0, se=0.5773502691896257, n=3)
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def seed_mean(per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Per clip, the mean over seeds of ``per_seed[s][c]`` (every seed scores the same clips in the same order)."""
    if len({len(clips) for clips in per_seed}) != 1:
        raise ValueError(f"every seed must score the same clips, got {[len(c) for c in per_seed]} clips")
    return [sum(values) / len(values) for values in zip(*per_seed)]


def paired_difference(a_per_seed: Sequence[Sequence[float]], b_per_seed: Sequence[Sequence[float]]) -> Estimate:
    """Mean over clips of (a - b), each side averaged over its seeds first; SE over clips.

    ``a_per_seed[s][c]``: score of clip c under seed s of method a (one seed for a fixed start such
    as the SFT model). Both sides must list the same clips in the same order.

    >>> paired_difference([[1, 0, 1, 1]], [[0, 0, 1, 0]])
    Estimate(mean=0.5, se=0.28867513459481287, n=4)
    """
    a, b = seed_mean(a_per_seed), seed_mean(b_per_seed)
    if len(a) != len(b):
        raise ValueError(f"the two sides score different numbers of clips: {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b)])


def seed_difference(a_seeds: Sequence[float], b_seeds: Sequence[float]) -> Estimate:
    """Difference of the mean per-seed accuracies, with Welch's standard error
    ``sqrt(se_a^2 + se_b^2)`` (a side with one value, e.g. a fixed start, contributes 0).

    >>> seed_difference([0.6, 0.7, 0.8], [0.5])
    Estimate(mean=0.20000000000000007, se=0.05773502691896258, n=3)
    """
    a, b = mean_se(a_seeds), mean_se(b_seeds)
    variance = sum(0.0 if e.n == 1 else e.se**2 for e in (a, b))
    return Estimate(a.mean - b.mean, math.sqrt(variance), min(a.n, b.n) if b.n > 1 else a.n)


def pass_at(samples: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """From per-clip sampled scores ``samples[c][j]`` (G samples each): pass@1 (the mean score),
    pass@G (the share of clips with at least one sample scoring 1) and the share of clips whose G
    samples all score the same (a group with no signal for a group-relative advantage).

    >>> pass_at([[1, 0], [0, 0], [1, 1]])
    (0.5, 0.6666666666666666, 0.6666666666666666)
    """
    if not samples:
        raise ValueError("pass_at needs at least one clip")
    n = len(samples)
    pass_1 = sum(sum(s) / len(s) for s in samples) / n
    pass_g = sum(max(s) >= 1.0 for s in samples) / n
    all_equal = sum(max(s) == min(s) for s in samples) / n
    return pass_1, pass_g, all_equal
