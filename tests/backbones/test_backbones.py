"""Backbones: tiny presets, target marking, generation, the HF loader, LoRA, freezing, weights_from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2r.algorithms.sft import SFTModule, answer_labels
from p2r.backbones import HFBackbone, LoraOptions, TinyQwen2VL, TinyQwen3VL, TinyQwen25VL, VideoBackbone
from p2r.checkpoints import BACKBONE_OPTIONS
from p2r.data.video import Clip

_rng = np.random.default_rng(0)
# A 4-frame 56x56 video (frames 2, 6, 10, 14 of a 16-frame 4 fps clip) and a 56x84 image.
VIDEO = Clip(_rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), fps=4.0, frame_indices=[2, 6, 10, 14], total_frames=16)
IMAGE = Clip(_rng.integers(0, 255, (1, 56, 84, 3), dtype=np.uint8), fps=1.0, frame_indices=[0], total_frames=1, is_image=True)
TARGETS = ["<observation>A red circle moves left.</observation>\n<think>Left.</think>\n<answer>A</answer>", "<answer>3</answer>"]


def prompts(backbone: VideoBackbone) -> list[str]:
    return [backbone.render_prompt("Which way does it move?", "video"), backbone.render_prompt("How many?", "image")]


def token_id(backbone: VideoBackbone, token: str) -> int:
    return backbone.tokenizer.convert_tokens_to_ids(token)


@pytest.mark.parametrize(
    ("cls", "grids"),
    [
        # (video grid, image grid) in patches: patch 14 for Qwen2/2.5-VL; Qwen3-VL's patch 16
        # makes its processor resize 56 -> 64 and 84 -> 96.
        (TinyQwen25VL, ([2, 4, 4], [1, 4, 6])),
        (TinyQwen2VL, ([2, 4, 4], [1, 4, 6])),
        (TinyQwen3VL, ([2, 4, 4], [1, 4, 6])),
    ],
)
def test_tiny_preset_builds_encodes_video_and_image_and_backpropagates(cls, grids, tiny_sizes):
    backbone = cls(**tiny_sizes)
    backbone.build()
    batch = backbone.encode(prompts(backbone), [VIDEO, IMAGE], TARGETS)
    assert batch["video_grid_thw"].tolist() == [grids[0]] and batch["image_grid_thw"].tolist() == [grids[1]]
    ids = batch["input_ids"]
    # One placeholder per 2x2 merged patch group: 2*4*4/4 = 8 video tokens, 1*4*6/4 = 6 image tokens.
    assert (ids == token_id(backbone, "<|video_pad|>")).sum(1).tolist() == [8, 0]
    assert (ids == token_id(backbone, "<|image_pad|>")).sum(1).tolist() == [0, 6]
    logits = backbone(**batch)
    assert logits.shape == (2, ids.shape[1], len(backbone.tokenizer))
    assert torch.isfinite(logits).all()
    labels = answer_labels(batch["input_ids"], batch["target_mask"])
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    vision_grads = [p.grad for p in backbone.vision_tower(backbone.model).parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in vision_grads)
    assert any(g.abs().sum() > 0 for g in vision_grads)  # the answer loss reaches the vision tower


def test_qwen3_prompt_carries_timestamps_of_the_sampled_frames(tiny_sizes):
    backbone = TinyQwen3VL(**tiny_sizes)
    text = backbone.tokenizer.decode(backbone.encode(prompts(backbone)[:1], [VIDEO])["input_ids"][0])
    # Frames 2, 6 | 10, 14 at 4 fps are 0.5 s, 1.5 s | 2.5 s, 3.5 s: each pair of frames is one step.
    assert "<1.0 seconds><|vision_start|>" in text and "<3.0 seconds><|vision_start|>" in text
    assert text.count("<|vision_start|>") == 2  # not doubled by the template


def test_generate_stops_at_an_end_token_or_the_length_limit(tiny25):
    max_new = 6
    out = tiny25.generate(prompts(tiny25), [VIDEO, IMAGE], max_new_tokens=max_new)
    ends, media = set(tiny25.eos_token_ids), set(tiny25.media_token_ids)
    assert ends == {token_id(tiny25, "<|im_end|>"), token_id(tiny25, "<|endoftext|>")}
    assert media == {token_id(tiny25, t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    assert len(out) == 2
    for ids in out:
        assert 1 <= len(ids) <= max_new
        assert not ends & set(ids[:-1]) and not media & set(ids)
        assert ids[-1] in ends or len(ids) == max_new
    # Left padding: a prompt's greedy completion does not depend on the other prompts in the batch.
    alone = [tiny25.generate([p], [c], max_new_tokens=max_new)[0] for p, c in zip(prompts(tiny25), [VIDEO, IMAGE])]
    assert out == alone


def test_generate_cuts_after_the_first_end_token(tiny_sizes):
    backbone = TinyQwen25VL(**tiny_sizes)
    backbone.build()
    with torch.no_grad():
        backbone.model.lm_head.weight.zero_()  # all logits equal: greedy takes id 0, <|endoftext|>
    assert token_id(backbone, "<|endoftext|>") == 0
    assert backbone.generate(prompts(backbone), [VIDEO, IMAGE], max_new_tokens=5) == [[0], [0]]


@pytest.fixture()
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty cache, so a missing model fails fast instead of downloading."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.mark.parametrize("where", ["folder", "hub id"])
def test_hf_backbone_missing_weights_name_the_path_and_how_to_get_them(offline_hub, tmp_path, where):
    name = str(tmp_path / "models" / "Qwen2.5-VL-7B-Instruct") if where == "folder" else "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(FileNotFoundError) as err:
        HFBackbone(model_name_or_path=name)
    message = str(err.value)
    assert f"{where} {name!r}" in message
    assert "hf download" in message and "--local-dir" in message and "model_name_or_path" in message


def test_hf_backbone_loads_a_saved_tiny_model_with_identical_logits(offline_hub, tiny25, tmp_path):
    folder = tmp_path / "tiny-qwen25vl"
    tiny25.model.save_pretrained(folder)
    tiny25.processor.save_pretrained(folder)
    hf = HFBackbone(model_name_or_path=str(folder))
    hf.build()
    hf.eval()
    ours = tiny25.encode(prompts(tiny25), [VIDEO, IMAGE], TARGETS)
    theirs = hf.encode(prompts(hf), [VIDEO, IMAGE], TARGETS)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (hf.eos_token_ids, hf.media_token_ids, hf.pad_token_id) == (tiny25.eos_token_ids, tiny25.media_token_ids, tiny25.pad_token_id)
    with torch.no_grad():
        assert torch.equal(hf(**theirs), tiny25(**ours))


def test_lora_trains_only_language_adapters_and_disabling_gives_the_base(tiny25, tiny_sizes):
    # "qkv" and "proj" name vision-tower layers only: they must be excluded, not adapted.
    lora = LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "qkv", "proj"])
    backbone = TinyQwen25VL(**tiny_sizes, lora=lora)
    backbone.build()
    backbone.eval()
    trainable = sorted(n for n, p in backbone.named_parameters() if p.requires_grad)
    layer = "model.base_model.model.model.language_model.layers.0.self_attn"
    assert trainable == sorted(f"{layer}.{m}.lora_{ab}.default.weight" for m in ("q_proj", "v_proj") for ab in "AB")
    assert not any("lora" in n for n, _ in backbone.vision_tower(backbone.model).named_modules())

    batch = tiny25.encode(prompts(tiny25), [VIDEO, IMAGE], TARGETS)
    with torch.no_grad():
        base = tiny25(**batch)
        assert torch.equal(backbone(**batch), base)  # lora_B starts at zero
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        adapted = backbone(**batch)
        with backbone.adapters_disabled():
            disabled = backbone(**batch)
        assert (adapted - base).abs().max() > 1e-3
        assert torch.equal(disabled, base)
        assert torch.equal(backbone(**batch), adapted)  # re-enabled on leaving the context
    with pytest.raises(RuntimeError, match="needs LoRA"):
        with tiny25.adapters_disabled():
            pass


def test_freeze_vision_freezes_exactly_the_vision_tower(tiny_sizes):
    backbone = TinyQwen25VL(**tiny_sizes, freeze_vision=True)
    backbone.build()
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    vision = {n for n, _ in backbone.named_parameters() if n.startswith("model.model.visual.")}
    assert vision and frozen == vision
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n not in vision)


def lightning_style_checkpoint(backbone: VideoBackbone, path) -> str:
    """What a Lightning checkpoint of a p2r module holds: state_dict keys 'backbone.*'."""
    torch.save({"state_dict": SFTModule(backbone).state_dict(), "epoch": 0, "global_step": 3}, path)
    return str(path)


def test_weights_from_loads_backbone_weights(tiny_sizes, tmp_path):
    source = TinyQwen25VL(**tiny_sizes, seed=1)
    source.build()
    ckpt = lightning_style_checkpoint(source, tmp_path / "sft.ckpt")
    fresh = TinyQwen25VL(**tiny_sizes, seed=0)
    fresh.build()
    loaded = TinyQwen25VL(**tiny_sizes, seed=0, weights_from=ckpt)
    loaded.build()
    src, got, init = source.state_dict(), loaded.state_dict(), fresh.state_dict()
    assert src.keys() == got.keys()
    assert all(torch.equal(src[k], got[k]) for k in src)
    assert not all(torch.equal(src[k], init[k]) for k in src)  # the seeds really differ


def test_a_full_checkpoint_becomes_the_base_of_lora_and_qlora(tiny_sizes, tmp_path):
    """Full SFT -> LoRA/QLoRA RL: the SFT weights are the base model; adapters start at zero."""
    sizes = {**tiny_sizes, "hidden_size": 64, "num_heads": 2, "vision_hidden_size": 64}  # 4-bit blocks need >= 64 inputs
    source = TinyQwen25VL(**sizes, seed=5)
    source.build()
    ckpt = lightning_style_checkpoint(source, tmp_path / "full.ckpt")
    lora = LoraOptions(r=2, alpha=4, dropout=0.0)
    with_lora = TinyQwen25VL(**sizes, seed=0, lora=lora, weights_from=ckpt)
    with_lora.build()
    base = with_lora.model.get_base_model().state_dict()
    for key, value in source.model.state_dict().items():
        layer = key.rsplit(".", 1)
        wrapped = f"{layer[0]}.base_layer.{layer[1]}"
        assert torch.equal(value, base[wrapped] if wrapped in base else base[key]), key
    qlora = TinyQwen25VL(**sizes, seed=0, lora=lora, quantization="4bit", weights_from=ckpt)
    qlora.build()
    q_key = next(k for k in source.model.state_dict() if k.endswith("self_attn.q_proj.weight") and "visual" not in k)
    layer = qlora.model.get_base_model().get_submodule(q_key.rsplit(".", 1)[0]).base_layer
    import bitsandbytes.functional as bnbf

    restored = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))  # noqa: E731
    assert cosine(restored, source.model.state_dict()[q_key]) > 0.98  # the SFT weights, up to 4-bit rounding
    seed0 = TinyQwen25VL(**sizes, seed=0)
    seed0.build()
    assert abs(cosine(restored, seed0.model.state_dict()[q_key])) < 0.3  # not the backbone's own initialisation


def test_weights_from_a_lora_checkpoint_merges_its_adapters(tiny_sizes, tmp_path):
    """A LoRA checkpoint seeds a plain backbone as the model it stands for: base + merged adapters,
    with the adapter options the checkpoint records (without them it cannot be merged: a clear error)."""
    source = TinyQwen25VL(**tiny_sizes, lora=LoraOptions(r=2, alpha=8, dropout=0.0))
    source.build()
    with torch.no_grad():
        for name, p in source.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ckpt = lightning_style_checkpoint(source, tmp_path / "lora.ckpt")
    with pytest.raises(ValueError, match=r"weights_from: '.*lora\.ckpt' holds LoRA adapters but not their options"):
        TinyQwen25VL(**tiny_sizes, weights_from=ckpt).build()
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, BACKBONE_OPTIONS: source.stored_options()}, ckpt)
    plain = TinyQwen25VL(**tiny_sizes, weights_from=ckpt)
    plain.build()
    merged = source.model.merge_and_unload().state_dict()
    assert plain.model.state_dict().keys() == merged.keys()
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(value, merged[key], atol=1e-6, rtol=0)


def test_weights_from_refuses_a_checkpoint_of_another_size(tiny_sizes, tmp_path):
    source = TinyQwen25VL(**{**tiny_sizes, "hidden_size": 64, "num_heads": 4})
    source.build()
    ckpt = lightning_style_checkpoint(source, tmp_path / "big.ckpt")
    small = TinyQwen25VL(**tiny_sizes, weights_from=ckpt)
    with pytest.raises(ValueError, match=r"weights_from: '.*big\.ckpt' does not match this backbone"):
        small.build()


def test_weights_from_an_fsdp2_folder_is_read_straight_into_the_model(tiny_sizes, tmp_path, monkeypatch):
    # The folder an FSDP2 run writes (DCP files + meta.pt), here written by one process. Its tensors go
    # straight into the built model: the whole-state reader (a second copy of the weights) is never used.
    import torch.distributed.checkpoint as dcp

    from p2r.backbones import building

    source = TinyQwen25VL(**tiny_sizes)
    source.build()
    state = {f"backbone.model.{k}": v + 0.01 if v.is_floating_point() else v for k, v in source.model.state_dict().items()}
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 3}, folder / "meta.pt")
    monkeypatch.setattr(building, "read_backbone_state", lambda *a: pytest.fail("read the whole state first"))
    loaded = TinyQwen25VL(**tiny_sizes, weights_from=str(folder))
    loaded.build()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[f"backbone.model.{key}"]), key
    wider = TinyQwen25VL(**{**tiny_sizes, "hidden_size": 2 * tiny_sizes["hidden_size"]}, weights_from=str(folder))
    with pytest.raises(ValueError, match="does not match this backbone.*of another shape"):
        wider.build()


def test_weights_from_missing_or_foreign_file_is_a_clear_error(tiny_sizes, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights_from: no checkpoint file or folder at '.*nope\.ckpt'"):
        TinyQwen25VL(**tiny_sizes, weights_from=str(tmp_path / "nope.ckpt")).build()
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"holds no 'backbone\.\*' weights"):
        TinyQwen25VL(**tiny_sizes, weights_from=str(tmp_path / "other.ckpt")).build()


def test_qlora_quantizes_the_language_model_only_and_trains_adapters(tmp_path):
    """4-bit NF4 base (bitsandbytes, on CPU) + LoRA: only the adapters train; vision stays full precision."""
    import bitsandbytes as bnb  # a test dependency (the [test] extra)

    # bitsandbytes' CPU 4-bit kernels need in_features >= 64 (one quantization block).
    b = TinyQwen25VL(hidden_size=128, num_layers=2, vision_hidden_size=64, quantization="4bit", lora=LoraOptions(r=4))
    b.build()
    four_bit = [n for n, m in b.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    assert not any("visual" in n for n in four_bit)
    trainable = [n for n, p in b.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    clip = Clip(np.zeros((4, 56, 56, 3), dtype=np.uint8), fps=4.0, frame_indices=[0, 2, 4, 6], total_frames=8)
    batch = b.encode([b.render_prompt("What colour?", "video")], [clip], ["<answer>A</answer>"])
    b(**batch).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in b.named_parameters() if p.requires_grad)
    with b.adapters_disabled():
        assert torch.isfinite(b(**batch)).all()
