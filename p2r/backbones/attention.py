"""Attention for G completions of one prompt: the prompt's keys are read once per group, not per completion.

A GRPO step attends G completions to one long video prompt, twice: decoding them (one new token
per row and step) and scoring them (the shared-prompt training passes,
:mod:`p2r.algorithms.shared_prompt`). Plain attention treats each completion as its own sequence
and so reads, or multiplies against, the prompt's keys and values G times. Two kernels here do not:

``shared_prefix`` (decoding, :func:`cascade_attention`): the prompts' keys and values are stored
    once per prompt (:class:`SharedPrefix`); the G x H / H_kv queries of a group and key/value head
    multiply them as one matrix, the rows' own keys separately, and one float32 softmax runs over
    both score blocks ("cascade" or shared-prefix decoding, as in FlashInfer).
``packed_groups`` (training passes, :func:`packed_group_attention`): a packed row holds a prompt
    and its G completions (:class:`PackedGroups`). The prompt's queries attend causally to the
    prompt; each completion's queries attend to [the prompt's keys, its own keys] in a batch of G.
    A dense mask over the whole row instead computes every completion against every other one and
    throws the scores away: (W + G T)^2 score entries where W^2 / 2 + G T (W + T) are needed
    (Qwen2.5-VL-7B at the paper's shape, W ~ 2,000, G = 8, T = 768: 66 M against 17 M per head).

Both are reached through keyword arguments of the model's forward, which transformers (5.x) hands
down to every attention call: :func:`use_group_attention` makes a built model's text attention
dispatch to ``p2r_sdpa`` (``p2r_eager``), which is exactly transformers' sdpa (eager) function
unless the forward got ``shared_prefix`` or ``packed_groups``. The kernel is set once at build
and never switched around a call: gradient checkpointing recomputes attention during the backward
pass, outside any context a forward could open, with the same keyword arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from p2r.compat import attention_implementation, register_attention_kernel, set_attention_implementation

# transformers' kernel each p2r kernel runs when a call carries none of p2r's keyword arguments.
GROUP_KERNELS = {"p2r_sdpa": "sdpa", "p2r_eager": "eager"}


def base_kernel(name: str | None) -> str | None:
    """transformers' kernel behind ``name`` ("p2r_sdpa" -> "sdpa"); other names unchanged."""
    return GROUP_KERNELS.get(name, name)


def _transformers_kernel(name: str, module: nn.Module):
    """transformers' attention function ``name`` ("sdpa" or "eager") as ``module``'s model calls it."""
    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)  # each model file has its own
    if eager is None:
        raise NotImplementedError(f"{type(module).__module__} defines no eager_attention_forward; use attn_implementation 'sdpa'")
    return eager


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean attention mask: 0 where ``allowed``, the dtype's minimum
    elsewhere (finite, so a score row never turns NaN while it allows one key)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class SharedPrefix:
    """The prompts' keys and values, stored once per prompt and read by the G rows of its group
    (rows p*G .. p*G + G - 1 continue prompt p)."""

    keys: list[torch.Tensor]  # per layer (prompts, kv_heads, Lp, key dim)
    values: list[torch.Tensor]  # per layer (prompts, kv_heads, Lp, value dim)
    mask: torch.Tensor  # (prompts, 1, 1, Lp) float32, additive: 0 on the prompt's tokens, min on padding


