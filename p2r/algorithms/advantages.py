"""Group-relative advantages, per process (PA-GRPO) or for one summed reward (plain GRPO).

Rewards arrive flat, ``(B*G,)``, with the G samples of one prompt next to each other (sample
``i`` belongs to group ``i // G``). PA-GRPO (METHOD.md, "PA-GRPO") normalises each process's
reward inside its group on its own,

    A_i,k = (R_i,k - mean_j R_j,k) / (std_j R_j,k + eps)        k in {perception, reasoning}

and puts A_i,P on the perception tokens of response i and A_i,R on its reasoning tokens. Plain
GRPO is the same code with one summed reward and one advantage for every token.

Choices the paper leaves open (all written down where they are made):

- std is the unbiased sample standard deviation (divide by G - 1), as ``torch.std`` computes it
  by default in TRL and Video-R1. eps = 1e-4 is added to the std, not to the variance, also as
  there.
- A group whose rewards are all equal carries no signal: its advantages are exactly 0 (the
  formula would give tiny float noise over eps, or 0/0 when eps = 0).
- A group with any non-finite reward (NaN marks a reward that could not be computed, e.g. the
  perception judge failed) is dropped: every advantage in it is 0, and :func:`group_dropped`
  says which samples to take out of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Check the flat reward layout and view it as ``(B, G)`` in at least float32."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
        )
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    return rewards.to(dtype).reshape(-1, group_size)  # (B, G)


def group_dropped(rewards: Tensor, group_size: int) -> Tensor:
    """Which samples belong to a group with any non-finite (NaN or infinite) reward.

    Args:
        rewards: ``(B*G,)`` one reward per sample, groups contiguous.
        group_size: G, samples per prompt.

    Returns:
        ``(B*G,)`` bool, True for every sample of a dropped group. The caller zeroes those rows
        of the completion mask so that the loss ignores them.
    """
    grouped = _grouped(rewards, group_size)  # (B, G)
    dropped = (~torch.isfinite(grouped)).any(dim=1, keepdim=True)  # (B, 1)
    return dropped.expand_as(grouped).reshape(-1)  # (B*G,)


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True
) -> Tensor:
    """Group-relative advantages of one reward: ``(r - mean_group) / (std_group + eps)``.

    std is the unbiased (G - 1) standard deviation, as in TRL and Video-R1 (``torch.std``).
    With G = 1 there is no group to compare against and every advantage is 0.

    Departures from the plain formula, so that no advantage is ever NaN:
    a group with equal rewards gives exactly 0; a group with any non-finite reward gives 0 for
    every sample in it (see :func:`group_dropped`).

    Args:
        rewards: ``(B*G,)`` one reward per sample, groups contiguous.
        group_size: G, samples per prompt.
        eps: added to the group std before dividing.
        scale: False gives Dr. GRPO's advantages, ``r - mean_group``, with no division.

    Returns:
        ``(B*G,)`` advantages in the dtype of ``rewards`` promoted to at least float32.
    """
    grouped = _grouped(rewards, group_size)  # (B, G)
    finite = torch.isfinite(grouped)  # (B, G)
    dropped = ~finite.all(dim=1, keepdim=True)  # (B, 1)
    values = torch.where(finite, grouped, torch.zeros_like(grouped))  # (B, G)
    centered = values - values.mean(dim=1, keepdim=True)  # (B, G)
    if scale:
        variance = centered.pow(2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)  # (B, 1)
        centered = centered / (variance.sqrt() + eps)  # (B, G)
    constant = values.amax(dim=1, keepdim=True) == values.amin(dim=1, keepdim=True)  # (B, 1)
    silent = dropped | constant  # (B, 1)
    return torch.where(silent, torch.zeros_like(centered), centered).reshape(-1)  # (B*G,)


def process_advantages(
    rewards_by_process: dict[str, Tensor],
    group_size: int,
    eps: float = 1e-4,
    scale: bool = True,
) -> dict[str, Tensor]:
    """PA-GRPO: normalise each process's reward inside each group on its own.

    ``A_i,k = (R_i,k - mean_j R_j,k) / (std_j R_j,k + eps)`` for every process k (the keys, e.g.
    ``"perception"`` and ``"reasoning"``), by :func:`group_advantages`. A non-finite reward
    zeroes that process's advantages for its group only; to drop the whole group from the loss,
    OR :func:`group_dropped` over the processes and zero those rows of the completion mask.

    Args:
        rewards_by_process: process name -> ``(B*G,)`` summed reward of that process.
        group_size: G, samples per prompt.
        eps: added to each group std.
        scale: False gives Dr. GRPO's mean-centering only.

    Returns:
        process name -> ``(B*G,)`` advantages, same keys.
    """
    sizes = {name: tuple(r.shape) for name, r in rewards_by_process.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every process needs one reward per sample, got shapes {sizes}")
    return {
        name: group_advantages(rewards, group_size, eps=eps, scale=scale)  # (B*G,)
        for name, rewards in rewards_by_process.items()
    }


def with_choice_token(perception_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """Give a completion with no perception token one: its first token (where it chose not to observe).

    METHOD.md: a response with no observation still has an A_i,P (its perception rewards are 0),
    and it must not vanish, or skipping the observation costs nothing. The paper does not say
    where it goes; ours: on the completion's first token, the one that would have opened
    ``<observation>``. A well-formed completion's first token (the tag's first piece) is a
    perception token too, so the choice to observe or not gets the perception advantage in every
    row, at the same position, with one token's weight.

    Args:
        perception_mask: ``(N, T)`` True on perception tokens.
        completion_mask: ``(N, T)`` True on completion tokens, False on padding.

    Returns:
        ``(N, T)`` bool: ``perception_mask & completion_mask``, plus the first completion token of
        every row that has completion tokens but no perception token.

    >>> with_choice_token(torch.tensor([[0, 0, 0], [0, 1, 0]]), torch.tensor([[1, 1, 0], [1, 1, 1]])).int().tolist()
    [[1, 0, 0], [0, 1, 0]]
    """
    completion = completion_mask.bool()  # (N, T)
    perception = perception_mask.bool() & completion  # (N, T)
    missing = completion.any(dim=1) & ~perception.any(dim=1)  # (N,)
    first = completion & (completion.cumsum(dim=1) == 1)  # (N, T)
    return perception | (first & missing[:, None])  # (N, T)


def token_advantages(
    adv_perception: Tensor,
    adv_reasoning: Tensor,
    perception_mask: Tensor,
    completion_mask: Tensor,
) -> Tensor:
    """Spread per-sample advantages over tokens: A_P on perception, A_R on reasoning, 0 on pad.

    Reasoning tokens are the completion tokens that are not perception tokens (METHOD.md: the
    think and answer segments, the text around the tags and the end-of-sequence token). A
    perception-mask bit outside the completion mask is padding and gets 0. Plain GRPO passes the
    same advantage twice.

    Args:
        adv_perception: ``(N,)`` A_i,P.
        adv_reasoning: ``(N,)`` A_i,R.
        perception_mask: ``(N, T)`` True on perception tokens (converted with ``.bool()``).
        completion_mask: ``(N, T)`` True on completion tokens, False on padding.

    Returns:
        ``(N, T)`` per-token advantages.
    """
    if perception_mask.shape != completion_mask.shape or completion_mask.dim() != 2:
        raise ValueError(
            f"masks must share one (N, T) shape, got {tuple(perception_mask.shape)} "
            f"and {tuple(completion_mask.shape)}"
        )
    n = completion_mask.shape[0]
    if adv_perception.shape != (n,) or adv_reasoning.shape != (n,):
        raise ValueError(
            f"advantages must be ({n},), got {tuple(adv_perception.shape)} "
            f"and {tuple(adv_reasoning.shape)}"
        )
    completion = completion_mask.bool()  # (N, T)
    perception = perception_mask.bool() & completion  # (N, T)
    reasoning = completion & ~perception  # (N, T)
    dtype = torch.promote_types(adv_perception.dtype, adv_reasoning.dtype)
    zeros = torch.zeros(completion.shape, dtype=dtype, device=completion.device)  # (N, T)
    out = torch.where(perception, adv_perception.to(dtype).unsqueeze(1), zeros)  # (N, T)
    return torch.where(reasoning, adv_reasoning.to(dtype).unsqueeze(1), out)  # (N, T)
