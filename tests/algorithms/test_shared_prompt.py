"""Shared-prompt passes: the same log-probs, loss and gradients as the per-sample path, fewer runs.

Tolerance: fp32 log-probs agree within atol 1e-5 (measured: under 1e-6), gradients within 1e-4
of each parameter's largest gradient (measured: under 1e-5). The two paths run the same
arithmetic on differently shaped batches (other matmul blockings, another mask layout), so only
float rounding differs; a completion that leaked into another or positions shifted by one move
log-probs by 1e-4 to 1e-2 on these tiny models, far outside the tolerance.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import p2r.algorithms.rollout as rollout_module
from p2r.algorithms.policy_loss import pagrpo_loss
from p2r.algorithms.rollout import GroupRollout, build_train_batch, completion_logprobs, prepare_prompts
from p2r.algorithms.shared_prompt import packed_groups, shared_prompt_logprobs, supports_shared_prompt
from p2r.backbones.attention import packed_group_attention
from p2r.backbones import LoraOptions, TinyQwen2VL, TinyQwen3VL, TinyQwen25VL
from p2r.data.video import Clip

ATOL = 1e-5
SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1,
             vocab_size=512, seed=1)
# Completion lengths cycled over the samples: a 1-token one and truncated ones (no end token).
LENGTHS = [1, 6, 13, 3, 9, 2, 13, 5]
MAX_NEW = 13


def _clip(seed: int, frames: int, side: int) -> Clip:
    rng = np.random.default_rng(seed)
    return Clip(rng.integers(0, 255, (frames, side, side, 3), dtype=np.uint8), fps=4.0,
                frame_indices=list(range(0, 2 * frames, 2)), total_frames=2 * frames)


@functools.cache
def _build(cls, lora: bool, attn: str = "sdpa", checkpointing: bool = False):
    """A built tiny backbone in eval mode, shared by the tests (none changes its weights)."""
    backbone = cls(**SIZES, attn_implementation=attn, lora=LoraOptions(r=4) if lora else None,
                   gradient_checkpointing=checkpointing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        backbone.build()
    if lora:  # LoRA starts as a no-op (B = 0): give the adapters weights so they change the outputs.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in backbone.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return backbone.eval()  # no LoRA dropout: both paths must see the same weights


def _rollout(backbone, group_size: int) -> GroupRollout:
    """Three prompts of different lengths (question and video size) and G completions each."""
    questions = ["Hi?", "Which way does the red square move across the whole frame, left or right?", "Count them."]
    texts = [backbone.render_prompt(q, "video") for q in questions]
    prompts = prepare_prompts(backbone, texts, [_clip(0, 4, 56), _clip(1, 2, 84), _clip(2, 6, 56)])
    banned = set(backbone.tokenizer.all_special_ids) | set(backbone.media_token_ids) | set(backbone.eos_token_ids)
    vocab = np.array([i for i in range(len(backbone.tokenizer)) if i not in banned])
    rng = np.random.default_rng(group_size)
    end = backbone.eos_token_ids[0]
    completions, truncated = [], []
    for i in range(3 * group_size):
        n = LENGTHS[(i + i // group_size) % len(LENGTHS)]
        ids = rng.choice(vocab, n).tolist()
        completions.append(ids if n == MAX_NEW else ids[:-1] + [end])
        truncated.append(n == MAX_NEW)
    return GroupRollout(prompts, group_size, completions, truncated)


def _rows(prompt_indices: list[int], g: int) -> list[int]:
    return [p * g + j for p in prompt_indices for j in range(g)]


def _assert_same_logprobs(backbone, rollout, prompt_indices, temperature=1.0):
    batch = build_train_batch(backbone, rollout, _rows(prompt_indices, rollout.group_size))
    with torch.no_grad():
        expected = completion_logprobs(backbone, batch, temperature)  # (n, T)
        logp, mask = shared_prompt_logprobs(backbone, rollout, prompt_indices, temperature)
    assert torch.equal(mask, batch.completion_mask)
    assert logp.shape == expected.shape
    torch.testing.assert_close(logp[mask], expected[mask], atol=ATOL, rtol=0)


@pytest.fixture(scope="module", params=[
    (TinyQwen25VL, False), (TinyQwen25VL, True), (TinyQwen2VL, False), (TinyQwen2VL, True),
    (TinyQwen3VL, False), (TinyQwen3VL, True),
], ids=lambda p: f"{p[0].__name__}-{'lora' if p[1] else 'full'}")
def backbone(request):
    return _build(*request.param)


@pytest.mark.parametrize("group_size", [1, 2, 8])
def test_logprobs_equal_per_sample_path(backbone, group_size):
    rollout = _rollout(backbone, group_size)
    for prompt_indices in ([0, 1, 2], [2, 0], [1]):
        _assert_same_logprobs(backbone, rollout, prompt_indices)
    if backbone.lora is not None:  # the reference pass: adapters off
        with backbone.adapters_disabled():
            _assert_same_logprobs(backbone, rollout, [0, 1, 2])


def test_temperature_and_eager_attention():
    backbone = _build(TinyQwen25VL, lora=False, attn="eager")  # eager adds the mask to the scores
    assert supports_shared_prompt(backbone)[0]
    rollout = _rollout(backbone, 2)
    _assert_same_logprobs(backbone, rollout, [0, 1, 2], temperature=0.7)
    _assert_same_logprobs(backbone, rollout, [1])  # one prompt, no padding: eager gets a causal mask made for it


def _loss_and_grads(backbone, rollout, micro_batches, logprobs_of, seed=0):
    """Sum over micro-batches of the PA-GRPO loss (weighted by rows) and the parameters' gradients."""
    backbone.model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    n_all = sum(len(m) for m in micro_batches) * rollout.group_size
    total = 0.0
    for prompt_indices in micro_batches:
        logp, mask = logprobs_of(prompt_indices)  # (n, T)
        adv = torch.randn(logp.shape[0], 1, generator=gen).expand_as(logp)  # (n, T)
        ref = logp.detach() + 0.1 * torch.randn(logp.shape, generator=gen)  # (n, T)
        perception = torch.rand(logp.shape, generator=gen) < 0.4  # (n, T)
        loss, _ = pagrpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.04, eps_low=0.2,
                              mode="process_mean", perception_mask=perception, group_size=rollout.group_size)
        weighted = loss * logp.shape[0] / n_all
        weighted.backward()
        total += float(weighted.detach())
    grads = {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None}
    backbone.model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("lora, checkpointing", [(False, False), (True, False), (False, True)],
                         ids=["full", "lora", "full-checkpointing"])
