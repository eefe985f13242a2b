"""Prefill and decode steps of a Hugging Face VLM: its KV cache, attention mask and positions.

A rollout prefills B prompts once (left-padded, one forward with the vision tower) and then feeds
one sampled token per row (B x G rows, row i continuing prompt i // G) and step. Two engines do
the steps:

``eager``: Hugging Face's dynamic cache, the prompt's part repeated G times; every step grows the
    2-D attention mask by one column and the cache by concatenation. Works with every attention kernel (flash_attention_2 included),
    quantized layers and any architecture whose forward takes explicit positions.

``compiled``: a static KV cache preallocated for the rollout, and a decode step whose shapes
    never change, compiled once with ``torch.compile`` (on CUDA ``mode="reduce-overhead"``: the
    step replays as one CUDA graph). The cache holds each prompt's keys and values once, read by
    the G rows of its group (:class:`p2r.backbones.attention.SharedPrefix`, cascade attention),
    and each row's generated ones apart. Every per-rollout quantity lives in a preallocated tensor
    that the step reads or updates in place: the next write column, each row's next position, the
    token fed next, the prompts' padding mask. So nothing is specialised on a prompt length, and a
    CUDA graph sees the same input addresses on every replay. The buffers stay allocated on the
    backbone between rollouts (that is what keeps the addresses, and the compiled graph, valid)
    and only grow: prompt columns are rounded up to a multiple of ``CACHE_LENGTH_MULTIPLE``, and a
    smaller batch or group reuses the larger buffers (its spare rows decode padding that nobody
    reads), so a run with prompts of different lengths recompiles once per growth, not once per
    prompt. Memory held between rollouts: layers x 2 x kv_heads x head_dim x (prompts x prompt
    columns + rows x max_new_tokens) elements (Qwen2.5-VL-7B, 1 prompt of 2,048 columns, 8 rows of
    768 tokens, bf16: 0.47 GB, where a copy of the prompt per row would take 1.3 GB).

The compiled engine needs the model to take a custom 4-D additive mask as given and its text
attention to run p2r's kernel (:func:`custom_mask_support`: sdpa or eager attention, no
sliding-window layers; :func:`p2r.backbones.attention.use_group_attention`). Where it cannot,
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
import time
from typing import Any, Literal, NamedTuple, Protocol

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from p2r.backbones.attention import GROUP_KERNELS, SharedPrefix, additive_mask, base_kernel, use_group_attention
from p2r.compat import attention_implementation, mark_static_address

log = logging.getLogger(__name__)

COMPILING = ("compiling the rollout decode step (torch.compile; once per process and cache size: about 20 s on a "
             "quiet CPU, minutes on a loaded one). Rollouts decode 1.7-2x faster afterwards; "
             "--model.init_args.rollout.engine=eager skips compiling")

DecodeEngine = Literal["eager", "compiled"]

# Static cache lengths are rounded up to a multiple of this: prompts of nearby lengths share one
# compiled step; the padding costs at most this many masked key columns per step.
CACHE_LENGTH_MULTIPLE = 256
MASKED_ATTENTION = tuple(GROUP_KERNELS.values())  # the kernels a custom mask (and a p2r kernel) can run over


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
    text = config.get_text_config()
    impl = base_kernel(attention_implementation(text)) or attn_implementation
    if impl not in MASKED_ATTENTION:
        return False, (
            f"attn_implementation={impl!r} cannot take a custom 4-D attention mask (flash_attention_2 takes "
            f"padding masks only, flex_attention a BlockMask); use one of {MASKED_ATTENTION}"
        )
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
    start = next_positions(position_ids)  # (B,)
    axes = position_ids.shape[0] if position_ids.ndim == 3 else 0
    prompt_mask = tensors["attention_mask"]  # (B, P)
    cache = _cache_of(out)
    if static is not None:
        return logits, static.start(model, cache, prompt_mask.bool(), start, axes, group_size, max_new_tokens)
    cache.batch_repeat_interleave(group_size)
    return logits, EagerDecoding(
        model, cache, prompt_mask.repeat_interleave(group_size, 0), start.repeat_interleave(group_size), axes,
    )


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
    """Keys and values of the generated tokens of every layer in preallocated (rows, kv_heads, L, head_dim) tensors.

    The model calls ``update`` once per layer and step; the new column is written at ``write_at``
    in place and the whole buffer is returned (the mask hides what is not written yet). The
    prompts' keys and values are not here but in the :class:`SharedPrefix`, once per prompt. It
    only has what the decoder layers use (``update``): with a 4-D mask and explicit positions the
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


