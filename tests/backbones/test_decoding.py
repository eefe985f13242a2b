"""Decode engines (p2r.backbones.decoding): the compiled static-cache decode gives plain
``generate``'s greedy tokens and the eager engine's seeded samples, across prompt lengths and
batch sizes, with LoRA and gradient checkpointing on; where it cannot run it falls back, logged.

The compiled tests really compile (about 20-30 s each on a 2-core CPU, once per model and shape);
the others replace ``torch.compile`` by the identity, which runs the same static-cache step
uncompiled, to check the cache, mask and position bookkeeping quickly.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from p2r.algorithms.rollout import generate_groups, prepare_prompts
from p2r.backbones import LoraOptions, TinyQwen2VL, TinyQwen3VL, TinyQwen25VL
from p2r.backbones.attention import cascade_attention
from p2r.backbones.decoding import COMPILING

SIZES = dict(hidden_size=32, num_layers=2, vision_hidden_size=32, seed=3)
NEW_TOKENS = 24


def _clip(seed: int, frames: int = 4, side: int = 56):
    from p2r.data.video import Clip

    rng = np.random.default_rng(seed)
    return Clip(rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8), fps=4.0,
                frame_indices=list(range(0, 2 * frames, 2)), total_frames=2 * frames)


@functools.cache
def _built(cls, lora_and_checkpointing: bool = False):
    """A built tiny backbone in eval mode (rollouts run in eval mode); LoRA adapters made non-zero."""
    extra = dict(lora=LoraOptions(r=4), gradient_checkpointing=True) if lora_and_checkpointing else {}
    backbone = cls(**SIZES, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone.build()
    if lora_and_checkpointing:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in backbone.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return backbone.eval()


def _two_prompts(backbone):
    """Two prompts of different lengths, so the batch is left-padded."""
    questions = ["What colour is the shape?", "Which way does the red square move across the whole frame?"]
    return [backbone.render_prompt(q, "video") for q in questions], [_clip(0), _clip(1)]


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Forget graphs compiled by earlier test modules: dynamo compiles one function for at most
    ``recompile_limit`` (8) shapes and models per process, then runs it uncompiled."""
    torch._dynamo.reset()


@pytest.mark.parametrize("cls, lora", [(TinyQwen25VL, True), (TinyQwen2VL, False), (TinyQwen3VL, False)],
                         ids=["qwen2_5_vl-lora-checkpointing", "qwen2_vl", "qwen3_vl"])
@pytest.mark.slow
def test_compiled_rollouts_equal_generate_greedy_and_eager_sampled(cls, lora):
    backbone = _built(cls, lora)
    texts, clips = _two_prompts(backbone)
    graphs = _graphs()
    greedy = generate_groups(backbone, texts, clips, 3, NEW_TOKENS, temperature=0, engine="compiled")
    assert _graphs() == graphs + 1  # the decode step compiled as one graph (fullgraph)
    assert _prefill(backbone, texts, clips, 3, NEW_TOKENS, "compiled")[1].engine == "compiled"  # no fallback
    for i in range(2):
        reference = backbone.generate([texts[i]], [clips[i]], max_new_tokens=NEW_TOKENS)[0]
        assert greedy.completion_ids[3 * i : 3 * i + 3] == [reference] * 3
    sampled = generate_groups(backbone, texts, clips, 3, NEW_TOKENS, 1.0, 0.95, _generators(5, 6), engine="compiled")
    eager = generate_groups(backbone, texts, clips, 3, NEW_TOKENS, 1.0, 0.95, _generators(5, 6), engine="eager")
    assert _graphs() == graphs + 1  # same shapes: no recompile
    assert sampled.completion_ids == eager.completion_ids
    assert sampled.truncated == eager.truncated
    assert len({tuple(ids) for ids in sampled.completion_ids}) > 1


