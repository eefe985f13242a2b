"""Hand-worked checks of the PA-GRPO policy loss (p2r.algorithms.policy_loss)."""

import math

import pytest
import torch
from torch.testing import assert_close

from p2r.algorithms.advantages import group_advantages, process_advantages, token_advantages
from p2r.algorithms.policy_loss import aggregate, clipped_surrogate, k3_kl, pagrpo_loss

LN2 = math.log(2)


def _logs(values):
    return torch.tensor(values, dtype=torch.float64).log()


def test_k3_values_and_gradient():
    # t0: p = 1, p_ref = 0.5: d = ref - logp = -ln 2, k3 = 0.5 + ln 2 - 1 = 0.19315
    # t1: p = 0.5, p_ref = 1: d = ln 2, k3 = 2 - ln 2 - 1 = 0.30685
    # t2: p = p_ref: k3 = 0.
    # d k3 / d logp = -exp(d) + 1: t0 1 - 0.5 = 0.5, t1 1 - 2 = -1, t2 0.
    logp = _logs([[1.0, 0.5, 0.25]]).requires_grad_()
    ref = _logs([[0.5, 1.0, 0.25]])
    kl = k3_kl(logp, ref)
    assert_close(kl, torch.tensor([[0.5 + LN2 - 1, 2 - LN2 - 1, 0.0]], dtype=torch.float64))
    kl.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64))


def test_clipping_on_both_sides_with_both_signs():
    # eps = 0.2, clip range [0.8, 1.2]; loss = -min(rho*A, clip(rho)*A).
    # A = +1: rho 1.5 -> -min(1.5, 1.2) = -1.2 clipped; rho 0.5 -> -min(0.5, 0.8) = -0.5 not
    #         clipped (a positive advantage is never clipped from below); rho 1.1 -> -1.1.
    # A = -1: rho 1.5 -> -min(-1.5, -1.2) = 1.5 not clipped; rho 0.5 -> -min(-0.5, -0.8) = 0.8
    #         clipped; rho 0.9 -> 0.9.
    # gradient d loss / d logp = -rho*A where not clipped, 0 where clipped:
    # [0, -0.5, -1.1, 1.5, 0, 0.9].
    old = _logs([[0.5] * 6])
    rho = torch.tensor([[1.5, 0.5, 1.1, 1.5, 0.5, 0.9]], dtype=torch.float64)
    logp = (old + rho.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2)
    assert_close(loss, torch.tensor([[-1.2, -0.5, -1.1, 1.5, 0.8, 0.9]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, False, False, True, False]]
    loss.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.0, -0.5, -1.1, 1.5, 0.0, 0.9]], dtype=torch.float64))


def test_asymmetric_clip_higher():
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28].
    # A = +1, rho 1.25 -> -1.25 not clipped (the symmetric 0.2 clip would give -1.2, clipped);
    # A = +1, rho 1.5 -> -1.28 clipped; A = -1, rho 0.75 -> -min(-0.75, -0.8) = 0.8 clipped;
    # A = -1, rho 0.85 -> 0.85 not clipped.
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[1.25, 1.5, 0.75, 0.85]], dtype=torch.float64).log()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8, 0.85]], dtype=torch.float64))
    assert clipped.tolist() == [[False, True, True, False]]
    symmetric, _ = clipped_surrogate(logp, old, adv, eps_low=0.2)
    assert symmetric[0, 0].item() == pytest.approx(-1.2)


