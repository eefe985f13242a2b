"""Processor outputs laid out as model batches: padding, token types and visual tensors.

A Hugging Face VLM processor returns, for one prompt, per-token tensors (``input_ids`` and, for some
architectures, token-type ids saying which tokens are text and which are media placeholders) and
per-media tensors (pixels, grid sizes, frame timings). A batch pads the per-token tensors to one
length and concatenates the per-media ones in prompt order. Prompts are left-padded where
completions follow them (generation, rollouts, the log-prob passes), so every completion starts in
the same column; sequences are right-padded where a target follows the prompt (SFT). Tokens
appended after a prompt (a target, a completion) are text: token type 0.
"""

from __future__ import annotations

import torch

# Per-token tensors besides input_ids and attention_mask: the token types processors emit.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
SEQUENCE_KEYS = ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)


def pad(seqs: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into (B, L_max), padding with ``value`` on the right
    (or on the left)."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, out.shape[1] - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def visual_inputs(items: list[dict]) -> dict[str, torch.Tensor]:
    """The per-media tensors of per-prompt processor outputs, concatenated in prompt order."""
    keys = sorted({k for it in items for k in it} - set(SEQUENCE_KEYS))
    return {k: torch.cat([torch.as_tensor(it[k]) for it in items if k in it], dim=0) for k in keys}


def prompt_batch(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Per-prompt processor outputs (batch dimension 1 each) as one left-padded batch: input_ids,
    attention_mask and token types (B, P), and the visual tensors."""
    ids = [it["input_ids"][0] for it in items]
    batch = {"input_ids": pad(ids, pad_id, left=True), "attention_mask": pad([torch.ones_like(s) for s in ids], 0, left=True)}
    for key in TOKEN_TYPE_KEYS:
        if key in items[0]:
            batch[key] = pad([it[key][0] for it in items], 0, left=True)
    batch.update(visual_inputs(items))
    return batch


def append_text(batch: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``batch`` with text columns ``ids`` (B, T) after every row: token type 0; ``mask`` (B, T)
    extends the attention mask (None: the batch has none to extend)."""
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    if mask is not None:
        out["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
    for key in TOKEN_TYPE_KEYS:
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros_like(ids, dtype=batch[key].dtype)], 1)
    return out


def collate(items: list[dict], seqs: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``seqs`` (each a prompt's ids, possibly followed by appended text) with
    the prompts' token types (appended text is type 0) and visual tensors."""
    batch: dict[str, torch.Tensor] = {"input_ids": pad(seqs, pad_id), "attention_mask": pad([torch.ones_like(s) for s in seqs], 0)}
    for key in TOKEN_TYPE_KEYS:
        if key in items[0]:
            types = [torch.cat([it[key][0], torch.zeros(len(s) - it[key].shape[1], dtype=it[key].dtype)]) for it, s in zip(items, seqs)]
            batch[key] = pad(types, 0)
    batch.update(visual_inputs(items))
    return batch


def left_align(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's padding from the right to the left (per-token tensors only)."""
    lengths = batch["attention_mask"].sum(1)
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            out[key] = torch.stack([torch.roll(row, int(row.shape[0] - n)) for row, n in zip(batch[key], lengths)])
    return out


def move_to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; pixel tensors take ``dtype``."""
    return {k: v.to(device, dtype=dtype if k.startswith("pixel_values") else None) for k, v in batch.items()}
