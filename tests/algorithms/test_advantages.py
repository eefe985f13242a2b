"""Hand-worked checks of the group-relative advantages (p2r.algorithms.advantages)."""

import math

import pytest
import torch
from torch.testing import assert_close

from p2r.algorithms.advantages import (
    group_advantages,
    group_dropped,
    process_advantages,
    token_advantages,
    with_choice_token,
)

NAN = float("nan")


def test_two_groups_of_two_use_unbiased_std():
    # groups [1, 0] and [1, 0]: mean 0.5, deviations +-0.5.
    # unbiased std = sqrt((0.25 + 0.25) / (2 - 1)) = sqrt(0.5) = 0.70711 -> A = +-0.5 / 0.70711
    # = +-0.70711 (population std 0.5 would give +-1).
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=2, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert_close(adv, torch.tensor([s, -s, s, -s]))


def test_one_group_of_four():
    # group [1, 0, 1, 0]: mean 0.5, squared deviations 4 * 0.25 = 1, unbiased var = 1 / 3,
    # std = 0.57735 -> A = +-0.5 / 0.57735 = +-sqrt(3) / 2 = +-0.86603.
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=4, eps=0.0)
    s = math.sqrt(3) / 2
    assert_close(adv, torch.tensor([s, -s, s, -s]))


def test_eps_is_added_to_the_std():
    # same group, eps = 1e-4: A = 0.5 / (0.57735 + 0.0001) = 0.5 / 0.57745 = 0.865875
    # (adding eps to the variance instead would give 0.5 / sqrt(1/3 + 1e-4) = 0.86590).
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=4)
    s = 0.8658754297607016
    assert_close(adv, torch.tensor([s, -s, s, -s]), rtol=0, atol=1e-6)


def test_unequal_rewards_in_one_group():
    # group [3, 1, 0, 0]: mean 1, deviations [2, 0, -1, -1], squares sum 6, var 6 / 3 = 2,
    # std sqrt(2) = 1.41421 -> A = [1.41421, 0, -0.70711, -0.70711].
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), group_size=4, eps=0.0)
    r2 = math.sqrt(2)
    assert_close(adv, torch.tensor([2 / r2, 0.0, -1 / r2, -1 / r2]))


def test_no_scale_is_dr_grpo_mean_centering():
    # group [3, 1, 0, 0]: mean 1 -> A = [2, 0, -1, -1], no division.
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), group_size=4, scale=False)
    assert_close(adv, torch.tensor([2.0, 0.0, -1.0, -1.0]))


@pytest.mark.parametrize("eps", [0.0, 1e-4])
@pytest.mark.parametrize("scale", [True, False])
def test_zero_variance_group_gives_exact_zero(eps, scale):
    # group 1 is eight 0.1s: the float32 mean is 0.1 - 7.45e-9, so r - mean = 7.45e-9 on every
    # sample; divided by (std ~ 8e-9) + eps that is ~0.9 with eps = 0 and ~7e-5 with eps = 1e-4.
    # The answer must be exactly 0 either way.
    # group 2 is [1, 0, 0, 0, 0, 0, 0, 0]: mean 1/8, deviations [7/8, -1/8 x 7],
    # squares 49/64 + 7/64 = 56/64 = 7/8, var (7/8) / 7 = 1/8, std 0.35355
    # -> A = (7/8) / 0.35355 = 2.47487 and -(1/8) / 0.35355 = -0.35355 (eps = 0).
    rewards = torch.tensor([0.1] * 8 + [1.0] + [0.0] * 7)
    adv = group_advantages(rewards, group_size=8, eps=eps, scale=scale)
    assert torch.equal(adv[:8], torch.zeros(8))
    if eps == 0.0 and scale:
        r = math.sqrt(1 / 8)
        assert_close(adv[8:], torch.tensor([(7 / 8) / r] + [-(1 / 8) / r] * 7))


def test_nan_reward_drops_its_whole_group_only():
    # group 1 [1, nan] is dropped -> [0, 0]; group 2 [1, 0] -> +-0.70711 as above.
    rewards = torch.tensor([1.0, NAN, 1.0, 0.0])
    adv = group_advantages(rewards, group_size=2, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert torch.equal(adv[:2], torch.zeros(2))
    assert_close(adv[2:], torch.tensor([s, -s]))
    assert torch.equal(group_dropped(rewards, 2), torch.tensor([True, True, False, False]))


def test_infinite_reward_also_drops_its_group():
    rewards = torch.tensor([float("inf"), 0.0, 0.0, 1.0])
    assert torch.equal(group_advantages(rewards, 2)[:2], torch.zeros(2))
    assert torch.equal(group_dropped(rewards, 2), torch.tensor([True, True, False, False]))


def test_group_size_one_gives_zero():
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=1, eps=0.0)
    assert torch.equal(adv, torch.zeros(2))


def test_integer_rewards_and_bad_layout():
    assert group_advantages(torch.tensor([1, 0]), group_size=2).dtype == torch.float32
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="1-D"):
        group_dropped(torch.zeros(2, 2), group_size=2)