# The 2x4 aggregation example: row 0 has tokens 1 2 3 (4 is padding), perception = token 1,
# reasoning = tokens 2 3; row 1 has tokens 5 6, both perception (no reasoning segment).
VALUES = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
PERCEPTION = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "length", "expected", "weights"),
    [
        # (1 + 2 + 3 + 5 + 6) / 5 = 17 / 5 = 3.4; every token weighs 1/5.
        ("token_mean", None, 3.4, [[1 / 5] * 3 + [0], [1 / 5] * 2 + [0, 0]]),
        # row means 6/3 = 2 and 11/2 = 5.5, mean 3.75; weights 1/(2*3) and 1/(2*2).
        ("sequence_mean", None, 3.75, [[1 / 6] * 3 + [0], [1 / 4] * 2 + [0, 0]]),
        # 17 / (2 rows * L): L = T = 4 -> 2.125; L = 8 -> 1.0625.
        ("constant", None, 2.125, [[1 / 8] * 3 + [0], [1 / 8] * 2 + [0, 0]]),
        ("constant", 8, 1.0625, [[1 / 16] * 3 + [0], [1 / 16] * 2 + [0, 0]]),
        # process_mean, both rows one group (G = 2): perception tokens 1, 5, 6 -> mean 4; reasoning
        # tokens 2, 3 -> mean 2.5; sum 6.5 over one group. Every perception token weighs 1/3 and
        # every reasoning token 1/2, whichever row it is in.
        ("process_mean", 2, 6.5, [[1 / 3, 1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 0, 0]]),
        # process_mean, one row per group (G = 1): group 0 P 1 + R 2.5 = 3.5; group 1 P 5.5 (no
        # reasoning token adds 0); mean over 2 groups 4.5. Weights: row 0 P 1/2, R 1/4 each;
        # row 1 P 1/4 each.
        ("process_mean", 1, 4.5, [[1 / 2, 1 / 4, 1 / 4, 0], [1 / 4, 1 / 4, 0, 0]]),
    ],
)
def test_aggregation_modes(mode, length, expected, weights):
    values = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    group = {"group_size": length} if mode == "process_mean" else {"max_completion_length": length}
    out = aggregate(values, MASK, mode, perception_mask=PERCEPTION, **group)
    assert out.item() == pytest.approx(expected)
    out.backward()
    assert_close(values.grad, torch.tensor(weights, dtype=torch.float64))


@pytest.mark.parametrize(
    ("mode", "expected"),
    # row 1 zeroed (a dropped group): token_mean 6/3 = 2, sequence_mean 2 (the empty row is not
    # counted as a zero), constant 6 / (2 * 4) = 0.75 (the divisor keeps both rows),
    # process_mean with G = 1: group 0 only, 1 + 2.5 = 3.5 (the empty group is not a zero).
    [("token_mean", 2.0), ("sequence_mean", 2.0), ("constant", 0.75), ("process_mean", 3.5)],
)
def test_aggregation_skips_dropped_rows(mode, expected):
    mask = MASK.clone()
    mask[1] = False
    out = aggregate(torch.tensor(VALUES), mask, mode, perception_mask=PERCEPTION, group_size=1)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant", "process_mean"])
def test_aggregation_of_empty_mask_is_zero_with_zero_grad(mode):
    values = torch.tensor(VALUES, requires_grad=True)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    out = aggregate(values, empty, mode, perception_mask=empty, group_size=2)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 4))


def test_aggregation_rejects_bad_arguments():
    values = torch.tensor(VALUES)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(values, MASK, "sum")
    with pytest.raises(ValueError, match="perception_mask"):
        aggregate(values, MASK, "process_mean", group_size=2)
    with pytest.raises(ValueError, match="whole groups"):
        aggregate(values, MASK, "process_mean", perception_mask=PERCEPTION, group_size=3)
    with pytest.raises(ValueError, match="share one"):
        aggregate(values, MASK[:, :3], "token_mean")


