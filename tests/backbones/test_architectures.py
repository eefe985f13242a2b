"""Stored architectures: the released Qwen2.5-VL configs, counted on the meta device and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2r.backbones.architectures import HUB_IDS, architecture_config, architecture_names, architecture_values, hub_config, meta_model
from p2r.backbones.random_init import RandomInitQwen25VL
from p2r.data.video import Clip


def qwen25_vl_parameters(v: dict) -> int:
    """Qwen2.5-VL's parameter count written out from its config values (biases on q/k/v only in
    the language model; biased linear layers in the vision tower; lm_head shared when tied)."""
    h, i, kv = v["hidden_size"], v["intermediate_size"], v["num_key_value_heads"] * v["hidden_size"] // v["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    text = v["vocab_size"] * h * (1 if v["tie_word_embeddings"] else 2) + v["num_hidden_layers"] * layer + h
    c = v["vision_config"]
    w, wi, p, t = c["hidden_size"], c["intermediate_size"], c["patch_size"], c["temporal_patch_size"]
    block = (w * 3 * w + 3 * w) + (w * w + w) + 2 * (w * wi + wi) + (wi * w + w) + 2 * w
    merged = w * c["spatial_merge_size"] ** 2
    merger = w + (merged * merged + merged) + (merged * c["out_hidden_size"] + c["out_hidden_size"])
    return text + 3 * t * p * p * w + c["depth"] * block + merger


@pytest.mark.parametrize(("name", "expected"), [("qwen2_5_vl_3b", 3_754_622_976), ("qwen2_5_vl_7b", 8_292_166_656)])
def test_stored_architectures_count_the_released_parameters(name, expected):
    values = architecture_values(name)
    model = meta_model(architecture_config(name))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected == qwen25_vl_parameters(values)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (values["hidden_size"], values["num_hidden_layers"], values["vocab_size"])
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]


def test_hub_ids_map_to_stored_files_and_unknown_ids_say_how_to_get_a_config(tmp_path):
    assert sorted(HUB_IDS.values()) == architecture_names()
    assert hub_config("Qwen/Qwen2.5-VL-7B-Instruct").text_config.hidden_size == 3584
    with pytest.raises(ValueError, match="hf download some/unknown-model config.json"):
        hub_config("some/unknown-model")
    folder = tmp_path / "m"
    architecture_config("qwen2_5_vl_3b").save_pretrained(folder)
    assert hub_config(str(folder)).text_config.num_hidden_layers == 36


@pytest.mark.slow
def test_random_init_backbone_has_real_widths_and_runs_a_video_forward():
    backbone = RandomInitQwen25VL("qwen2_5_vl_3b", num_layers=1, vision_depth=1, dtype="bfloat16")
    backbone.build()
    config = backbone.model.config
    assert config.text_config.hidden_size == 2048 and config.text_config.vocab_size == 151936
    assert config.video_token_id == backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_config.fullatt_block_indexes == [0]
    frames = np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    batch = backbone.encode([backbone.render_prompt("Which way?", "video")], [Clip(frames, 2.0, [0, 1, 2, 3], 4)])
    logits = backbone(**batch)
    assert logits.shape[-1] == 151936 and logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