def test_process_advantages_normalise_each_process_on_its_own():
    # G = 4. perception [1, 1, 0, 0]: mean 0.5, var 1/3 -> A_P = +-sqrt(3)/2 = +-0.86603
    # -> [s, s, -s, -s]. reasoning [0, 1, 0, 1] -> A_R = [-s, s, -s, s].
    rewards = {
        "perception": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "reasoning": torch.tensor([0.0, 1.0, 0.0, 1.0]),
    }
    adv = process_advantages(rewards, group_size=4, eps=0.0)
    s = math.sqrt(3) / 2
    assert set(adv) == {"perception", "reasoning"}
    assert_close(adv["perception"], torch.tensor([s, s, -s, -s]))
    assert_close(adv["reasoning"], torch.tensor([-s, s, -s, s]))


def test_process_advantages_nan_in_one_process_zeroes_only_that_process():
    # the judge failed on sample 1: perception group [1, nan] -> [0, 0]; reasoning [1, 0] keeps
    # +-0.70711; group_dropped over both processes drops the group from the loss.
    rewards = {"perception": torch.tensor([1.0, NAN]), "reasoning": torch.tensor([1.0, 0.0])}
    adv = process_advantages(rewards, group_size=2, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert torch.equal(adv["perception"], torch.zeros(2))
    assert_close(adv["reasoning"], torch.tensor([s, -s]))
    dropped = group_dropped(rewards["perception"], 2) | group_dropped(rewards["reasoning"], 2)
    assert torch.equal(dropped, torch.tensor([True, True]))


def test_process_advantages_reject_unequal_lengths():
    with pytest.raises(ValueError, match="one reward per sample"):
        process_advantages({"perception": torch.zeros(4), "reasoning": torch.zeros(2)}, 2)


def test_token_advantages_place_each_process_on_its_segment():
    # row 0: tokens P P R R pad; row 1: P R R pad pad, with a stray perception bit on padding
    # (column 4) that must stay 0. A_P = [1, 3], A_R = [-2, -4].
    perception = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    completion = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    adv = token_advantages(
        torch.tensor([1.0, 3.0]), torch.tensor([-2.0, -4.0]), perception, completion
    )
    expected = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.0], [3.0, -4.0, -4.0, 0.0, 0.0]])
    assert torch.equal(adv, expected)


def test_token_advantages_reject_wrong_shapes():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages must be"):
        token_advantages(torch.zeros(3), torch.zeros(2), mask, mask)
    with pytest.raises(ValueError, match="masks must share"):
        token_advantages(torch.zeros(2), torch.zeros(2), mask, mask[:, :2])


def test_plain_grpo_differs_from_pa_grpo():
    # G = 4, perception [1, 1, 0, 0], reasoning [0, 1, 0, 1].
    # PA-GRPO: A_P = [s, s, -s, -s], A_R = [-s, s, -s, s], s = sqrt(3)/2 = 0.86603.
    # plain GRPO: summed reward [1, 2, 0, 1], mean 1, deviations [0, 1, -1, 0], var 2/3,
    # std 0.81650 -> A = [0, 1.22474, -1.22474, 0] on every token.
    # Sample 0 (good observation, wrong answer): PA-GRPO pushes its perception tokens up (+s)
    # and its reasoning down (-s); plain GRPO leaves both at 0.
    perception_r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    reasoning_r = torch.tensor([0.0, 1.0, 0.0, 1.0])
    perception = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)
    completion = torch.ones(4, 4, dtype=torch.bool)

    pa = process_advantages(
        {"perception": perception_r, "reasoning": reasoning_r}, group_size=4, eps=0.0
    )
    pa_tokens = token_advantages(pa["perception"], pa["reasoning"], perception, completion)
    plain = group_advantages(perception_r + reasoning_r, group_size=4, eps=0.0)
    plain_tokens = token_advantages(plain, plain, perception, completion)

    s = math.sqrt(3) / 2
    g = 1 / math.sqrt(2 / 3)
    assert_close(pa_tokens[0], torch.tensor([s, s, -s, -s]))
    assert_close(pa_tokens[3], torch.tensor([-s, -s, s, s]))
    assert_close(plain_tokens, torch.tensor([0.0, g, -g, 0.0]).unsqueeze(1).expand(4, 4))


def test_a_row_without_an_observation_gets_its_perception_advantage_on_its_first_token():
    # Row 0: perception tokens 0-1, reasoning 2-3. Row 1: no observation, 3 tokens (then padding):
    # its first token stands for the choice not to observe. Row 2: padding only (a dropped row)
    # stays empty.
    perception = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    marked = with_choice_token(perception, completion)
    assert marked.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # A_P = -1.5 (no observation: judge 0, format 0) reaches row 1's first token, A_R the rest.
    adv = token_advantages(torch.tensor([0.5, -1.5, 0.0]), torch.tensor([0.2, 0.3, 0.0]), marked, completion)
    assert_close(adv, torch.tensor([[0.5, 0.5, 0.2, 0.2], [-1.5, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_choice_token_follows_left_padding_and_ignores_perception_on_padding():
    # A perception bit on padding does not count as an observation; the first real token is marked.
    perception = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    completion = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    assert with_choice_token(perception, completion).int().tolist() == [[0, 1, 0]]
