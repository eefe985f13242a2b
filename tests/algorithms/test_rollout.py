"""Group rollouts: one prefill per prompt, exact greedy equivalence, masks and log-probs (chunked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import p2r.algorithms.rollout as rollout_module
from p2r.algorithms.rollout import (
    build_train_batch,
    completion_logprobs,
    generate_groups,
    perception_masks,
    sample_next_token,
    token_logprobs,
    token_offsets,
)
from p2r.backbones import TinyQwen25VL
from p2r.data.video import Clip


@pytest.fixture(scope="module")
def backbone():
    b = TinyQwen25VL(hidden_size=32, num_layers=2, vision_hidden_size=32, seed=3)
    b.build()
    b.model.eval()
    return b


def _clip(seed: int, frames: int = 4) -> Clip:
    rng = np.random.default_rng(seed)
    return Clip(rng.integers(0, 255, (frames, 56, 56, 3), dtype=np.uint8), fps=4.0,
                frame_indices=list(range(0, 2 * frames, 2)), total_frames=2 * frames)


@pytest.fixture(scope="module")
def prompts(backbone):
    # Different lengths, so the batched prefill really left-pads.
    texts = ["What colour is the shape?", "Which way does the red square move across the whole frame?"]
    return [backbone.render_prompt(t, "video") for t in texts], [_clip(0), _clip(1)]


def test_greedy_group_rollouts_equal_plain_generate(backbone, prompts):
    texts, clips = prompts
    rollout = generate_groups(backbone, texts, clips, group_size=3, max_new_tokens=12, temperature=0)
    assert len(rollout.completion_ids) == 6
    for i in range(2):
        reference = backbone.generate([texts[i]], [clips[i]], max_new_tokens=12)[0]
        for j in range(3):
            assert rollout.completion_ids[3 * i + j] == reference


def test_video_encoded_once_and_prompt_prefilled_once(backbone, prompts):
    texts, clips = prompts
    visual = backbone.vision_tower(backbone.model)
    videos_encoded, forward_lengths = [], []
    h1 = visual.register_forward_hook(lambda m, args, kwargs, out: videos_encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)
    h2 = backbone.model.register_forward_hook(
        lambda m, args, kwargs, out: forward_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        rollout = generate_groups(backbone, texts, clips, group_size=8, max_new_tokens=6, temperature=1.0, top_p=0.95,
                                  generator=torch.Generator().manual_seed(0))
    finally:
        h1.remove()
        h2.remove()
    assert videos_encoded == [2]  # one vision-encoder call for the B=2 videos, not B*G=16
    prefills = [n for n in forward_lengths if n > 1]
    assert len(prefills) == 1  # the two prompts prefilled once, together
    assert all(n == 1 for n in forward_lengths[1:])  # every other call decodes one token per row
    assert len(rollout.completion_ids) == 16


def test_truncation_and_end_tokens(backbone, prompts):
    texts, clips = prompts
    rollout = generate_groups(backbone, texts, clips, group_size=2, max_new_tokens=3, temperature=1.0,
                              generator=torch.Generator().manual_seed(1))
    eos = set(backbone.eos_token_ids)
    for ids, cut in zip(rollout.completion_ids, rollout.truncated):
        if cut:
            assert len(ids) == 3 and not eos & set(ids)
        else:
            assert ids[-1] in eos and not eos & set(ids[:-1])
    media = set(backbone.media_token_ids)
    assert media and not any(media & set(ids) for ids in rollout.completion_ids)


def test_seeded_sampling_is_reproducible(backbone, prompts):
    texts, clips = prompts
    runs = [generate_groups(backbone, texts, clips, 4, 8, 1.0, 0.95, torch.Generator().manual_seed(7)).completion_ids
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(ids) for ids in runs[0]}) > 1  # temperature 1 samples differ within a group


def test_sample_next_token_nucleus_greedy_and_suppress():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    # top_p 0.6: tokens 0 (mass before 0) and 1 (mass before 0.5 < 0.6) stay; token 2 (0.8 >= 0.6) goes.
    draws = {int(sample_next_token(logits, 1.0, 0.6, gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next_token(logits, 0.0, 1.0, None)) == 0
    assert int(sample_next_token(logits, 0.0, 1.0, None, suppress=torch.tensor([0]))) == 1
    draws = {int(sample_next_token(logits, 1.0, 1.0, gen, suppress=torch.tensor([1]))) for _ in range(200)}
    assert draws == {0, 2}


def test_token_offsets_and_perception_masks(backbone):
    tok = backbone.tokenizer
    text = "<observation>a red circle</observation>\n<think>so red</think><answer>A</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    decoded, offsets = token_offsets(tok, ids)
    assert decoded == text
    assert offsets[-1][0] == offsets[-1][1] == len(text)  # the end token decodes to nothing
    texts, masks = perception_masks(tok, [ids])
    perception_end = len("<observation>a red circle</observation>")
    expected = [start < perception_end for start, _ in offsets[:-1]] + [False]
    assert masks[0] == expected
    assert any(masks[0]) and not all(masks[0])


def test_train_batch_logprobs_equal_per_sample_forward(backbone, prompts):
    texts, clips = prompts
    rollout = generate_groups(backbone, texts, clips, group_size=2, max_new_tokens=7, temperature=1.0,
                              generator=torch.Generator().manual_seed(3))
    batch = build_train_batch(backbone, rollout, list(range(4)))
    logp = completion_logprobs(backbone, batch)  # (4, T)
    for i in range(4):
        prompt = rollout.prompts.items[i // 2]
        ids = torch.cat([prompt["input_ids"][0], torch.tensor(rollout.completion_ids[i])])[None]
        inputs = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        types = torch.cat([prompt["mm_token_type_ids"][0], torch.zeros(len(rollout.completion_ids[i]), dtype=torch.long)])
        with torch.no_grad():
            logits = backbone.model(input_ids=ids, mm_token_type_ids=types[None], **inputs).logits[0]
        p = prompt["input_ids"].shape[1]
        expected = torch.log_softmax(logits[p - 1 : -1].float(), -1).gather(-1, ids[0, p:, None]).squeeze(-1)
        n = len(rollout.completion_ids[i])
        assert batch.completion_mask[i].sum() == n
        torch.testing.assert_close(logp[i, :n], expected, atol=1e-5, rtol=1e-5)


def test_per_prompt_generators_make_a_group_independent_of_its_batch(backbone, prompts):
    """What FSDP/DDP parity rests on: prompt 1 alone (rank 1) samples what it samples beside prompt 0."""
    texts, clips = prompts
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = generate_groups(backbone, texts, clips, 4, 10, 1.0, 0.95, gens(11, 12)).completion_ids
    alone = generate_groups(backbone, texts[1:], clips[1:], 4, 10, 1.0, 0.95, gens(12)).completion_ids
    assert together[4:] == alone
    other_seed = generate_groups(backbone, texts[1:], clips[1:], 4, 10, 1.0, 0.95, gens(13)).completion_ids
    assert other_seed != alone


def test_sampling_draws_what_multinomial_draws_from_the_same_seed():
    probs_logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    for top_p in (1.0, 0.9):
        ours, theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        for _ in range(5):
            tokens = sample_next_token(probs_logits, 0.8, top_p, ours)
            probs = torch.softmax(probs_logits / 0.8, -1)
            if top_p < 1:
                sorted_p, order = probs.sort(-1, descending=True)
                sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            assert torch.equal(tokens, torch.multinomial(probs, 1, generator=theirs).squeeze(-1))


class _RowCounter:
    """Records how many positions (rows of logits) each call of a head computes."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self.handle = head.register_forward_hook(lambda m, args, out: self.rows.append(out.shape[:-1].numel()))


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_token_logprobs_chunked_equal_the_whole_log_softmax_with_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 8, generator=gen))
    hidden = torch.randn(13, 8, generator=gen, requires_grad=True)
    ids = torch.randint(0, 50, (13,), generator=gen)
    weights = torch.randn(13, generator=gen)

    expected = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, ids[:, None]).squeeze(-1)  # (13,)
    (expected * weights).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None

    counter = _RowCounter(head)
    got = token_logprobs(hidden, head, ids, 0.7, chunk)
    (got * weights).sum().backward()
    counter.handle.remove()
    # the same arithmetic on other matrix shapes: equal up to fp32 rounding
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, grads[1], atol=1e-5, rtol=1e-5)
    chunks = -(-13 // chunk)
    assert len(counter.rows) == 2 * chunks  # each chunk computed in the forward and again in the backward
    assert max(counter.rows) == min(chunk, 13)  # never more than one chunk of logits at once


def test_completion_logprobs_chunked_never_hold_more_than_a_chunk_of_logits(backbone, prompts, monkeypatch):
    texts, clips = prompts
    rollout = generate_groups(backbone, texts, clips, group_size=2, max_new_tokens=7, temperature=1.0,
                              generator=torch.Generator().manual_seed(3))
    batch = build_train_batch(backbone, rollout, list(range(4)))
    chunks = []
    original = rollout_module._chunk_logprobs
    monkeypatch.setattr(rollout_module, "_chunk_logprobs", lambda head, h, *a: chunks.append(len(h)) or original(head, h, *a))
    model_head = _RowCounter(backbone.model.get_output_embeddings())
    with torch.no_grad():
        whole = completion_logprobs(backbone, batch, 0.9, chunk_tokens=10_000)
        chunks.clear()
        chunked = completion_logprobs(backbone, batch, 0.9, chunk_tokens=3)
    model_head.handle.remove()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    assert (chunked[~batch.completion_mask] == 0).all()
    assert model_head.rows == [4, 4]  # the model's own head call: the last column of each of the 4 rows only
    assert max(chunks) == 3 and sum(chunks) == int(batch.completion_mask.sum())  # no logits for padding