def _worked_example():
    # 2x4, same masks as the aggregation example. Advantages: row 0 A_P = 0.5 on token 0,
    # A_R = -1 on tokens 1 2; row 1 A_P = 2 on tokens 0 1. p = 0.5 everywhere; the reference
    # gives row 0 p_ref = 1 (= 2p) and row 1 p_ref = 0.25 (= p/2).
    logp = _logs([[0.5] * 4] * 2).requires_grad_()
    ref = _logs([[1.0] * 4, [0.25] * 4])
    adv = torch.tensor([[0.5, -1.0, -1.0, 0.0], [2.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    return logp, ref, adv


def test_pagrpo_loss_single_update_worked_value_and_gradient():
    # One update per rollout batch: old = logp.detach(), rho = 1, surrogate = -A per token.
    # k3: row 0 d = ln 2, k3 = 2 - ln 2 - 1 = 0.30685; row 1 d = -ln 2, k3 = 0.5 + ln 2 - 1
    # = 0.19315. beta = 0.1. Both rows are one group (G = 2).
    # process_mean: perception tokens (row 0 t0, row 1 t0 t1) mean
    #   ((-0.5 + 0.1 (1 - ln 2)) + 2 (-2 + 0.1 (ln 2 - 0.5))) / 3,
    # plus reasoning tokens (row 0 t1 t2) mean 1 + 0.1 (1 - ln 2).
    # gradient per token = weight * (-A * rho + beta * (1 - p_ref / p)), weights 1/3 (perception)
    # and 1/2 (reasoning): row 0: (-0.5 - 0.1)/3 = -0.2, (1 - 0.1)/2 = 0.45 twice;
    # row 1: (-2 + 0.05)/3 = -0.65.
    # kl metric = token mean of k3 = (3 * 0.30685 + 2 * 0.19315)/5 = (2 - ln 2)/5 = 0.26137.
    logp, ref, adv = _worked_example()
    loss, metrics = pagrpo_loss(
        logp, logp.detach(), ref, adv, MASK,
        beta=0.1, eps_low=0.2, mode="process_mean", perception_mask=PERCEPTION, group_size=2,
    )
    expected_loss = ((-0.5 + 0.1 * (1 - LN2)) + 2 * (-2 + 0.1 * (LN2 - 0.5))) / 3 + 1 + 0.1 * (1 - LN2)
    assert loss.item() == pytest.approx(expected_loss)
    loss.backward()
    expected = [[-0.2, 0.45, 0.45, 0.0], [-0.65, -0.65, 0.0, 0.0]]
    assert_close(logp.grad, torch.tensor(expected, dtype=torch.float64))
    assert metrics["kl"].item() == pytest.approx((2 - LN2) / 5)
    assert metrics["surrogate"].item() == pytest.approx((-0.5 - 4) / 3 + 1)
    assert metrics["entropy"].item() == pytest.approx(math.log(2))  # -log 0.5 on every token
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert all(not m.requires_grad for m in metrics.values())


def test_process_mean_gives_a_lone_end_token_one_tokens_weight():
    # Issue 21's worked case: row 0 = 4 perception tokens + 4 reasoning tokens, row 1 = 4
    # perception tokens + its end token only (reasoning = 1 token). A per-row segment mean gave
    # row 1's end token half the row (1/2 * 1/2 = 1/4: 8x a perception token's 1/32). Under
    # process_mean (one group of 2) every reasoning token weighs 1/5 and every perception token
    # 1/8, whichever row it is in.
    values = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    perception = torch.tensor([[1] * 4 + [0] * 4, [1] * 4 + [0] * 4], dtype=torch.bool)
    aggregate(values, mask, "process_mean", perception_mask=perception, group_size=2).backward()
    expected = [[1 / 8] * 4 + [1 / 5] * 4, [1 / 8] * 4 + [1 / 5] + [0] * 3]
    assert_close(values.grad, torch.tensor(expected, dtype=torch.float64))


def test_process_mean_keeps_the_whole_reasoning_signal_when_perception_is_silent():
    # A saturated judge: A_P = 0 on every perception token, A_R = +-1 on reasoning tokens. The
    # reasoning tokens' gradient under process_mean equals GRPO's token-mean over the reasoning
    # tokens alone (weight 1/3 each), not half of it as when the two segment means were averaged.
    logp = torch.full((2, 4), math.log(0.5), dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    perception = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    loss, _ = pagrpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, eps_low=0.2,
                          mode="process_mean", perception_mask=perception, group_size=2)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, -1 / 3, -1 / 3, 0.0], [0.0, 1 / 3, 0.0, 0.0]], dtype=torch.float64))


def test_pagrpo_loss_detaches_old_logp_and_skips_kl():
    # old = logp without detach must still give d/dlogp = -A * weight; with beta = 0 (or no
    # reference) the KL is skipped. token_mean over 5 tokens: loss = -(0.5 - 2 + 4)/5 = -0.5,
    # gradient -A/5 = [-0.1, 0.2, 0.2, 0], [-0.4, -0.4, 0, 0].
    expected = torch.tensor([[-0.1, 0.2, 0.2, 0.0], [-0.4, -0.4, 0.0, 0.0]], dtype=torch.float64)
    for beta, use_ref in [(0.0, True), (0.1, False)]:
        logp, ref, adv = _worked_example()
        loss, metrics = pagrpo_loss(
            logp, logp, ref if use_ref else None, adv, MASK,
            beta=beta, eps_low=0.2, mode="token_mean",
        )
        assert loss.item() == pytest.approx(-0.5)
        loss.backward()
        assert_close(logp.grad, expected)
        assert metrics["kl"].item() == 0.0


