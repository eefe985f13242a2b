"""Shared-prompt training passes: each prompt and its video computed once for its G completions.

In a GRPO step on video the prompt (hundreds to thousands of vision tokens) dwarfs each
completion, yet TRL, Video-R1 and EasyR1 run every (prompt, completion) pair as its own row in
the old-policy, reference and policy passes, so the vision encoder and the prompt tokens run G
times. Here one row holds one prompt and all of its completions:

    [pad..pad | prompt p (left-padded, video placeholder once) | c_1[:-1] | c_2[:-1] | ... | c_G[:-1] | pad..]

with a 4-D attention mask: prompt tokens attend causally to the prompt; a completion token
attends to the whole prompt and causally to its own completion, never to another completion.
Each completion's positions continue from the end of the prompt exactly as in a per-sample
forward (mrope: the prompt's positions from the model's ``get_rope_index`` on the prompt alone,
then last prompt position + 1 + t on all three axes). So every completion sees exactly what it
sees in :func:`p2r.algorithms.rollout.completion_logprobs`, and its log-probs are the same up
to float rounding; the vision encoder runs once per prompt and the prompt tokens once per
group. Gradients reach the shared prompt (and the vision tower, when it trains) once, as the
sum over the G completions, which is what the per-sample path accumulates G times.

Details:
  - A completion's last token predicts nothing, so it is left out of the row; the last prompt
    position predicts every completion's first token (its logits are computed once).
  - Only the row's tail (``logits_to_keep``) reaches the LM head: the last prompt column and the
    completion columns, which all rows share because prompts are left-padded to one width; and
    of those only the completion tokens' positions, a chunk at a time (never the whole
    (tokens x vocabulary) logits, :func:`p2r.algorithms.rollout.token_logprobs`).
  - transformers 5.x (checked on 5.24, ``masking_utils._preprocess_mask_arguments``) passes a
    4-D ``attention_mask`` (B, 1, Lq, Lk) through untouched: no causal or padding mask is added,
    so this one must encode both. sdpa hands it to ``scaled_dot_product_attention`` (bool or
    additive float both work there), eager *adds* it to the scores (a bool mask would add 1, not
    block), so the mask is additive float in the model's dtype: 0 to attend, the dtype's minimum
    to block. flash_attention_2 takes no such mask and flex_attention wants a BlockMask:
    :func:`supports_shared_prompt` refuses them (the backbone's ``custom_mask_support``), and
    sliding-window layers (the window would be dropped silently).
  - With LoRA dropout in train mode the shared prompt gets one dropout mask for its G
    completions, where the per-sample path draws G; the expectation is the same.
  - Cost: attention runs over (P + sum of completions)^2 per group with a dense mask instead of
    G (P + T)^2 with a causal one; the linear layers see P + sum of completions tokens instead
    of G (P + T).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from p2r.algorithms.rollout import LOGPROB_CHUNK_TOKENS, GroupRollout, scatter_tokens, token_logprobs
from p2r.backbones.base import VideoBackbone
from p2r.backbones.batching import append_text, prompt_batch

# Model types whose shared-prompt log-probs are checked against the per-sample path
# (tests/algorithms/test_shared_prompt.py): the mask reaches attention as given, vision
# features fill their placeholders in place, and logits are lm_head(hidden) with no extra term.
VERIFIED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def supports_shared_prompt(backbone: VideoBackbone) -> tuple[bool, str]:
    """Whether the built backbone can run the shared-prompt passes, and why (not).

    Refuses attention kernels that cannot take a custom 4-D mask, sliding-window layers, and
    architectures not verified against the per-sample path.
    """
    if not backbone.is_built:
        raise RuntimeError("supports_shared_prompt needs a built backbone (call backbone.build() first)")
    ok, why = backbone.custom_mask_support()
    if not ok:
        return False, f"{why}: it cannot pack G completions behind one shared prompt; set shared_prompt: false"
    if backbone.architecture not in VERIFIED_MODEL_TYPES:
        return False, (
            f"shared prompt passes are verified for {VERIFIED_MODEL_TYPES} only, not {backbone.architecture!r}; "
            "set shared_prompt: false"
        )
    return True, why


def shared_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (R, 1, L, L) from segment ids (R, L): -1 padding, 0 prompt, j + 1 completion j.

    Query q sees key k iff k <= q and k is a prompt token or in q's own segment. Padding
    queries see earlier padding (at least themselves), so no row is empty and nothing is NaN;
    no real token ever sees padding.
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # (L, L)
    same = segments[:, :, None] == segments[:, None, :]  # (R, L, L)
    prompt_key = (segments == 0)[:, None, :]  # (R, 1, L)
    allowed = causal & (same | prompt_key)  # (R, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)  # (R, L, L)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (R, 1, L, L)


@dataclass
class SharedBatch:
    """One row per prompt: the prompt left-padded to P columns, then its completions packed."""

    tensors: dict[str, torch.Tensor]  # input_ids (R, L), token types, visual tensors
    attention_mask: torch.Tensor  # (R, 1, L, L) additive
    position_ids: torch.Tensor  # (3, R, L) mrope or (R, L)
    logits_to_keep: int  # K = L - P + 1: the last prompt column and every completion column
    logit_rows: torch.Tensor  # (n, T) row holding the logit that predicts completion token t
    logit_cols: torch.Tensor  # (n, T) its column among the last K (column 0: the last prompt token)
    completion_ids: torch.Tensor  # (n, T)
    completion_mask: torch.Tensor  # (n, T) bool


def _prompt_positions(backbone: VideoBackbone, item: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions of one prompt alone, (3, P) mrope or (P,), from the backbone's rope index."""
    inputs = {k: torch.as_tensor(v) for k, v in item.items() if not k.startswith("pixel_values")}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return backbone.position_ids(inputs)[..., 0, :].cpu()  # (3, P) or (P,)