def cascade_attention(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_mask: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per row over its prompt's keys, shared by its group, and its own keys.

    query (N, H, 1, D), N = P x G rows, row n continuing prompt n // G; prefix keys/values
    (P, H_kv, Lp, D) with additive ``prefix_mask`` (P, 1, 1, Lp); the rows' own keys/values
    (N, H_kv, Ls, D) with additive ``mask`` (N or 1, 1, 1, Ls). Query head h uses key/value head
    h // (H / H_kv), as transformers' ``repeat_kv`` pairs them. Returns (N, 1, H, D), the layout an
    attention function returns.

    The same as softmax attention over each row's concatenation [prompt keys, own keys]: both
    parts' scores go through one float32 softmax. The prompt part multiplies the G x H / H_kv
    queries of a group and key/value head as one matrix, so a prompt's keys and values are read
    once per group and step instead of once per row; the own part packs the H / H_kv query heads
    of each key/value head, so no key is repeated per head (transformers' sdpa path materialises
    them H / H_kv times under torch.compile with a mask: 7x for Qwen2.5-VL-7B).
    """
    rows, heads, _, dim = query.shape
    prompts, kv_heads, prefix_len, _ = prefix_keys.shape
    group, per_kv = rows // prompts, heads // kv_heads

    def to_groups(x: torch.Tensor) -> torch.Tensor:  # (N, H_kv, g, X) -> (P, H_kv, G * g, X)
        x = x.reshape(prompts, group, kv_heads, per_kv, x.shape[-1]).transpose(1, 2)
        return x.reshape(prompts, kv_heads, group * per_kv, x.shape[-1])

    def to_rows(x: torch.Tensor) -> torch.Tensor:  # (P, H_kv, G * g, X) -> (N, H_kv, g, X)
        x = x.reshape(prompts, kv_heads, group, per_kv, x.shape[-1]).transpose(1, 2)
        return x.reshape(rows, kv_heads, per_kv, x.shape[-1])

    q = query.reshape(rows, kv_heads, per_kv, dim)  # (N, H_kv, g, D)
    shared = torch.matmul(to_groups(q), prefix_keys.transpose(-1, -2)).float() * scale + prefix_mask  # (P, H_kv, G*g, Lp)
    own = torch.matmul(q, keys.transpose(-1, -2)).float() * scale + mask  # (N, H_kv, g, Ls)
    probs = torch.cat([shared, to_groups(own)], -1).softmax(-1).to(values.dtype)  # (P, H_kv, G*g, Lp + Ls)
    shared_probs, own_probs = probs.split([prefix_len, keys.shape[2]], -1)
    out = to_rows(torch.matmul(shared_probs, prefix_values)) + torch.matmul(to_rows(own_probs), values)  # (N, H_kv, g, Dv)
    return out.reshape(rows, 1, heads, values.shape[-1])


@dataclass
class PackedGroups:
    """Where a packed shared-prompt row's parts lie (:mod:`p2r.algorithms.shared_prompt`).

    Each of R rows is [prompt, left-padded to W columns | its G completions packed | padding] of
    L columns. For attention every completion gets T slots (the longest completion in the rows).
    """

    width: int  # W: prompt columns
    group: int  # G: completions per row
    slots: int  # T: slots per completion
    columns: torch.Tensor  # (R, G * T) long: the row column of slot t of completion j (any column where t is past its end)
    sources: torch.Tensor  # (R, L) long: for each column, its output's index in [W prompt outputs, G T slot outputs, one zero]
    prompt_mask: torch.Tensor | None  # (R, 1, W, W) additive, causal over real prompt tokens; None: causal, no padding
    completion_mask: torch.Tensor  # (R * G or 1, 1, T, W + T) additive: the real prompt tokens, then causal over own slots


def packed_group_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: PackedGroups,
    kernel: str,
    **kwargs: Any,
) -> torch.Tensor:
    """Attention over packed rows (R, H, L, D) as two calls of transformers' ``kernel``: the
    prompts' queries over their prompt (R rows), each completion's queries over [its prompt's keys,
    its own keys] (R x G rows). Returns (R, L, H, D), the layout an attention function returns;
    padding columns get zeros. ``kwargs`` (dropout, scaling) go to both calls."""
    inner = _transformers_kernel(kernel, module)
    rows = query.shape[0]
    w, g, t = packed.width, packed.group, packed.slots

    def slots(x: torch.Tensor) -> torch.Tensor:  # (R, h, L, D) -> (R * G, h, T, D): each completion's slots
        index = packed.columns[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])  # (R, h, G * T, D)
        x = x.gather(2, index).view(rows, x.shape[1], g, t, x.shape[3]).transpose(1, 2)
        return x.reshape(rows * g, x.shape[2], t, x.shape[4])

    def with_prompt(x: torch.Tensor) -> torch.Tensor:  # (R, h, L, D) -> (R * G, h, W + T, D)
        prompt = x[:, :, :w].unsqueeze(1).expand(-1, g, -1, -1, -1).reshape(rows * g, x.shape[1], w, x.shape[3])
        return torch.cat([prompt, slots(x)], 2)

    prompt_mask = packed.prompt_mask
    if prompt_mask is None and kernel != "sdpa":  # sdpa runs causally without a mask; eager needs one
        prompt_mask = additive_mask(torch.ones(w, w, dtype=torch.bool, device=query.device).tril(), query.dtype)[None, None]
    prompt_out, _ = inner(module, query[:, :, :w], key[:, :, :w], value[:, :, :w], prompt_mask, **kwargs)  # (R, W, H, D)
    completion_out, _ = inner(module, slots(query), with_prompt(key), with_prompt(value), packed.completion_mask, **kwargs)  # (R*G, T, H, D)
    heads, dim = prompt_out.shape[2:]
    outputs = torch.cat([prompt_out, completion_out.reshape(rows, g * t, heads, dim), prompt_out.new_zeros(rows, 1, heads, dim)], 1)
    return outputs.gather(1, packed.sources[:, :, None, None].expand(-1, -1, heads, dim))  # (R, L, H, D)


def _group_kernel(base: str):
    """The attention function registered as ``p2r_<base>``."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        shared_prefix: SharedPrefix | None = None,
        packed_groups: PackedGroups | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if shared_prefix is not None:  # a static decode step: one new token per row
            layer, scale = module.layer_idx, kwargs.get("scaling") or query.shape[-1] ** -0.5
            out = cascade_attention(query, shared_prefix.keys[layer], shared_prefix.values[layer], shared_prefix.mask,
                                    key, value, attention_mask, scale)
            return out, None
        if packed_groups is not None:  # a shared-prompt training pass
            keep = {k: kwargs[k] for k in ("dropout", "scaling") if k in kwargs}
            return packed_group_attention(module, query, key, value, packed_groups, base, **keep), None
        return _transformers_kernel(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"p2r_{base}_attention"
    return attention


_KERNEL_FUNCTIONS = {name: _group_kernel(base) for name, base in GROUP_KERNELS.items()}  # one object each, always


def use_group_attention(model: nn.Module) -> None:
    """Make ``model``'s text attention dispatch to the p2r kernel over its sdpa or eager kernel
    (other kernels unchanged: they cannot take the custom masks). Idempotent."""
    for name, base in GROUP_KERNELS.items():
        register_attention_kernel(name, _KERNEL_FUNCTIONS[name], base)
    text = model.config.get_text_config()
    current = attention_implementation(text)
    if current in GROUP_KERNELS.values():
        set_attention_implementation(text, f"p2r_{current}")
