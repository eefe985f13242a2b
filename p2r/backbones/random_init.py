"""The real Qwen2.5-VL-3B / -7B architectures with random weights: GPU benchmarks without a download.

The model is built from the stored config.json values (:mod:`p2r.backbones.architectures`), so
every matrix has its real shape and a step costs what it costs with the released weights; the
weights are random (seeded) and the tokenizer is the in-process one of the tiny presets
(:mod:`p2r.backbones.tokenizer`). The vocabulary (embedding and lm_head rows) keeps its real
size; the special-token ids of the config are replaced by the tokenizer's, which changes no
shape. Text sampled from such a model is noise: use it for speed and memory, never for quality.

``init_device`` builds the weights directly on a GPU (seconds for 7B instead of minutes of
initialisation on the CPU). ``num_layers`` / ``vision_depth`` shorten the model for quick checks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from p2r.backbones.architectures import architecture_config, architecture_values
from p2r.backbones.base import VideoBackbone
from p2r.backbones.building import requantize, seeded_model
from p2r.backbones.tiny import _qwen_processor, qwen_special_ids
from p2r.backbones.tokenizer import train_tokenizer
from p2r.compat import model_from_config, set_attention_implementation

Architecture = Literal["qwen2_5_vl_3b", "qwen2_5_vl_7b"]


class RandomInitQwen25VL(VideoBackbone):
    """Qwen2.5-VL-3B or -7B (real shapes from their config.json values), randomly initialised."""

    def __init__(
        self,
        architecture_name: Architecture = "qwen2_5_vl_7b",
        num_layers: int | None = None,
        vision_depth: int | None = None,
        init_device: str = "cpu",
        seed: int = 0,
        **options: Any,
    ) -> None:
        """
        Args:
            architecture_name: Stored architecture (p2r/backbones/architectures/<name>.json).
            num_layers: Decoder layers to keep (None: the real number).
            vision_depth: Vision blocks to keep (None: the real number).
            init_device: Device the weights are created on ("cuda" builds 7B in seconds).
            seed: Seed of the weight initialisation.
            **options: The options of :class:`p2r.backbones.base.VideoBackbone` (dtype, lora, ...).
        """
        self.architecture_name = architecture_name
        self.num_layers = num_layers
        self.vision_depth = vision_depth
        self.init_device = init_device
        self.seed = seed
        super().__init__(**options)

    def _make_processor(self) -> Any:
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return _qwen_processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, train_tokenizer(1024), patch=14)

    def config(self) -> Any:
        """The architecture's config with this tokenizer's special ids and the requested depths."""
        tok = self.tokenizer
        overrides: dict[str, Any] = dict(
            qwen_special_ids(tok), bos_token_id=None,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        )
        if self.num_layers is not None:
            overrides["num_hidden_layers"] = self.num_layers
        if self.vision_depth is not None:
            vision = dict(architecture_values(self.architecture_name)["vision_config"])
            full = [i for i in vision["fullatt_block_indexes"] if i < self.vision_depth] or [self.vision_depth - 1]
            overrides["vision_config"] = {**vision, "depth": self.vision_depth, "fullatt_block_indexes": full}
        return architecture_config(self.architecture_name, **overrides)

    def _unweighted(self, torch_dtype: torch.dtype) -> nn.Module:
        from transformers import Qwen2_5_VLForConditionalGeneration

        config = self.config()
        set_attention_implementation(config, self.attn_implementation)
        return model_from_config(Qwen2_5_VLForConditionalGeneration, config, torch_dtype)

    def _make_empty_model(self, torch_dtype: torch.dtype) -> nn.Module:
        with torch.device("meta"):  # whatever init_device says
            return self._unweighted(torch_dtype)

    def _make_model(self, torch_dtype: torch.dtype, quantization_config: Any) -> nn.Module:
        model = seeded_model(lambda: self._unweighted(torch_dtype), self.seed, self.init_device)
        if quantization_config is not None:
            model = requantize(model, quantization_config, torch_dtype)
        return model