def _pack_row(
    prompt_length: int, positions: torch.Tensor, completions: list[list[int]], width: int, length: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One row: a prompt of ``prompt_length`` tokens left-padded to ``width``, then each completion but
    its last token, then padding to ``length``.

    Returns the ids after the prompt (L - width,), segment ids (L,) (-1 padding, 0 prompt, j + 1
    completion j), positions (3, L) or (L,) (completion positions continue at last prompt position
    + 1), and where each completion's tokens start, counted from the first completion column.
    """
    inputs = [torch.tensor(c[:-1], dtype=torch.long) for c in completions]  # the last token predicts nothing
    lead, tail = width - prompt_length, length - width - sum(len(x) for x in inputs)
    ids = torch.cat([*inputs, torch.full((tail,), pad)])  # (L - width,)
    segments = torch.cat([
        torch.full((lead,), -1), torch.zeros(prompt_length, dtype=torch.long),
        *[torch.full((len(x),), j + 1) for j, x in enumerate(inputs)], torch.full((tail,), -1),
    ])  # (L,)
    start = positions[..., -1:] + 1  # (3, 1) or (1,)
    zeros = [torch.zeros(positions.shape[:-1] + (n,), dtype=positions.dtype) for n in (lead, tail)]
    pos = torch.cat([zeros[0], positions, *[start + torch.arange(len(x)) for x in inputs], zeros[1]], -1)  # (3, L) or (L,)
    offsets = torch.tensor([0] + [len(x) for x in inputs]).cumsum(0)[:-1].tolist()
    return ids, segments, pos, offsets


def build_shared_batch(backbone: VideoBackbone, rollout: GroupRollout, prompt_indices: list[int]) -> SharedBatch:
    """Lay out the prompts ``prompt_indices`` and their G completions each, one row per prompt.

    Samples are ordered ``[p * G + j for p in prompt_indices for j in range(G)]``; T is the
    longest of their completions (at least 1), as in :func:`rollout.build_train_batch`.
    """
    g, pad = rollout.group_size, backbone.pad_token_id
    items = [rollout.prompts.items[p] for p in prompt_indices]
    groups = [[rollout.completion_ids[p * g + j] for j in range(g)] for p in prompt_indices]
    samples = [c for group in groups for c in group]
    width = max(it["input_ids"].shape[1] for it in items)  # P: prompts left-padded to one width
    length = width + max(sum(max(0, len(c) - 1) for c in group) for group in groups)  # L
    t_max = max(1, max(len(c) for c in samples))  # T

    completion_ids = torch.full((len(samples), t_max), pad, dtype=torch.long)  # (n, T)
    completion_mask = torch.zeros(len(samples), t_max, dtype=torch.bool)  # (n, T)
    # Logit column predicting token t (>= 1) of a completion starting at offset o: o + t, the
    # column of its token t - 1; column 0 (the last prompt token) predicts every token 0.
    logit_cols = torch.zeros(len(samples), t_max, dtype=torch.long)  # (n, T)
    completion_columns, segments, positions = [], [], []
    for r, (item, group) in enumerate(zip(items, groups)):
        ids, row_segments, row_positions, offsets = _pack_row(
            item["input_ids"].shape[1], _prompt_positions(backbone, item), group, width, length, pad)
        completion_columns.append(ids)
        segments.append(row_segments)
        positions.append(row_positions)
        for j, (comp, offset) in enumerate(zip(group, offsets)):
            i = r * g + j
            completion_ids[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
            completion_mask[i, : len(comp)] = True
            logit_cols[i, 1 : len(comp)] = offset + torch.arange(1, len(comp))

    prompts = prompt_batch(items, pad)  # (R, P) left-padded, token types, visual tensors
    del prompts["attention_mask"]  # the 4-D mask below replaces it
    tensors = append_text(prompts, torch.stack(completion_columns))  # (R, L), completion columns are text
    dev, dtype = backbone.device, backbone.dtype
    return SharedBatch(
        tensors=backbone.move(tensors),
        attention_mask=shared_attention_mask(torch.stack(segments).to(dev), dtype),  # (R, 1, L, L)
        position_ids=torch.stack(positions, dim=-2).to(dev),  # (3, R, L) or (R, L)
        logits_to_keep=length - width + 1,
        logit_rows=(torch.arange(len(samples)) // g)[:, None].expand(-1, t_max).to(dev),  # (n, T)
        logit_cols=logit_cols.to(dev),
        completion_ids=completion_ids.to(dev),
        completion_mask=completion_mask.to(dev),
    )


def shared_prompt_logprobs(
    backbone: VideoBackbone,
    rollout: GroupRollout,
    prompt_indices: list[int],
    temperature: float = 1.0,
    model: nn.Module | None = None,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (n, T) and completion mask (n, T) of the G completions of each prompt.

    One forward for the prompts ``prompt_indices`` (one row each, the video encoded once per
    prompt); samples in the order ``[p * G + j for p in prompt_indices for j in range(G)]``.
    Equal, within float rounding, to ``completion_logprobs(backbone, build_train_batch(backbone,
    rollout, those rows), temperature)`` and that batch's ``completion_mask`` (0 on padding, as
    there). Logits are divided by the sampling temperature as there. ``model`` (default: the
    backbone's policy) is any module with the backbone's architecture, e.g. PA-GRPO's frozen
    reference copy. The LM head runs on the completion tokens only, ``chunk_tokens`` at a time
    (:func:`p2r.algorithms.rollout.token_logprobs`).
    """
    batch = build_shared_batch(backbone, rollout, prompt_indices)
    mask = batch.completion_mask  # (n, T)
    rows, cols, ids = batch.logit_rows[mask], batch.logit_cols[mask], batch.completion_ids[mask]  # (M,) each

    def logprobs(hidden: torch.Tensor, head: Callable) -> torch.Tensor:  # hidden (R, K, H), column 0: last prompt position
        return token_logprobs(hidden[rows, cols], head, ids, temperature, chunk_tokens)  # (M,)

    picked = backbone.apply_head(
        logprobs, batch.logits_to_keep, model, **batch.tensors, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    return scatter_tokens(picked, mask), mask  # (n, T), (n, T)