def test_pagrpo_loss_and_gradients_match(lora, checkpointing):
    """With gradient checkpointing (train mode, so it is on) the backward recomputes attention
    outside the forward: the packed kernel must run there too."""
    backbone = _build(TinyQwen25VL, lora, checkpointing=checkpointing)
    rollout = _rollout(backbone, 8)
    micro = [[0, 2], [1]]

    def per_sample(prompt_indices):
        batch = build_train_batch(backbone, rollout, _rows(prompt_indices, 8))
        return completion_logprobs(backbone, batch), batch.completion_mask

    backbone.train(checkpointing)  # no dropout anywhere in the tiny model: train mode changes nothing else
    try:
        expected_loss, expected = _loss_and_grads(backbone, rollout, micro, per_sample)
        loss, grads = _loss_and_grads(backbone, rollout, micro, lambda p: shared_prompt_logprobs(backbone, rollout, p))
    finally:
        backbone.eval()
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():  # within 1e-4 of each gradient's scale (measured: under 1e-5)
        error, scale = float((grad - expected[name]).abs().max()), float(expected[name].abs().max())
        assert error <= 1e-4 * scale + 1e-9, (name, error, scale)
    visual = [n for n in grads if ".visual." in n]
    if lora:
        assert not visual and all("lora_" in n for n in grads)
    else:  # the vision tower trains: its gradient flows through the one shared prompt
        assert visual and any(grads[n].abs().sum() > 0 for n in visual)


