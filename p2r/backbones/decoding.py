"""Prefill and decode steps of a Hugging Face VLM: its KV cache, attention mask and positions.

A rollout prefills B prompts once (left-padded, one forward with the vision tower), repeats the
KV cache G times and then feeds one sampled token per row and step. Two engines do the steps:

``eager``: Hugging Face's dynamic cache; every step grows the 2-D attention mask by one column and
    the cache by concatenation. Works with every attention kernel (flash_attention_2 included),
    quantized layers and any architecture whose forward takes explicit positions.

``compiled``: a static KV cache preallocated for prompt + max_new_tokens, and a decode step whose
    shapes never change, compiled once with ``torch.compile`` (on CUDA ``mode="reduce-overhead"``:
    the step replays as one CUDA graph). Every per-rollout quantity lives in a preallocated tensor
    that the step reads or updates in place: the next write column, each row's next position, the
    keys each row may attend to (a boolean (N, L) buffer, turned into an additive 4-D mask inside
    the step). So nothing is specialised on a prompt length, and a CUDA graph sees the same input
    addresses on every replay. The buffers stay allocated on the backbone between rollouts (that is
    what keeps the addresses, and the compiled graph, valid) and only grow: the cache length is
    rounded up to a multiple of ``CACHE_LENGTH_MULTIPLE`` and a smaller batch reuses the larger
    buffers (its spare rows decode padding that nobody reads), so a run with prompts of different
    lengths recompiles once per growth, not once per prompt. Memory held between rollouts: layers x
    2 x rows x kv_heads x cache length x head_dim elements (Qwen2.5-VL-7B, 8 rows, 2,816 columns in
    bf16: 1.3 GB).

The compiled engine needs the model to take a custom 4-D additive mask as given
(:func:`custom_mask_support`: sdpa or eager attention, no sliding-window layers). Where it cannot,
the eager engine runs and the reason is logged once. Where compiling fails (an operation dynamo
cannot trace, a backend error), the step runs uncompiled on the same static cache for the rest
of that rollout and later rollouts use the eager engine; the reason is logged once. An FSDP2-
sharded model (rollouts inside :func:`p2r.strategies.gathered`) compiles with graph breaks at the
FSDP hooks (``fullgraph=False``) and without CUDA graphs, since FSDP2 may reallocate the gathered
parameters between rollouts, which would make every rollout record new graphs.

Both engines feed the same positions (last prompt position + 1, + 2, ...; mrope: the same value
on every axis) and mask out the prompts' left padding, so they compute the same logits up to
float rounding.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Literal, Protocol

import torch
from torch import nn

from p2r.compat import (
    attention_implementation,
    attention_implementation_as,
    mark_static_address,
    register_attention_function,
)

log = logging.getLogger(__name__)

DecodeEngine = Literal["eager", "compiled"]

# Static cache lengths are rounded up to a multiple of this: prompts of nearby lengths share one
# compiled step; the padding costs at most this many masked key columns per step.
CACHE_LENGTH_MULTIPLE = 256
MASKED_ATTENTION = ("sdpa", "eager")


class Decoding(Protocol):
    """One rollout's decoder, after the prefill."""

    engine: str  # what runs the steps: "eager", "compiled", or after a compile failure "static cache, uncompiled"

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens just sampled (N,) and return the logits (N, V) for the next position."""
        ...


def custom_mask_support(model: nn.Module, attn_implementation: str) -> tuple[bool, str]:
    """Whether ``model`` passes a custom additive 4-D mask (B, 1, Lq, Lk) to attention as given.

    transformers 5.x hands a 4-D ``attention_mask`` through untouched; sdpa takes it as is and
    eager attention adds it to the scores. flash_attention_2 takes padding masks only and
    flex_attention a BlockMask; sliding-window layers would lose their window under such a mask.
    """
    config = model.config
    impl = attention_implementation(config) or attn_implementation
    if impl not in MASKED_ATTENTION:
        return False, (
            f"attn_implementation={impl!r} cannot take a custom 4-D attention mask (flash_attention_2 takes "
            f"padding masks only, flex_attention a BlockMask); use one of {MASKED_ATTENTION}"
        )
    text = config.get_text_config()
    if getattr(text, "use_sliding_window", False) or "sliding_attention" in (getattr(text, "layer_types", None) or []):
        return False, "sliding-window attention layers would lose their window under a custom 4-D mask"
    return True, f"{config.model_type} with {impl} attention takes a custom 4-D mask"


def cache_argument(model: nn.Module) -> str:
    """Name of the forward argument that takes a KV cache (renamed ``cache`` in transformers 5.2x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def next_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Position of the first generated token per prompt (B,): last prompt position + 1.

    ``position_ids`` (3, B, P) mrope or (B, P); left padding puts every prompt's end in the last
    column, and the largest mrope axis there is where text continues.
    """
    last = position_ids[..., -1]  # (3, B) or (B,)
    return (last.max(0).values if last.ndim == 2 else last) + 1


def _as_position_ids(positions: torch.Tensor, axes: int) -> torch.Tensor:
    """(N,) positions as the model's decode ``position_ids``: (axes, N, 1) mrope, (N, 1) when axes is 0."""
    column = positions.view(-1, 1)  # (N, 1)
    return column.unsqueeze(0).expand(axes, -1, -1) if axes else column


def prefill(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    position_ids: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    static: StaticDecoder | None,
) -> tuple[torch.Tensor, Decoding]:
    """Prefill the B prompts once and return the first logits (B*G, V) and the decoder of the B*G rows.

    ``static``: the backbone's static decoder for the compiled engine; None runs the eager one.
    Row i of the result continues prompt i // G.
    """
    out = model(**tensors, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # (N, V)
    start = next_positions(position_ids).repeat_interleave(group_size)  # (N,)
    axes = position_ids.shape[0] if position_ids.ndim == 3 else 0
    prompt_mask = tensors["attention_mask"].repeat_interleave(group_size, 0)  # (N, P)
    cache = _cache_of(out)
    if static is not None:
        return logits, static.start(model, cache, prompt_mask.bool(), start, axes, group_size, max_new_tokens)
    cache.batch_repeat_interleave(group_size)
    return logits, EagerDecoding(model, cache, prompt_mask, start, axes)


class EagerDecoding:
    """Decode steps on Hugging Face's dynamic cache, the 2-D mask growing one column per step."""

    engine = "eager"

    def __init__(self, model: nn.Module, cache: Any, prompt_mask: torch.Tensor, start: torch.Tensor, axes: int) -> None:
        self.model = model
        self.cache = cache
        self.attention_mask = prompt_mask  # (N, P + steps)
        self.positions = start  # (N,) position of the token fed next
        self.axes = axes
        self.cache_kwarg = cache_argument(model)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], 1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=_as_position_ids(self.positions, self.axes),
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = _cache_of(out)
        self.positions = self.positions + 1
        return out.logits[:, -1]  # (N, V)


class StaticKVCache:
    """Keys and values of every layer in preallocated (rows, kv_heads, L, head_dim) tensors.

    The model calls ``update`` once per layer and step; the new column is written at ``write_at``
    in place and the whole buffer is returned (the mask hides what is not written yet). It only
    has what the decoder layers use (``update``): with a 4-D mask and explicit positions the
    model asks a cache for nothing else.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.write_at = write_at  # (1,) long

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.keys[layer_idx].index_copy_(2, self.write_at, key_states)  # (rows, kv_heads, L, head_dim)
        self.values[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


PACKED_GQA_ATTENTION = "p2r_packed_gqa_decode"


def packed_gqa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa for one query token per row with the query heads of each key/value head packed together.

    query (N, H, 1, D) -> (N, H_kv, H / H_kv, D) (query head h uses key/value head h // (H / H_kv),
    as transformers' ``repeat_kv`` pairs them), keys/values (N, H_kv, L, D), mask (N, 1, 1, L)
    shared by all heads: the keys and values are read once per step. transformers' own sdpa path does this only when
    not compiling; under torch.compile with a mask it materialises the keys and values H / H_kv
    times (7x for Qwen2.5-VL-7B), which would make a decode step read several times the cache.
    Other query lengths go to transformers' sdpa function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # (N, H_kv, H / H_kv, D)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None  # (N, 1, H, D)


class _StaticBuffers:
    """Everything one compiled decode step reads or writes, allocated once for (rows, length)."""

    def __init__(self, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, length: int, pad_token_id: int) -> None:
        k0 = like[0][0]
        device, self.dtype = k0.device, k0.dtype
        self.rows, self.length = rows, length
        self.layout = [(k.shape[1], k.shape[3], v.shape[3]) for k, v in like]  # (kv_heads, key dim, value dim)
        keys = [torch.zeros(rows, h, length, dk, dtype=self.dtype, device=device) for h, dk, _ in self.layout]
        values = [torch.zeros(rows, h, length, dv, dtype=self.dtype, device=device) for h, _, dv in self.layout]
        self.allowed = torch.zeros(rows, length, dtype=torch.bool, device=device)  # keys each row may see
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # position of the token fed next
        self.tokens = torch.full((rows,), pad_token_id, dtype=torch.long, device=device)  # the token fed next
        self.cache = StaticKVCache(keys, values, torch.zeros(1, dtype=torch.long, device=device))
        # Fixed addresses: CUDA graphs read and update these in place instead of copying them.
        for t in (*keys, *values, self.allowed, self.positions, self.tokens, self.cache.write_at):
            mark_static_address(t)

    def fits(self, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, length: int) -> bool:
        k0 = like[0][0]
        layout = [(k.shape[1], k.shape[3], v.shape[3]) for k, v in like]
        same = layout == self.layout and k0.dtype == self.dtype and k0.device == self.allowed.device
        return same and rows <= self.rows and length <= self.length


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a filled Hugging Face dynamic cache, each (B, kv_heads, P, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StaticDecoder:
    """The compiled engine's state on a backbone: static buffers and the compiled step, kept
    between rollouts (see the module docstring); one rollout at a time."""

    def __init__(self, pad_token_id: int, sharded: bool) -> None:
        """
        Args:
            pad_token_id: Token fed to spare rows.
            sharded: The model is FSDP2-sharded: compile with graph breaks at its hooks, no CUDA graphs.
        """
        self.pad_token_id = pad_token_id
        self.sharded = sharded
        self.failure: str | None = None  # why compiling failed; later rollouts then use the eager engine
        self.buffers: _StaticBuffers | None = None
        self.model: nn.Module | None = None
        self.rows = 0
        self._compiled = None

    @property
    def engine(self) -> str:
        return "compiled" if self.failure is None else "static cache, uncompiled"

    def start(
        self, model: nn.Module, cache: Any, prompt_mask: torch.Tensor, start: torch.Tensor, axes: int, group_size: int,
        max_new_tokens: int,
    ) -> StaticDecoder:
        """Copy the prefilled cache of B prompts into rows 0..N-1 (each prompt G times) and reset the step state.

        ``prompt_mask`` (N, P) bool, ``start`` (N,) the first decode position of each row.
        """
        layers = _layers_of(cache)
        rows, width = prompt_mask.shape
        length = _round_up(width + max_new_tokens, CACHE_LENGTH_MULTIPLE)
        if self.buffers is None or not self.buffers.fits(layers, rows, length):
            if self.buffers is not None:  # grow, never shrink: a later smaller batch reuses these
                rows, length = max(rows, self.buffers.rows), max(length, self.buffers.length)
            self.buffers = None  # free the old buffers before allocating the new ones
            self.buffers = _StaticBuffers(layers, rows, length, self.pad_token_id)
        rows = prompt_mask.shape[0]
        b = self.buffers
        for (k, v), keys, values in zip(layers, b.cache.keys, b.cache.values):
            keys.zero_()
            values.zero_()
            keys[:rows, :, :width] = k.repeat_interleave(group_size, 0)
            values[:rows, :, :width] = v.repeat_interleave(group_size, 0)
        b.allowed.zero_()
        b.allowed[:rows, :width] = prompt_mask
        b.positions.zero_()
        b.positions[:rows] = start
        b.tokens.fill_(self.pad_token_id)
        b.cache.write_at.fill_(width)
        self.model, self.rows, self.axes = model, rows, axes
        self.cache_kwarg = cache_argument(model)
        self.text_config = model.config.get_text_config()
        self.attention = PACKED_GQA_ATTENTION if attention_implementation(self.text_config) == "sdpa" else None
        if self.attention is not None:
            register_attention_function(PACKED_GQA_ATTENTION, packed_gqa_attention)
        return self

    def _forward(self) -> torch.Tensor:
        """One decode step over every buffer row: attend, write the new keys/values at ``write_at``.

        Idempotent (it only writes column ``write_at``), so a failed compiled call can be rerun
        uncompiled; the caller advances ``write_at`` and the positions afterwards.
        """
        b = self.buffers
        b.allowed.index_fill_(1, b.cache.write_at, True)  # (rows, L): each row now sees the token it is fed
        blocked = torch.finfo(b.dtype).min
        mask = torch.zeros(b.allowed.shape, dtype=b.dtype, device=b.allowed.device).masked_fill(~b.allowed, blocked)
        out = self.model(
            input_ids=b.tokens[:, None],
            attention_mask=mask[:, None, None, :],  # (rows, 1, 1, L) additive
            position_ids=_as_position_ids(b.positions, self.axes),
            use_cache=True,
            **{self.cache_kwarg: b.cache},
        )
        return out.logits[:, -1]  # (rows, V)

    def _compiled_step(self):
        if self._compiled is None:
            cuda_graphs = self.buffers.allowed.device.type == "cuda" and not self.sharded
            self._compiled = torch.compile(
                self._forward, fullgraph=not self.sharded, dynamic=False,
                mode="reduce-overhead" if cuda_graphs else None,
            )
        return self._compiled

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.buffers
        b.tokens[: self.rows].copy_(tokens)
        logits = None
        with attention_implementation_as(self.text_config, self.attention):
            if self.failure is None:
                try:
                    if b.allowed.device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
                    logits = self._compiled_step()()
                except Exception as err:  # any compile error; a genuine runtime error recurs in the uncompiled step
                    self.failure = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                    log.warning("compiled decoding failed (%s): this rollout continues uncompiled on the static "
                                "cache, later ones use the eager engine", self.failure)
            if logits is None:
                logits = self._forward()
        b.cache.write_at.add_(1)
        b.positions.add_(1)
        return logits[: self.rows]  # (N, V)