def test_pagrpo_loss_clip_metrics():
    # rho [1.5, 0.5, 1.5, 0.5], A [1, 1, -1, -1], eps 0.2: per token [-1.2, -0.5, 1.5, 0.8]
    # (first clipped high, last clipped low), token_mean = 0.6 / 4 = 0.15;
    # gradient [0, -0.5, 1.5, 0] / 4; clip fraction 2/4, low 1/4, high 1/4; ratio mean 1.0.
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64).log().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = pagrpo_loss(logp, old, None, adv, mask, beta=0.0, eps_low=0.2,
                                mode="token_mean")
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0]], dtype=torch.float64))
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["clip_fraction_low"].item() == pytest.approx(0.25)
    assert metrics["clip_fraction_high"].item() == pytest.approx(0.25)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)


def test_pagrpo_loss_ignores_garbage_on_padding_and_dropped_rows():
    # -inf / +inf log-probs on padding would make exp() overflow and 0 * inf = NaN if the mask
    # were multiplied in; the result must equal the clean worked example (-0.85).
    logp, ref, adv = _worked_example()
    dirty = logp.detach().clone()
    dirty[~MASK] = -math.inf
    dirty.requires_grad_()
    ref_dirty = ref.clone()
    ref_dirty[~MASK] = math.inf
    adv_dirty = adv.clone()
    adv_dirty[~MASK] = 1e6
    loss, metrics = pagrpo_loss(
        dirty, dirty.detach(), ref_dirty, adv_dirty, MASK,
        beta=0.1, eps_low=0.2, mode="process_mean", perception_mask=PERCEPTION, group_size=2,
    )
    assert loss.item() == pytest.approx(((-0.5 + 0.1 * (1 - LN2)) + 2 * (-2 + 0.1 * (LN2 - 0.5))) / 3 + 1 + 0.1 * (1 - LN2))
    loss.backward()
    assert torch.isfinite(dirty.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())

    # everything dropped: loss 0, gradient 0, no NaN.
    logp, ref, adv = _worked_example()
    loss, metrics = pagrpo_loss(
        logp, logp.detach(), ref, adv, torch.zeros(2, 4, dtype=torch.bool),
        beta=0.1, eps_low=0.2, mode="process_mean", perception_mask=PERCEPTION, group_size=2,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 4, dtype=torch.float64))
    assert all(m.item() == 0.0 for m in metrics.values())


def test_pagrpo_loss_rejects_mismatched_shapes():
    logp, ref, adv = _worked_example()
    with pytest.raises(ValueError, match="share one"):
        pagrpo_loss(logp, logp, ref[:, :3], adv, MASK, beta=0.1, eps_low=0.2, mode="token_mean")


def test_pa_grpo_gradient_differs_from_plain_grpo():
    # G = 4, 4 tokens each: tokens 0 1 perception, 2 3 reasoning. perception rewards [1, 1, 0, 0],
    # reasoning [0, 1, 0, 1]. PA-GRPO: A_P = [s, s, -s, -s], A_R = [-s, s, -s, s], s = 0.86603.
    # Plain GRPO: summed [1, 2, 0, 1] -> A = [0, g, -g, 0], g = 1/sqrt(2/3) = 1.22474.
    # token_mean over 16 tokens, rho = 1: both losses are -sum(A)/16 = 0, but the gradient
    # -A/16 differs: sample 0 gets [-s, -s, s, s]/16 under PA-GRPO (raise its perception,
    # lower its reasoning) and 0 under plain GRPO.
    perception = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)
    mask = torch.ones(4, 4, dtype=torch.bool)
    p_r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    r_r = torch.tensor([0.0, 1.0, 0.0, 1.0])
    pa = process_advantages({"perception": p_r, "reasoning": r_r}, group_size=4, eps=0.0)
    plain = group_advantages(p_r + r_r, group_size=4, eps=0.0)

    grads, losses = [], []
    for a_p, a_r in [(pa["perception"], pa["reasoning"]), (plain, plain)]:
        logp = torch.full((4, 4), math.log(0.5), requires_grad=True)
        adv = token_advantages(a_p, a_r, perception, mask)
        loss, _ = pagrpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, eps_low=0.2,
                              mode="token_mean")
        loss.backward()
        grads.append(logp.grad)
        losses.append(loss.item())

    s = math.sqrt(3) / 2
    g = 1 / math.sqrt(2 / 3)
    assert losses == pytest.approx([0.0, 0.0], abs=1e-6)
    assert_close(grads[0][0], torch.tensor([-s, -s, s, s]) / 16)
    assert_close(grads[0][3], torch.tensor([s, s, -s, -s]) / 16)
    assert_close(grads[1], torch.tensor([0.0, -g, g, 0.0]).unsqueeze(1).expand(4, 4) / 16)