@pytest.mark.slow
def test_compiled_rollouts_across_prompt_lengths_recompile_once_per_growth():
    backbone = _built(TinyQwen2VL)
    short_texts, short_clips = _two_prompts(backbone)
    long_text = [backbone.render_prompt("Describe every frame of this long video in detail.", "video")]
    long_clip = [_clip(2, frames=16, side=168)]  # 288 vision tokens: more than 256 prompt columns
    runs = [  # (texts, clips, G, new tokens, recompiles expected)
        (short_texts, short_clips, 3, NEW_TOKENS, 0),  # the shape of the test above (compiled there or now)
        (long_text, long_clip, 2, 140, 1),  # 512 prompt, 140 completion columns: the buffers grow, one recompile
        (short_texts[:1], short_clips[:1], 2, NEW_TOKENS, 0),  # fits the grown buffers (spare rows, columns)
        (short_texts, short_clips, 3, NEW_TOKENS, 0),
    ]
    generate_groups(backbone, short_texts, short_clips, 3, NEW_TOKENS, temperature=0, engine="compiled")
    for k, (texts, clips, g, new, recompiles) in enumerate(runs):
        graphs = _graphs()
        compiled = generate_groups(backbone, texts, clips, g, new, 1.0, 0.95, _generators(k, k + 9), engine="compiled")
        eager = generate_groups(backbone, texts, clips, g, new, 1.0, 0.95, _generators(k, k + 9), engine="eager")
        assert compiled.completion_ids == eager.completion_ids, k
        assert _graphs() == graphs + recompiles, k


def _prefill(backbone, texts, clips, group_size, new_tokens, engine):
    batch = prepare_prompts(backbone, texts, clips)
    return backbone.prefill(batch.tensors, batch.position_ids, group_size, new_tokens, engine)


