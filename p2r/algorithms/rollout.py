"""Group rollouts: G completions per prompt, the video encoded and the prompt prefilled once.

TRL and Video-R1 put each prompt G times in the generation batch, so the vision encoder and the
prompt prefill run G times; ``generate(num_return_sequences=G)`` encodes the video once but still
prefills the prompt G times. Here the B prompts are prefilled together, once each (left-padded),
the KV cache is repeated G times, and one batched decode loop samples all B*G completions.
Positions are passed explicitly (Qwen's 3-D mrope: computed once from the prompt by
``get_rope_index``; decode positions continue at last prompt position + 1, + 2, ...), never
taken from the model's stateful ``rope_deltas``. The backbone owns the prefill and the decode
step (cache, mask, positions; eager or compiled engine, :mod:`p2r.backbones.decoding`); this
module only samples, and syncs with the host once every ``DONE_CHECK_INTERVAL`` tokens.

The same module builds the training batch for the log-prob passes (prompt left-padded,
completion right-padded, so every completion starts at the same column) and computes the
completions' log-probs from the final hidden states with the LM head applied a chunk of tokens
at a time, so the (tokens x vocabulary) logits never exist whole (:func:`token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from callbacks.segments import char_spans_to_token_mask, split_segments
from p2r.backbones.base import VideoBackbone
from p2r.backbones.batching import append_text, prompt_batch
from p2r.backbones.decoding import DecodeEngine
from p2r.data.video import Clip


@dataclass
class PromptBatch:
    """B prompts, processed once: left-padded token tensors plus the visual tensors."""

    items: list[dict[str, torch.Tensor]]  # per-prompt processor outputs (batch dim 1)
    tensors: dict[str, torch.Tensor]  # left-padded batch of the B prompts
    position_ids: torch.Tensor  # (3, B, P) mrope or (B, P)


@dataclass
class GroupRollout:
    """What a rollout returns: the prompts and B*G completions (sample i answers prompt i // G)."""

    prompts: PromptBatch
    group_size: int
    completion_ids: list[list[int]]  # without padding; ends with an end token unless truncated
    truncated: list[bool]


def prepare_prompts(backbone: VideoBackbone, prompts: list[str], clips: list[Clip]) -> PromptBatch:
    """Process each prompt and clip once and lay the B prompts out left-padded."""
    items = [backbone.process_one(p, c) for p, c in zip(prompts, clips)]
    tensors = backbone.move(prompt_batch(items, backbone.pad_token_id))
    return PromptBatch(items, tensors, backbone.position_ids(tensors))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    suppress: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from logits (N, V): greedy when temperature == 0, else nucleus sampling.

    Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token always stays), renormalise, sample. ``suppress`` ids are never picked.
    The draw is ``torch.multinomial(probs, 1, generator=generator)``'s own (the exponential race
    argmax(p / q), q ~ Exp(1) from one ``exponential_`` call on the generator), so it picks the
    same tokens from the same seeds, without multinomial's host-side check of the probabilities
    (one device synchronisation per call).
    """
    if suppress is not None and suppress.numel():
        logits = logits.index_fill(-1, suppress, float("-inf"))  # (N, V)
    if temperature == 0:
        return logits.argmax(-1)  # (N,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    race = torch.empty_like(probs).exponential_(1, generator=generator)  # (N, V)
    return probs.div(race).argmax(-1)  # (N,)


def sample_groups(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | list[torch.Generator] | None,
    group_size: int,
    suppress: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of (B*G, V) logits; given one generator per prompt, each group of G rows
    draws from its own, so a prompt's samples do not depend on which other prompts share its
    batch (or its rank)."""
    if not isinstance(generator, list):
        return sample_next_token(logits, temperature, top_p, generator, suppress)  # (N,)
    chunks = logits.split(group_size)  # B x (G, V)
    return torch.cat([sample_next_token(c, temperature, top_p, g, suppress) for c, g in zip(chunks, generator)])  # (N,)


# The decode loop asks the device whether every row has ended once per this many tokens (a host
# synchronisation); rows that end in between decode padding until then.
DONE_CHECK_INTERVAL = 16