def test_vision_encoder_once_per_prompt_and_one_forward_per_micro_batch():
    backbone = _build(TinyQwen25VL, lora=False)
    rollout = _rollout(backbone, 8)
    videos, forwards = [], []
    h1 = backbone.vision_tower(backbone.model).register_forward_hook(
        lambda m, args, kwargs, out: videos.append(len(kwargs["grid_thw"])), with_kwargs=True)
    h2 = backbone.model.register_forward_hook(
        lambda m, args, kwargs, out: forwards.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        with torch.no_grad():
            shared_prompt_logprobs(backbone, rollout, [0, 1])
            shared_prompt_logprobs(backbone, rollout, [2])
    finally:
        h1.remove()
        h2.remove()
    assert videos == [2, 1]  # one vision call per micro-batch, one video per prompt (not G per prompt)
    assert [rows for rows, _ in forwards] == [2, 1]  # one forward per micro-batch, one row per prompt


def _hand_worked_layout(dtype=torch.float32):
    # columns: left pad, prompt, prompt, completion 0 (2 tokens), completion 1 (1 token), right pad
    return packed_groups([2], [[0, 2]], [[2, 1]], width=3, length=7, dtype=dtype, device=torch.device("cpu"))


def test_packed_layout_hand_worked():
    packed = _hand_worked_layout()
    assert (packed.width, packed.group, packed.slots) == (3, 2, 2)
    assert packed.columns.tolist() == [[3, 4, 5, 2]]  # completion 1's unused slot: the last prompt column
    assert packed.sources.tolist() == [[0, 1, 2, 3, 4, 5, 7]]  # prompt outputs, slots 0, 1, 2, the zero output
    assert (packed.prompt_mask[0, 0] == 0).int().tolist() == [
        [1, 0, 0],  # padding sees itself only: no empty row
        [0, 1, 0],  # prompt: causal over the prompt, never the padding
        [0, 1, 1],
    ]
    assert (packed.completion_mask[0, 0] == 0).int().tolist() == [
        [0, 1, 1, 1, 0],  # slot 0: the real prompt tokens, then itself
        [0, 1, 1, 1, 1],  # slot 1: and slot 0
    ]
    blocked = _hand_worked_layout(torch.bfloat16).completion_mask
    assert blocked.dtype == torch.bfloat16 and blocked.min() == torch.finfo(torch.bfloat16).min
    # no padding: the prompt part is plain causal attention (sdpa's is_causal)
    assert packed_groups([3], [[0, 2]], [[2, 1]], width=3, length=7, dtype=torch.float32, device=torch.device("cpu")).prompt_mask is None


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_group_attention_equals_dense_masked_attention(kernel):
    """Two packed rows (one left-padded), G = 2: every real column's output equals attention over
    the whole row under the dense mask it replaces (prompt causal; a completion sees the prompt and
    itself causally, never the other completion)."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    packed = packed_groups([2, 3], [[0, 2], [0, 1]], [[2, 1], [1, 3]], width=3, length=8, dtype=torch.float32,
                           device=torch.device("cpu"))
    segments = torch.tensor([[-1, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 1, 2, 2, 2, -1]])  # -1 padding, 0 prompt, j + 1 completion j
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed = causal & ((segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :])  # (R, L, L)
    allowed &= (segments >= 0)[:, None, :] | torch.eye(8, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 8, 8, generator=gen)  # (R, H, L, D): 4 query heads over 2 key/value heads
    key, value = torch.randn(2, 2, 8, 8, generator=gen), torch.randn(2, 2, 8, 8, generator=gen)
    module = modeling_qwen2_5_vl.Qwen2_5_VLAttention.__new__(modeling_qwen2_5_vl.Qwen2_5_VLAttention)
    torch.nn.Module.__init__(module)
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    out = packed_group_attention(module, query, key, value, packed, kernel, scaling=0.3)  # (R, L, H, D)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 2), repeat_kv(value, 2), attn_mask=allowed[:, None], scale=0.3).transpose(1, 2)
    real = segments >= 0
    torch.testing.assert_close(out[real], expected[real], atol=1e-6, rtol=1e-6)
    assert out[0, 6:].abs().sum() == 0 and out[1, 7].abs().sum() == 0  # right padding reads the zero output


def test_supports_shared_prompt_refuses_what_cannot_take_the_mask(monkeypatch):
    backbone = _build(TinyQwen25VL, lora=False)
    ok, reason = supports_shared_prompt(backbone)
    assert ok and "qwen2_5_vl" in reason
    config = backbone.model.config
    monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
    ok, reason = supports_shared_prompt(backbone)
    assert not ok and "flash_attention_2" in reason and "shared_prompt: false" in reason
    monkeypatch.undo()
    monkeypatch.setattr(config, "model_type", "llava_onevision")
    ok, reason = supports_shared_prompt(backbone)
    assert not ok and "llava_onevision" in reason
    monkeypatch.undo()
    monkeypatch.setattr(config.get_text_config(), "use_sliding_window", True)
    ok, reason = supports_shared_prompt(backbone)
    assert not ok and "sliding" in reason
    with pytest.raises(RuntimeError, match="built"):
        supports_shared_prompt(TinyQwen25VL(**SIZES))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_lm_head_gives_the_unchunked_loss_and_gradients(lora, monkeypatch):
    """Both paths, policy (gradients) and reference (no gradients, adapters off): a chunk of 5
    tokens gives what one chunk of every token gives, and the head never sees more than 5."""
    backbone = _build(TinyQwen25VL, lora)
    rollout = _rollout(backbone, 8)
    micro = [[0, 2], [1]]

    def per_sample(chunk):
        def logprobs_of(prompt_indices):
            batch = build_train_batch(backbone, rollout, _rows(prompt_indices, 8))
            return completion_logprobs(backbone, batch, chunk_tokens=chunk), batch.completion_mask
        return logprobs_of

    def shared(chunk):
        return lambda prompt_indices: shared_prompt_logprobs(backbone, rollout, prompt_indices, chunk_tokens=chunk)

    for path in (per_sample, shared):
        expected_loss, expected = _loss_and_grads(backbone, rollout, micro, path(10**6))
        shapes, chunks = [], []
        original = rollout_module._chunk_logprobs
        monkeypatch.setattr(rollout_module, "_chunk_logprobs", lambda head, h, *a: chunks.append(len(h)) or original(head, h, *a))
        head = backbone.model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[:-1])))
        try:
            loss, grads = _loss_and_grads(backbone, rollout, micro, path(5))
        finally:
            hook.remove()
            monkeypatch.undo()
        assert loss == pytest.approx(expected_loss, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6 + 1e-5 * float(expected[name].abs().max()), rtol=0)
        # the model's forwards ask the head for one column per row (R, 1); the chunks for at most 5 positions,
        # each once in the forward and once more when the backward recomputes it
        assert shapes and {s[1] for s in shapes} == {1}
        assert max(chunks) == 5 and sum(chunks) == 2 * sum(len(c) for c in rollout.completion_ids)
        if lora:
            with torch.no_grad(), backbone.adapters_disabled():
                reference = [path(5)(p)[0] for p in micro]
                whole = [path(10**6)(p)[0] for p in micro]
            for a, b in zip(reference, whole):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
