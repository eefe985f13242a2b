"""Tiny randomly initialised video LVLMs built from config, for the CPU demo and the tests.

Each preset is a real Hugging Face architecture (the same forward, mrope positions and vision
tower as the 7B model) shrunk to a few million parameters, with a tokenizer trained in-process
(:mod:`p2r.backbones.tokenizer`): nothing is downloaded. Weights are initialised from ``seed`` so
two runs with the same config start from the same model.

Presets: :class:`TinyQwen25VL` (the default), :class:`TinyQwen2VL`, :class:`TinyQwen3VL`; swapping
``backbone.class_path`` in YAML is all it takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2r.backbones.base import VideoBackbone
from p2r.backbones.building import requantize, seeded_model
from p2r.backbones.tokenizer import train_tokenizer
from p2r.compat import set_attention_implementation


class _TinyBackbone(VideoBackbone):
    """Shared construction: in-process tokenizer, processor without a pixel cap, seeded weights."""

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        vision_hidden_size: int = 32,
        vision_depth: int = 2,
        vocab_size: int = 1024,
        seed: int = 0,
        **options: Any,
    ) -> None:
        """
        Args:
            hidden_size: Width of the language model (head_dim = hidden_size / num_heads).
            num_layers: Decoder layers of the language model.
            num_heads: Attention heads of the language model.
            num_kv_heads: Key/value heads (grouped-query attention).
            vision_hidden_size: Width of the vision tower.
            vision_depth: Blocks of the vision tower.
            vocab_size: Largest vocabulary of the in-process BPE tokenizer.
            seed: Seed of the weight initialisation.
            **options: The options of :class:`p2r.backbones.base.VideoBackbone` (dtype, lora, ...).
        """
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.vision_hidden_size = vision_hidden_size
        self.vision_depth = vision_depth
        self.vocab_size = vocab_size
        self.seed = seed
        super().__init__(**options)

    # The processor's own resize bounds are wide: p2r's data pipeline already resized the frames
    # to the run's pixel budget (p2r.data.video.fit_pixels).
    _SIZE = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 1024}

    def _token_ids(self, tok: Any) -> dict[str, int]:
        names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")
        return {n: tok.convert_tokens_to_ids(n) for n in names}

    def _make_processor(self) -> Any:
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return _qwen_processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, train_tokenizer(self.vocab_size), patch=14)

    def _text_config(self) -> dict[str, Any]:
        ids = self._token_ids(self.tokenizer)
        head_dim = self.hidden_size // self.num_heads
        # mrope splits head_dim/2 rotary frequencies over (time, height, width).
        half = head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        return dict(
            vocab_size=len(self.tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            max_position_embeddings=8192,
        )

    def _special_ids(self) -> dict[str, int]:
        return qwen_special_ids(self.tokenizer)

    def _config(self) -> Any:
        raise NotImplementedError

    def _model_class(self) -> type[nn.Module]:
        raise NotImplementedError

    def _make_model(self, torch_dtype: torch.dtype, quantization_config: Any) -> nn.Module:
        config = self._config()
        set_attention_implementation(config, self.attn_implementation)
        model = seeded_model(lambda: self._model_class()(config).to(torch_dtype), self.seed)
        if quantization_config is not None:
            model = requantize(model, quantization_config, torch_dtype)
        return model


def qwen_special_ids(tok: Any) -> dict[str, int]:
    """The config's vision token ids (image, video, vision start/end) for an in-process tokenizer."""
    ids = {n: tok.convert_tokens_to_ids(n) for n in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen_processor(processor_cls: type, video_cls: type, tok: Any, patch: int) -> Any:
    """A Qwen-VL processor around an in-process tokenizer, with the wide resize bounds of _SIZE."""
    from transformers import Qwen2VLImageProcessor

    size = _TinyBackbone._SIZE
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=patch),
        tokenizer=tok,
        video_processor=video_cls(size=size, patch_size=patch, cap_pixels_per_frame=False),
        chat_template=tok.chat_template,
    )


class TinyQwen25VL(_TinyBackbone):
    """Tiny Qwen2.5-VL (window attention vision tower, mrope with absolute time)."""

    def _model_class(self) -> type[nn.Module]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _config(self) -> Any:
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            intermediate_size=2 * self.vision_hidden_size,
            num_heads=2,
            out_hidden_size=self.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[self.vision_depth - 1],
            window_size=56,
        )
        return Qwen2_5_VLConfig(text_config=self._text_config(), vision_config=vision, **self._special_ids())


class TinyQwen2VL(_TinyBackbone):
    """Tiny Qwen2-VL (full-attention vision tower, mrope without absolute time)."""

    def _model_class(self) -> type[nn.Module]:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _make_processor(self) -> Any:
        from transformers import Qwen2VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return _qwen_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, train_tokenizer(self.vocab_size), patch=14)

    def _config(self) -> Any:
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=self.vision_depth,
            embed_dim=self.vision_hidden_size,
            hidden_size=self.hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=self._text_config(), vision_config=vision, **self._special_ids())


class TinyQwen3VL(_TinyBackbone):
    """Tiny Qwen3-VL (deepstack vision features, interleaved mrope, timestamps in the prompt)."""

    def _model_class(self) -> type[nn.Module]:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def _make_processor(self) -> Any:
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        tok = train_tokenizer(self.vocab_size)
        # The Qwen3-VL processor adds <|vision_start|>/<|vision_end|> around each video itself.
        tok.chat_template = tok.chat_template.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
        return _qwen_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tok, patch=16)

    def _text_config(self) -> dict[str, Any]:
        cfg = super()._text_config()
        head_dim = self.hidden_size // self.num_heads
        cfg["head_dim"] = head_dim
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "mrope_interleaved": True}
        return cfg

    def _config(self) -> Any:
        from transformers import Qwen3VLConfig

        vision = dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            intermediate_size=2 * self.vision_hidden_size,
            num_heads=2,
            out_hidden_size=self.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=self._text_config(), vision_config=vision, **self._special_ids())