@torch.no_grad()
def generate_groups(
    backbone: VideoBackbone,
    prompts: list[str],
    clips: list[Clip],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    engine: DecodeEngine = "eager",
) -> GroupRollout:
    """Sample ``group_size`` completions for each prompt with one prefill per prompt.

    ``generator``: one for the whole batch, or one per prompt (see :func:`sample_groups`).
    ``engine``: "eager" or "compiled" decode steps (:mod:`p2r.backbones.decoding`); both sample
    the same tokens up to float rounding of the logits.

    Stops a row at its first end token (kept in its ids) and flags rows that reach
    ``max_new_tokens`` without one as truncated. ``temperature=0`` decodes greedily.
    """
    batch = prepare_prompts(backbone, prompts, clips)
    logits, decoder = backbone.prefill(batch.tensors, batch.position_ids, group_size, max_new_tokens, engine)
    n = len(prompts) * group_size
    eos = torch.tensor(backbone.eos_token_ids, device=logits.device)
    suppress = torch.tensor(backbone.media_token_ids, dtype=torch.long, device=logits.device)
    done = torch.zeros(n, dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(max_new_tokens):
        tok = sample_groups(logits, temperature, top_p, generator, group_size, suppress)  # (N,)
        tok = tok.masked_fill(done, backbone.pad_token_id)
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if step == max_new_tokens - 1 or ((step + 1) % DONE_CHECK_INTERVAL == 0 and bool(done.all())):
            break
        # Rows already done keep decoding padding; their outputs are discarded.
        logits = decoder.step(tok)  # (N, V)
    ids = torch.stack(tokens, 1).tolist()  # (N, T)
    eos_ids = set(backbone.eos_token_ids)
    completions, truncated = [], []
    for row in ids:
        end = next((i for i, t in enumerate(row) if t in eos_ids), None)
        completions.append(row[: end + 1] if end is not None else row)
        truncated.append(end is None)
    return GroupRollout(batch, group_size, completions, truncated)


def token_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text (special tokens skipped) and each token's character range in it.

    Tokens decode one by one; where that does not reproduce the whole decode (a multi-byte
    character split across tokens), offsets come from decoding growing prefixes instead.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    if "".join(pieces) != text:
        ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
        starts = [0] + ends[:-1]
        return text, [(s, max(s, e)) for s, e in zip(starts, ends)]
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return text, offsets


def perception_masks(tokenizer, completion_ids: list[list[int]]) -> tuple[list[str], list[list[bool]]]:
    """Decoded completions and, per token, whether it belongs to the perception segment."""
    texts, masks = [], []
    for ids in completion_ids:
        text, offsets = token_offsets(tokenizer, ids)
        texts.append(text)
        masks.append(char_spans_to_token_mask(offsets, split_segments(text).perception_spans))
    return texts, masks


@dataclass
class TrainBatch:
    """Prompt (left-padded) + completion (right-padded) rows for the log-prob passes."""

    tensors: dict[str, torch.Tensor]
    position_ids: torch.Tensor
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) bool


def build_train_batch(backbone: VideoBackbone, rollout: GroupRollout, rows: list[int]) -> TrainBatch:
    """Rows ``rows`` of the rollout as full sequences: prompt i // G then completion i.

    Per-sample path: every row carries its prompt and video (the vision encoder runs per row).
    """
    g = rollout.group_size
    items = [rollout.prompts.items[i // g] for i in rows]
    comps = [torch.tensor(rollout.completion_ids[i] or [backbone.pad_token_id]) for i in rows]
    lengths = [len(rollout.completion_ids[i]) for i in rows]
    comp = torch.full((len(rows), max(len(c) for c in comps)), backbone.pad_token_id, dtype=torch.long)  # (N, T)
    comp_mask = torch.zeros(comp.shape, dtype=torch.bool)  # (N, T)
    for r, (c, n) in enumerate(zip(comps, lengths)):
        comp[r, : len(c)] = c
        comp_mask[r, :n] = True
    tensors = backbone.move(append_text(prompt_batch(items, backbone.pad_token_id), comp, comp_mask.long()))
    return TrainBatch(tensors, backbone.position_ids(tensors), comp.to(backbone.device), comp_mask.to(backbone.device))


# Tokens per LM-head chunk in the log-prob passes: at most this many rows of the (tokens x
# vocabulary) logits exist at once (Qwen2.5-VL's 152,064 words: 512 tokens = 0.3 GB in fp32).
LOGPROB_CHUNK_TOKENS = 512


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()  # (c, V)
    if temperature not in (0, 1):
        logits = logits / temperature
    return logits.gather(-1, ids[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (c,)


def token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[ids] in fp32 (M,) for M positions, hidden (M, H), ids (M,).

    The head runs on ``chunk_tokens`` positions at a time. With gradients on, a chunk's logits are
    not kept for the backward pass but recomputed there (activation checkpointing, one extra head
    matmul per chunk), so neither pass ever holds more than one chunk of (tokens x vocabulary).
    """
    parts = []
    for h, t in zip(hidden.split(chunk_tokens), ids.split(chunk_tokens)):  # (c, H), (c,)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, t, temperature))
    return torch.cat(parts)  # (M,)


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (M,) of the True entries of ``mask`` (n, T), in row-major order, as (n, T); 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def completion_logprobs(
    backbone: VideoBackbone,
    batch: TrainBatch,
    temperature: float = 1.0,
    model: nn.Module | None = None,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> torch.Tensor:
    """Per-token log-probs (N, T) of the completions under ``model`` (default: the backbone's
    policy); 0 on padding.

    ``model`` is any module with the backbone's architecture and inputs: PA-GRPO passes its frozen
    reference copy here. Logits are divided by the sampling temperature (as TRL does), so the
    ratio compares the same distributions that produced the samples. The LM head runs on the
    completion tokens only, ``chunk_tokens`` at a time (:func:`token_logprobs`).
    """
    mask = batch.completion_mask  # (N, T)
    ids = batch.completion_ids[mask]  # (M,)

    def logprobs(hidden: torch.Tensor, head: Callable) -> torch.Tensor:  # hidden (N, T+1, H)
        # position P-1+t predicts completion token t
        return token_logprobs(hidden[:, :-1][mask], head, ids, temperature, chunk_tokens)  # (M,)

    picked = backbone.apply_head(logprobs, mask.shape[1] + 1, model, **batch.tensors, position_ids=batch.position_ids)
    return scatter_tokens(picked, mask)  # (N, T)
