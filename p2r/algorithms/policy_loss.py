"""The PA-GRPO policy loss: PPO clipped surrogate per token, k3 KL to the reference, aggregation.

Per token t of response i, with rho = exp(logp - old_logp) and A the token's advantage (A_i,P on
perception tokens, A_i,R on reasoning tokens; see ``advantages.token_advantages``):

    loss_i,t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3_i,t
    k3_i,t   = exp(ref - logp) - (ref - logp) - 1

then aggregated over tokens by :func:`aggregate`. METHOD.md: the surrogate is "averaged per
process segment and group" and the KL is subtracted from the objective (added to the loss).

Where this departs from or reads into the paper:

- ``mode="process_mean"`` is our reading of the paper's objective, "averaged per process segment
  and group": for each group and each process, the mean over all the group's tokens of that
  process; the processes' means are summed (the objective is J_P + J_R) and the groups averaged.
  Worked consequences (tests/algorithms/test_policy_loss.py): every perception token of a group
  weighs the same, and every reasoning token too, whatever the length of the row it is in, so a
  completion whose reasoning is only its end token gives that token one reasoning token's weight
  (a per-row segment mean gave it half the row); a group whose perception advantages are all 0
  (a saturated judge) still puts its full reasoning weight on its reasoning tokens (averaging the
  two processes halved it against GRPO). The other modes are the usual alternatives:
  ``token_mean`` (DAPO), ``sequence_mean`` (original GRPO), ``constant`` (Dr. GRPO).
- The KL term is aggregated with the surrogate, in the same mode (TRL and Video-R1 add it per
  token before averaging, as here).
- ``eps_high`` may differ from ``eps_low`` (DAPO's clip-higher); the paper uses one eps.
- old and reference log-probs are detached: they are constants of the objective, so passing
  ``old_logp=logp`` without ``.detach()`` still gives the right gradient.
- Padding is removed with ``torch.where`` before any exp, so garbage (even -inf) log-probs on
  padding can give neither a NaN loss nor a NaN gradient. Rows of dropped groups are excluded
  the same way: pass a completion mask with those rows zeroed.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

# How per-token values become the loss (see :func:`aggregate`); the one list of names, read by
# LossSettings (config checks, --help) and tools/bench_step.py (--loss).
AggregationMode = Literal["process_mean", "token_mean", "sequence_mean", "constant"]
AGGREGATION_MODES: tuple[str, ...] = get_args(AggregationMode)


def k3_kl(logp: Tensor, ref_logp: Tensor, log_ratio_clip: float | None = None) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token, as in TRL and Video-R1.

    ``k3 = exp(x) - x - 1`` with ``x = ref_logp - logp``: unbiased for the KL when tokens are
    sampled from pi_theta, and never negative. ``log_ratio_clip`` c clamps x to [-c, c] first
    (Video-R1's trainer uses 10; the clamped tokens then get no KL gradient); None: no clamp.

    Args:
        logp: ``(N, T)`` log-probs of the sampled tokens under the policy.
        ref_logp: ``(N, T)`` log-probs of the same tokens under the reference model.
        log_ratio_clip: bound on ``|ref_logp - logp|``, or None.

    Returns:
        ``(N, T)`` per-token KL estimate.
    """
    log_ratio = ref_logp - logp  # (N, T)
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)  # (N, T)
    return torch.exp(log_ratio) - log_ratio - 1  # (N, T)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token, as a loss.

    ``loss = -min(rho*A, clip(rho, 1 - eps_low, 1 + eps_high)*A)`` with
    ``rho = exp(logp - old_logp)``, ``old_logp`` detached. ``eps_high`` defaults to ``eps_low``
    (the paper's symmetric clip).

    Args:
        logp: ``(N, T)`` log-probs under the current policy.
        old_logp: ``(N, T)`` log-probs under the policy that sampled the rollouts.
        advantages: ``(N, T)`` per-token advantages (``(N, 1)`` broadcasts).
        eps_low: lower clip range, rho >= 1 - eps_low.
        eps_high: upper clip range, rho <= 1 + eps_high.

    Returns:
        ``per_token_loss`` ``(N, T)`` and ``clipped`` ``(N, T)`` bool: True where the clip is
        active and the token gets no gradient (rho > 1 + eps_high with A > 0, or
        rho < 1 - eps_low with A < 0).
    """
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp.detach())  # (N, T)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # (N, T)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # (N, T)
    high = (ratio > 1 + eps_high) & (advantages > 0)  # (N, T)
    low = (ratio < 1 - eps_low) & (advantages < 0)  # (N, T)
    return per_token_loss, high | low  # (N, T), (N, T)


def _masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) where nothing is."""
    kept = torch.where(mask, values, torch.zeros_like(values))  # same shape as values
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1)  # ()
    return kept.sum(dim) / mask.sum(dim).clamp(min=1)  # values' shape without dim


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: AggregationMode,
    perception_mask: Tensor | None = None,
    max_completion_length: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(N, T)`` to a scalar over the tokens where ``mask`` is True.

    Modes (n_i = tokens of row i, n = all tokens, L = max_completion_length):

    - ``token_mean`` (DAPO): ``sum_i,t x / n``.
    - ``sequence_mean`` (original GRPO): ``mean_i (sum_t x_i,t / n_i)`` over rows with n_i > 0.
    - ``constant`` (Dr. GRPO): ``sum_i,t x / (N * L)``; N counts every row, dropped ones too, so
      the divisor stays constant; L defaults to T.
    - ``process_mean`` (our reading of the paper's "averaged per process segment and group"):
      per group of ``group_size`` consecutive rows, the mean over the group's perception tokens
      plus the mean over its reasoning tokens (masked tokens not in ``perception_mask``; an empty
      segment adds 0); then the mean over groups with any token. Needs ``perception_mask`` and
      ``group_size``; N must be whole groups.

    Every mode gives 0, not NaN, when ``mask`` is empty (and a zero gradient).

    Args:
        per_token: ``(N, T)`` per-token loss.
        mask: ``(N, T)`` True on tokens that count (completion tokens of kept groups).
        mode: one of ``AGGREGATION_MODES``.
        perception_mask: ``(N, T)`` True on perception tokens; ``process_mean`` only.
        max_completion_length: L for ``constant``.
        group_size: G, rows per group (consecutive); ``process_mean`` only.

    Returns:
        ``()`` the aggregated loss.
    """
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(
            f"per_token and mask must share one (N, T) shape, got {tuple(per_token.shape)} "
            f"and {tuple(mask.shape)}"
        )
    mask = mask.bool()  # (N, T)
    if mode == "token_mean":
        return _masked_mean(per_token, mask)  # ()
    if mode == "sequence_mean":
        row_means = _masked_mean(per_token, mask, dim=1)  # (N,)
        return _masked_mean(row_means, mask.any(dim=1))  # ()
    if mode == "constant":
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        if length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {length}")
        kept = torch.where(mask, per_token, torch.zeros_like(per_token))  # (N, T)
        return kept.sum() / (per_token.shape[0] * length)  # ()
    if mode == "process_mean":
        if perception_mask is None or perception_mask.shape != mask.shape:
            raise ValueError("process_mean needs a perception_mask of the same (N, T) shape")
        if group_size is None or group_size < 1 or per_token.shape[0] % group_size:
            raise ValueError(f"process_mean needs whole groups: {per_token.shape[0]} rows, group_size={group_size}")
        grouped = per_token.reshape(-1, group_size * per_token.shape[1])  # (B, G*T)
        perception = (mask & perception_mask.bool()).reshape(grouped.shape)  # (B, G*T)
        reasoning = (mask & ~perception_mask.bool()).reshape(grouped.shape)  # (B, G*T)
        group_sums = _masked_mean(grouped, perception, dim=1) + _masked_mean(grouped, reasoning, dim=1)  # (B,)
        return _masked_mean(group_sums, mask.reshape(grouped.shape).any(dim=1))  # ()
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}")


def pagrpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    beta: float,
    eps_low: float,
    eps_high: float | None = None,
    mode: AggregationMode,
    perception_mask: Tensor | None = None,
    max_completion_length: int | None = None,
    kl_log_ratio_clip: float | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PA-GRPO (or plain GRPO) loss: clipped surrogate + beta * k3 KL, aggregated.

    ``loss = aggregate(-min(rho*A, clip(rho)*A) + beta * k3, completion_mask, mode)``. With
    ``beta == 0`` or ``ref_logp is None`` the KL is skipped (and reported as 0). With one policy
    update per rollout batch, ``old_logp = logp.detach()``: rho is 1 but the gradient of a token's
    surrogate is ``-A * grad logp``.

    Rows of dropped groups (``advantages.group_dropped``) are excluded by passing a
    ``completion_mask`` with those rows zeroed; everything outside the mask (log-probs included)
    is replaced by 0 before use, so it cannot produce NaN.

    Args:
        logp: ``(N, T)`` policy log-probs of the sampled tokens (with grad).
        old_logp: ``(N, T)`` log-probs of the sampling policy.
        ref_logp: ``(N, T)`` reference-model log-probs, or None.
        advantages: ``(N, T)`` per-token advantages (``advantages.token_advantages``).
        completion_mask: ``(N, T)`` True on completion tokens of kept groups.
        beta: KL coefficient.
        eps_low: lower clip range.
        eps_high: upper clip range; defaults to ``eps_low``.
        mode: aggregation, see :func:`aggregate`.
        perception_mask: ``(N, T)`` perception tokens, for ``process_mean``.
        max_completion_length: divisor length for ``constant``.
        kl_log_ratio_clip: clamp of the KL's log-ratio (:func:`k3_kl`), or None.
        group_size: rows per group, for ``process_mean``.

    Returns:
        ``loss`` ``()`` and detached metrics, each a mean over masked tokens (0 when none):
        ``kl``, ``clip_fraction``, ``clip_fraction_low``, ``clip_fraction_high``, ``ratio_mean``,
        ``ratio_max``, ``entropy`` (mean -logp of the sampled tokens: a Monte-Carlo estimate of
        the policy's per-token entropy when the rows were sampled from it) and ``surrogate`` (the
        aggregated surrogate alone).
    """
    shapes = {tuple(t.shape) for t in (logp, old_logp, advantages, completion_mask)}
    if ref_logp is not None:
        shapes.add(tuple(ref_logp.shape))
    if len(shapes) != 1 or logp.dim() != 2:
        raise ValueError(f"all per-token inputs must share one (N, T) shape, got {shapes}")
    mask = completion_mask.bool()  # (N, T)
    zeros = torch.zeros_like(logp)  # (N, T)
    logp = torch.where(mask, logp, zeros)  # (N, T)
    old_logp = torch.where(mask, old_logp.detach(), zeros)  # (N, T)
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))  # (N, T)

    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)  # (N, T)
    per_token = surrogate  # (N, T)
    kl = zeros  # (N, T)
    if beta != 0 and ref_logp is not None:
        ref = torch.where(mask, ref_logp.detach(), zeros)  # (N, T)
        kl = k3_kl(logp, ref, kl_log_ratio_clip)  # (N, T)
        per_token = surrogate + beta * kl  # (N, T)
    loss = aggregate(per_token, mask, mode, perception_mask, max_completion_length, group_size)  # ()

    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)  # (N, T)
        low = clipped & (advantages < 0)  # (N, T)
        metrics = {  # name -> ()
            "kl": _masked_mean(kl, mask),
            "clip_fraction": _masked_mean(clipped.to(logp.dtype), mask),
            "clip_fraction_low": _masked_mean(low.to(logp.dtype), mask),
            "clip_fraction_high": _masked_mean((clipped & ~low).to(logp.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, zeros).amax() if mask.any() else zeros.sum(),
            "entropy": _masked_mean(-logp, mask),
            "surrogate": aggregate(surrogate, mask, mode, perception_mask, max_completion_length, group_size),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
