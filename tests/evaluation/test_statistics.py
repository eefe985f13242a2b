"""Hand-worked checks of the experiment statistics (p2r.evaluation.statistics)."""

import math

import pytest

from p2r.evaluation.statistics import mean_se, paired_difference, pass_at, seed_difference, seed_mean


def test_mean_se_uses_the_sample_std():
    # values 0, 1, 1, 0: mean 0.5, sample variance (4 * 0.25) / 3 = 1/3, se sqrt(1/3 / 4) = 0.288675.
    est = mean_se([0, 1, 1, 0])
    assert est.mean == 0.5 and est.n == 4
    assert est.se == pytest.approx(math.sqrt(1 / 12))
    assert math.isnan(mean_se([0.7]).se)
    with pytest.raises(ValueError):
        mean_se([])


def test_paired_difference_averages_seeds_per_clip_then_takes_the_se_over_clips():
    # Method a, 2 seeds x 4 clips; start b, one seed. Per-clip a means: 1, 0.5, 0, 1; minus b
    # (0, 0, 0, 1): 1, 0.5, 0, 0 -> mean 0.375, sample variance (0.390625 + 0.015625 + 0.140625
    # + 0.140625) / 3 = 0.229167, se sqrt(0.229167 / 4) = 0.239357.
    a = [[1, 1, 0, 1], [1, 0, 0, 1]]
    b = [[0, 0, 0, 1]]
    est = paired_difference(a, b)
    assert est.mean == pytest.approx(0.375)
    assert est.se == pytest.approx(math.sqrt(0.6875 / 3 / 4))
    assert seed_mean(a) == [1, 0.5, 0, 1]
    with pytest.raises(ValueError, match="same clips"):
        seed_mean([[1, 0], [1]])
    with pytest.raises(ValueError, match="different numbers of clips"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_seed_difference_is_welch_over_seeds():
    # a: 0.5, 0.6, 0.7 (mean 0.6, se 0.057735); b: 0.4, 0.5 (mean 0.45, se 0.05):
    # diff 0.15, se sqrt(0.057735^2 + 0.05^2) = 0.076376. A fixed start (one value) adds nothing.
    est = seed_difference([0.5, 0.6, 0.7], [0.4, 0.5])
    assert est.mean == pytest.approx(0.15)
    assert est.se == pytest.approx(math.sqrt(0.01 / 3 + 0.005 / 2))
    assert seed_difference([0.5, 0.6, 0.7], [0.4]).se == pytest.approx(math.sqrt(0.01 / 3))


def test_pass_at_g_and_groups_without_signal():
    # clips: [1,0,0,0] pass@1 .25, passes; [0,0,0,0] fails, all equal; [1,1,1,1] passes, all equal;
    # [0.5, 0, 0, 0] (partial credit) never scores 1: no pass.
    p1, pg, equal = pass_at([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0.5, 0, 0, 0]])
    assert p1 == pytest.approx((0.25 + 0 + 1 + 0.125) / 4)
    assert pg == 0.5 and equal == 0.5