@pytest.mark.slow
def test_static_cache_grows_only_and_spare_rows_do_not_disturb(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the same step, uncompiled
    backbone = TinyQwen25VL(**SIZES)
    backbone.build()
    backbone.eval()
    texts, clips = _two_prompts(backbone)
    long_text = [backbone.render_prompt("Describe every frame of this long video in detail.", "video")]
    long_clip = [_clip(2, frames=16, side=168)]  # 288 vision tokens: more than 256 prompt columns
    sizes = []
    for k, (t, c, g, new) in enumerate([(texts, clips, 4, 20), (texts[1:], clips[1:], 3, 20), (long_text, long_clip, 2, 150),
                                        (texts, clips, 4, 20)]):
        compiled = generate_groups(backbone, t, c, g, new, 1.0, 0.95, _generators(k, 7), engine="compiled")
        eager = generate_groups(backbone, t, c, g, new, 1.0, 0.95, _generators(k, 7), engine="eager")
        assert compiled.completion_ids == eager.completion_ids, k
        greedy = generate_groups(backbone, t, c, g, new, temperature=0, engine="compiled")
        assert greedy.completion_ids == generate_groups(backbone, t, c, g, new, temperature=0).completion_ids, k
        decoder = _prefill(backbone, t, c, g, new, "compiled")[1]
        sizes.append(tuple(decoder.buffers.shape))
    # (prompt slots, group slots, prompt columns, completion columns): a smaller batch or group fits
    # the buffers it finds; prompt columns are a multiple of 256; every size grows, never shrinks
    assert sizes == [(2, 4, 256, 20), (2, 4, 256, 20), (2, 4, 512, 150), (2, 4, 512, 150)]


def test_the_first_compiled_step_says_it_is_compiling_and_how_long_it_took(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the notice, not the compile, is under test
    backbone = _built(TinyQwen25VL)
    texts, clips = _two_prompts(backbone)
    with caplog.at_level(logging.INFO):
        generate_groups(backbone, texts, clips, 2, 4, temperature=0, engine="compiled")
        generate_groups(backbone, texts, clips, 2, 4, temperature=0, engine="compiled")  # the same buffers: compiled already
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(COMPILING) == 1 and "rollout.engine=eager" in COMPILING
    assert sum(m.startswith("rollout decode step compiled in ") for m in messages) == 1


def test_compiled_engine_falls_back_to_eager_where_the_mask_would_be_wrong(monkeypatch, caplog):
    backbone = _built(TinyQwen25VL)
    monkeypatch.setattr(backbone.model.config.get_text_config(), "use_sliding_window", True)
    texts, clips = _two_prompts(backbone)
    with caplog.at_level(logging.WARNING, logger="p2r.backbones.base"):
        decoder = _prefill(backbone, texts, clips, 2, 8, "compiled")[1]
        _prefill(backbone, texts, clips, 2, 8, "compiled")
    assert decoder.engine == "eager"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "sliding" in warnings[0] and "eager" in warnings[0]  # logged once


def test_a_compile_failure_finishes_the_rollout_uncompiled_then_uses_eager(monkeypatch, caplog):
    def failing_compile(fn, **kwargs):
        def run():
            raise RuntimeError("backend says no")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    backbone = TinyQwen25VL(**SIZES)
    backbone.build()
    backbone.eval()
    texts, clips = _two_prompts(backbone)
    with caplog.at_level(logging.WARNING):
        rollout = generate_groups(backbone, texts, clips, 3, 12, 1.0, 0.95, _generators(1, 2), engine="compiled")
        decoder = _prefill(backbone, texts, clips, 3, 12, "compiled")[1]
    eager = generate_groups(backbone, texts, clips, 3, 12, 1.0, 0.95, _generators(1, 2), engine="eager")
    assert rollout.completion_ids == eager.completion_ids  # finished on the static cache, uncompiled
    assert decoder.engine == "eager"
    text = caplog.text
    assert "compiled decoding failed (RuntimeError: backend says no)" in text
    assert "compiling failed earlier" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_attention_equals_attention_over_each_rows_whole_sequence(dtype):
    """Prompt keys stored once per group + each row's own keys = plain attention over every row's
    [its prompt's keys, its own keys], with the prompts' padding and the unwritten columns masked."""
    from transformers.integrations.sdpa_attention import repeat_kv

    gen = torch.Generator().manual_seed(0)
    prompts, group, heads, kv_heads, dim, prefix_len, own_len = 2, 3, 6, 2, 8, 10, 5
    rows = prompts * group
    query = torch.randn(rows, heads, 1, dim, generator=gen)  # 6 query heads over 2 key/value heads
    prefix_keys, prefix_values = (torch.randn(prompts, kv_heads, prefix_len, dim, generator=gen) for _ in range(2))
    keys, values = (torch.randn(rows, kv_heads, own_len, dim, generator=gen) for _ in range(2))
    blocked = torch.finfo(torch.float32).min
    prefix_mask = torch.zeros(prompts, 1, 1, prefix_len)
    prefix_mask[0, ..., :4] = blocked  # prompt 0 is left-padded by 4
    mask = torch.zeros(1, 1, 1, own_len)
    mask[..., 3:] = blocked  # 3 completion columns written so far
    as_dtype = [t.to(dtype) for t in (query, prefix_keys, prefix_values, keys, values)]
    out = cascade_attention(as_dtype[0], as_dtype[1], as_dtype[2], prefix_mask, as_dtype[3], as_dtype[4], mask, 0.3)

    whole_keys = torch.cat([prefix_keys.repeat_interleave(group, 0), keys], 2)  # (rows, kv_heads, 15, dim)
    whole_values = torch.cat([prefix_values.repeat_interleave(group, 0), values], 2)
    whole_mask = torch.cat([prefix_mask.repeat_interleave(group, 0), mask.expand(rows, -1, -1, -1)], -1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(whole_keys, 3), repeat_kv(whole_values, 3), attn_mask=whole_mask, scale=0.3).transpose(1, 2)
    assert out.shape == (rows, 1, heads, dim) and out.dtype == dtype
    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), expected, **tolerance)
    # the padded prompt positions contribute nothing: changing them changes nothing
    prefix_values[0, :, :4] = 1e3
    again = cascade_attention(query, prefix_keys, prefix_values, prefix_mask, keys, values, mask, 0.3)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-6)
