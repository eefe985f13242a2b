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
from p2r.backbones.decoding import packed_gqa_attention

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
    long_clip = [_clip(2, frames=16, side=112)]  # 128 vision tokens: prompt + 140 new tokens > 256 columns
    runs = [  # (texts, clips, G, new tokens, recompiles expected)
        (short_texts, short_clips, 3, NEW_TOKENS, 0),  # the shape of the test above (compiled there or now)
        (long_text, long_clip, 2, 140, 1),  # needs 512 columns: the buffers grow, one recompile
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
    long_clip = [_clip(2, frames=16, side=112)]
    sizes = []
    for k, (t, c, g, new) in enumerate([(texts, clips, 4, 20), (texts[1:], clips[1:], 3, 20), (long_text, long_clip, 2, 150),
                                        (texts, clips, 4, 20)]):
        compiled = generate_groups(backbone, t, c, g, new, 1.0, 0.95, _generators(k, 7), engine="compiled")
        eager = generate_groups(backbone, t, c, g, new, 1.0, 0.95, _generators(k, 7), engine="eager")
        assert compiled.completion_ids == eager.completion_ids, k
        greedy = generate_groups(backbone, t, c, g, new, temperature=0, engine="compiled")
        assert greedy.completion_ids == generate_groups(backbone, t, c, g, new, temperature=0).completion_ids, k
        decoder = _prefill(backbone, t, c, g, new, "compiled")[1]
        sizes.append((decoder.buffers.rows, decoder.buffers.length))
    # rows: 8, then 3 fit in 8; columns: a multiple of 256, grown for the long prompt, never shrunk
    assert sizes == [(8, 256), (8, 256), (8, 512), (8, 512)]


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


def test_packed_gqa_attention_equals_repeated_key_value_heads():
    from transformers.integrations.sdpa_attention import repeat_kv

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 6, 1, 8, generator=gen)  # 6 query heads over 2 key/value heads
    key, value = torch.randn(3, 2, 10, 8, generator=gen), torch.randn(3, 2, 10, 8, generator=gen)
    mask = torch.zeros(3, 1, 1, 10).masked_fill(torch.rand(3, 1, 1, 10, generator=gen) < 0.3, torch.finfo(torch.float32).min)
    mask[..., 0] = 0  # every row sees a key
    module = torch.nn.Module()
    out, _ = packed_gqa_attention(module, query, key, value, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=mask, scale=0.3).transpose(1, 2)  # (3, 1, 6, 8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