class _Shape(NamedTuple):
    """What the static buffers hold: prompt slots x group slots rows, prompt and completion columns."""

    prompts: int
    group: int
    prefix: int  # prompt columns: the longest prompt, rounded up to CACHE_LENGTH_MULTIPLE
    suffix: int  # completion columns: max_new_tokens

    def covers(self, other: _Shape) -> bool:
        return all(a >= b for a, b in zip(self, other))


class _StaticBuffers:
    """Everything one compiled decode step reads or writes, allocated once for a :class:`_Shape`."""

    def __init__(self, like: list[tuple[torch.Tensor, torch.Tensor]], shape: _Shape, pad_token_id: int) -> None:
        k0 = like[0][0]
        device, self.dtype = k0.device, k0.dtype
        self.shape = shape
        self.layout = [(k.shape[1], k.shape[3], v.shape[3]) for k, v in like]  # (kv_heads, key dim, value dim)
        rows = shape.prompts * shape.group

        def zeros(n: int, length: int, dim: int) -> list[torch.Tensor]:  # per layer (n, kv_heads, length, dim)
            return [torch.zeros(n, layout[0], length, layout[dim], dtype=self.dtype, device=device) for layout in self.layout]

        self.prefix = SharedPrefix(zeros(shape.prompts, shape.prefix, 1), zeros(shape.prompts, shape.prefix, 2),
                                   torch.zeros(shape.prompts, 1, 1, shape.prefix, device=device))
        self.cache = StaticKVCache(zeros(rows, shape.suffix, 1), zeros(rows, shape.suffix, 2),
                                   torch.zeros(1, dtype=torch.long, device=device))
        self.columns = torch.arange(shape.suffix, device=device)  # completion column indices
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # position of the token fed next
        self.tokens = torch.full((rows,), pad_token_id, dtype=torch.long, device=device)  # the token fed next
        # Fixed addresses: CUDA graphs read and update these in place instead of copying them.
        for t in (*self.prefix.keys, *self.prefix.values, self.prefix.mask, *self.cache.keys, *self.cache.values,
                  self.cache.write_at, self.columns, self.positions, self.tokens):
            mark_static_address(t)

    def fits(self, like: list[tuple[torch.Tensor, torch.Tensor]], shape: _Shape) -> bool:
        k0 = like[0][0]
        layout = [(k.shape[1], k.shape[3], v.shape[3]) for k, v in like]
        same = layout == self.layout and k0.dtype == self.dtype and k0.device == self.tokens.device
        return same and self.shape.covers(shape)

    def used(self, t: torch.Tensor, prompts: int, group: int) -> torch.Tensor:
        """The part of a per-row tensor (rows, ...) that B prompts x G completions use, as a (B, G, ...)
        view (row p * group slots + j continues prompt p)."""
        return t.view(self.shape.prompts, self.shape.group, *t.shape[1:])[:prompts, :group]


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
        self.prompts = self.group = 0
        self._compiled = None

    @property
    def engine(self) -> str:
        return "compiled" if self.failure is None else "static cache, uncompiled"

    def start(
        self, model: nn.Module, cache: Any, prompt_mask: torch.Tensor, start: torch.Tensor, axes: int, group_size: int,
        max_new_tokens: int,
    ) -> StaticDecoder:
        """Copy the prefilled cache of B prompts into the shared prefix (once per prompt) and reset the step state.

        ``prompt_mask`` (B, P) bool, ``start`` (B,) the first decode position of each prompt.
        """
        layers = _layers_of(cache)
        prompts, width = prompt_mask.shape
        need = _Shape(prompts, group_size, _round_up(width, CACHE_LENGTH_MULTIPLE), max(max_new_tokens, 1))
        if self.buffers is None or not self.buffers.fits(layers, need):
            if self.buffers is not None:  # grow, never shrink: a later smaller batch reuses these
                need = _Shape(*map(max, need, self.buffers.shape))
            self.buffers = None  # free the old buffers before allocating the new ones
            self.buffers = _StaticBuffers(layers, need, self.pad_token_id)
        b = self.buffers
        # Unused slots are zeroed, not left from the last rollout: a masked column's probability is
        # exactly 0, but 0 x a stale non-finite value would still be NaN.
        for (k, v), prefix_keys, prefix_values in zip(layers, b.prefix.keys, b.prefix.values):
            prefix_keys.zero_()
            prefix_values.zero_()
            prefix_keys[:prompts, :, :width] = k
            prefix_values[:prompts, :, :width] = v
        for t in (*b.cache.keys, *b.cache.values):
            t.zero_()
        b.prefix.mask.fill_(torch.finfo(b.prefix.mask.dtype).min)
        b.prefix.mask[:prompts, 0, 0, :width].masked_fill_(prompt_mask, 0.0)
        b.positions.zero_()
        b.used(b.positions, prompts, group_size).copy_(start[:, None].expand(-1, group_size))
        b.tokens.fill_(self.pad_token_id)
        b.cache.write_at.zero_()
        self.model, self.prompts, self.group, self.axes = model, prompts, group_size, axes
        self.cache_kwarg = cache_argument(model)
        use_group_attention(model)  # shared_prefix reaches attention (p2r.backbones.attention)
        return self

    def _forward(self) -> torch.Tensor:
        """One decode step over every buffer row: attend, write the new keys/values at ``write_at``.

        Idempotent (it only writes column ``write_at``), so a failed compiled call can be rerun
        uncompiled; the caller advances ``write_at`` and the positions afterwards.
        """
        b = self.buffers
        own = additive_mask(b.columns <= b.cache.write_at, torch.float32)  # (Ls,): the columns written so far and now
        out = self.model(
            input_ids=b.tokens[:, None],
            attention_mask=own.expand(b.tokens.shape[0], 1, 1, -1),  # (rows, 1, 1, Ls) additive
            position_ids=_as_position_ids(b.positions, self.axes),
            use_cache=True,
            shared_prefix=b.prefix,
            **{self.cache_kwarg: b.cache},
        )
        return out.logits[:, -1]  # (rows, V)

    def _compiled_step(self):
        if self._compiled is None:
            cuda_graphs = self.buffers.tokens.device.type == "cuda" and not self.sharded
            self._compiled = torch.compile(
                self._forward, fullgraph=not self.sharded, dynamic=False,
                mode="reduce-overhead" if cuda_graphs else None,
            )
        return self._compiled

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.buffers
        b.used(b.tokens, self.prompts, self.group).copy_(tokens.view(self.prompts, self.group))
        logits = None
        if self.failure is None:
            try:
                if b.tokens.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
                first, start = self._compiled is None, time.perf_counter()
                if first:  # a silent wait of minutes on a loaded CPU otherwise
                    rank_zero_info(COMPILING)
                logits = self._compiled_step()()
                if first:
                    rank_zero_info(f"rollout decode step compiled in {time.perf_counter() - start:.0f} s")
            except Exception as err:  # any compile error; a genuine runtime error recurs in the uncompiled step
                self.failure = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                log.warning("compiled decoding failed (%s): this rollout continues uncompiled on the static "
                            "cache, later ones use the eager engine", self.failure)
        if logits is None:
            logits = self._forward()
        b.cache.write_at.add_(1)
        b.positions.add_(1)
        return b.used(logits, self.prompts, self.group).reshape(self.prompts * self.group, -1)  # (N, V)
