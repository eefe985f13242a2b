"""Shared-prompt training passes: each prompt and its video computed once for its G completions.

In a GRPO step on video the prompt (hundreds to thousands of vision tokens) dwarfs each
completion, yet TRL, Video-R1 and EasyR1 run every (prompt, completion) pair as its own row in
the old-policy, reference and policy passes, so the vision encoder and the prompt tokens run G
times. Here one row holds one prompt and all of its completions:

    [pad..pad | prompt p (left-padded, video placeholder once) | c_1[:-1] | c_2[:-1] | ... | c_G[:-1] | pad..]

and attention that sees: prompt tokens attend causally to the prompt; a completion token
attends to the whole prompt and causally to its own completion, never to another completion
(:func:`p2r.backbones.attention.packed_group_attention`, laid out by :func:`packed_groups`).
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
  - Attention runs as two calls of the model's own kernel (sdpa or eager): the prompts' queries
    over the prompt (causal; with an explicit mask where prompts are left-padded), and each
    completion's queries over [its prompt's keys, its own keys], G completions as a batch. A dense
    (L, L) mask over the whole row would compute every completion against every other one.
    The kernel is reached through the ``packed_groups`` argument of the model's forward, which
    transformers hands to every attention call (p2r.backbones.attention); the model still gets a
    4-D ``attention_mask`` (zeros), which transformers (5.24, ``masking_utils``) hands on as given
    instead of building an (L, L) mask nobody reads. flash_attention_2 and flex_attention are
    refused (:func:`supports_shared_prompt`, the backbone's ``custom_mask_support``), and
    sliding-window layers (the window would be dropped silently).
  - With LoRA dropout in train mode the shared prompt gets one dropout mask for its G
    completions, where the per-sample path draws G; the expectation is the same.
  - Cost: attention computes P^2 / 2 + G T (P + T) scores per group where the per-sample path
    computes G (P + T)^2 / 2; the linear layers see P + sum of completions tokens instead of
    G (P + T). The price is memory: each completion's keys and values are laid out with a copy of
    the prompt's in front, (G, kv_heads, P + T, head_dim) per layer (p2r.memory_plan counts it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from p2r.algorithms.rollout import LOGPROB_CHUNK_TOKENS, GroupRollout, scatter_tokens, token_logprobs
from p2r.backbones.attention import PackedGroups, additive_mask, use_group_attention
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


def packed_groups(
    prompt_lengths: list[int], starts: list[list[int]], lengths: list[list[int]], width: int, length: int,
    dtype: torch.dtype, device: torch.device,
) -> PackedGroups:
    """The attention layout of R packed rows (:class:`p2r.backbones.attention.PackedGroups`).

    Row r: a prompt of ``prompt_lengths[r]`` tokens left-padded to ``width`` columns; its
    completion j has ``lengths[r][j]`` input tokens from column ``width + starts[r][j]``; ``length``
    columns in all. Masks are additive in ``dtype`` (0 to attend, the dtype's minimum to block):
    a padding query sees only itself, so no score row is empty and nothing is NaN; no real token
    ever sees padding.
    """
    rows, group = len(prompt_lengths), len(starts[0])
    slots = max(1, max(n for row in lengths for n in row))  # T
    columns = torch.full((rows, group, slots), width - 1, dtype=torch.long)  # unused slots: the last prompt token
    sources = torch.full((rows, length), width + group * slots, dtype=torch.long)  # padding columns: the zero output
    sources[:, :width] = torch.arange(width)
    for r in range(rows):
        for j, (start, n) in enumerate(zip(starts[r], lengths[r])):
            columns[r, j, :n] = width + start + torch.arange(n)
            sources[r, width + start : width + start + n] = width + j * slots + torch.arange(n)
    real = torch.arange(width)[None, :] >= width - torch.tensor(prompt_lengths)[:, None]  # (R, W) real prompt tokens
    prompt_mask = None
    if not bool(real.all()):
        causal = torch.ones(width, width, dtype=torch.bool).tril()  # (W, W)
        allowed = causal & (real[:, None, :] | torch.eye(width, dtype=torch.bool))  # (R, W, W)
        prompt_mask = additive_mask(allowed, dtype)[:, None].to(device)  # (R, 1, W, W)
    own = torch.ones(slots, slots, dtype=torch.bool).tril()  # (T, T)
    allowed = torch.cat([real[:, None, :].expand(-1, slots, -1), own.expand(rows, -1, -1)], -1)  # (R, T, W + T)
    if rows > 1:
        allowed = allowed.repeat_interleave(group, 0)  # (R * G, T, W + T)
    completion_mask = additive_mask(allowed, dtype)[:, None]  # (R*G or 1, 1, T, W+T)
    return PackedGroups(width, group, slots, columns.view(rows, -1).to(device), sources.to(device), prompt_mask,
                        completion_mask.to(device))


@dataclass
class SharedBatch:
    """One row per prompt: the prompt left-padded to P columns, then its completions packed."""

    tensors: dict[str, torch.Tensor]  # input_ids (R, L), token types, visual tensors
    packed: PackedGroups  # where prompts and completions lie: what attention masks with
    attention_mask: torch.Tensor  # (R, 1, 1, L) zeros: 4-D, so transformers hands it on instead of building (L, L) masks
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
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One row: a prompt of ``prompt_length`` tokens left-padded to ``width``, then each completion but
    its last token, then padding to ``length``.

    Returns the ids after the prompt (L - width,), positions (3, L) or (L,) (completion positions
    continue at last prompt position + 1), and where each completion's tokens start, counted from
    the first completion column.
    """
    inputs = [torch.tensor(c[:-1], dtype=torch.long) for c in completions]  # the last token predicts nothing
    lead, tail = width - prompt_length, length - width - sum(len(x) for x in inputs)
    ids = torch.cat([*inputs, torch.full((tail,), pad)])  # (L - width,)
    start = positions[..., -1:] + 1  # (3, 1) or (1,)
    zeros = [torch.zeros(positions.shape[:-1] + (n,), dtype=positions.dtype) for n in (lead, tail)]
    pos = torch.cat([zeros[0], positions, *[start + torch.arange(len(x)) for x in inputs], zeros[1]], -1)  # (3, L) or (L,)
    offsets = torch.tensor([0] + [len(x) for x in inputs]).cumsum(0)[:-1].tolist()
    return ids, pos, offsets


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
    completion_columns, positions, starts = [], [], []
    for r, (item, group) in enumerate(zip(items, groups)):
        ids, row_positions, offsets = _pack_row(
            item["input_ids"].shape[1], _prompt_positions(backbone, item), group, width, length, pad)
        completion_columns.append(ids)
        positions.append(row_positions)
        starts.append(offsets)
        for j, (comp, offset) in enumerate(zip(group, offsets)):
            i = r * g + j
            completion_ids[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
            completion_mask[i, : len(comp)] = True
            logit_cols[i, 1 : len(comp)] = offset + torch.arange(1, len(comp))

    prompts = prompt_batch(items, pad)  # (R, P) left-padded, token types, visual tensors
    del prompts["attention_mask"]  # the 4-D mask below replaces it
    tensors = append_text(prompts, torch.stack(completion_columns))  # (R, L), completion columns are text
    dev, dtype = backbone.device, backbone.dtype
    prompt_lengths = [it["input_ids"].shape[1] for it in items]
    inputs = [[max(0, len(c) - 1) for c in group] for group in groups]  # a completion's last token is no input
    return SharedBatch(
        tensors=backbone.move(tensors),
        packed=packed_groups(prompt_lengths, starts, inputs, width, length, dtype, dev),
        attention_mask=torch.zeros(len(items), 1, 1, length, dtype=dtype, device=dev),
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

    use_group_attention(model if model is not None else backbone.model)  # packed_groups reaches attention
    picked = backbone.apply_head(
        logprobs, batch.logits_to_keep, model, **batch.tensors, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, packed_groups=batch.packed,
    )
    return scatter_tokens(picked, mask), mask  # (n, T), (n, T)
