"""A video LVLM from the Hugging Face hub or a local folder (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, ...).

``AutoModelForImageTextToText`` + ``AutoProcessor``; any architecture they know that takes
video through its chat template works. ``trust_remote_code`` stays off unless the config turns it
on. The processor's own resize bounds are widened: p2r's data pipeline already resized every
frame to the run's pixel budget (``data.frames``), so the budget lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2r.backbones.base import VideoBackbone

_HOW_TO_GET_HUB = (
    "Download it first, e.g. `hf download {name} --local-dir models/{short}` (older huggingface_hub: "
    "`huggingface-cli download ...`), then set backbone.init_args.model_name_or_path to that folder "
    "(or point HF_HOME at a cache that has it)."
)
_HOW_TO_GET_FOLDER = (
    "backbone.init_args.model_name_or_path must be a folder holding a Hugging Face model (config.json, "
    "weights, processor files): check the path, or download one into it, e.g. "
    "`hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {name}`."
)


class HFBackbone(VideoBackbone):
    """Any Hugging Face image-text-to-text model that takes video, by hub id or local folder."""

    def __init__(self, model_name_or_path: str, trust_remote_code: bool = False, **options: Any) -> None:
        """
        Args:
            model_name_or_path: A hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a local folder.
            trust_remote_code: Run model code shipped with the weights (off: only transformers' own code).
            **options: The options of :class:`p2r.backbones.base.VideoBackbone` (dtype, lora, ...).
        """
        self.model_name_or_path = model_name_or_path
        self.trust_remote_code = trust_remote_code
        super().__init__(**options)

    def _missing(self, err: Exception) -> FileNotFoundError:
        name = self.model_name_or_path
        if Path(name).exists() or name.startswith((".", "/", "~")):
            return FileNotFoundError(f"cannot load the backbone from folder {name!r}: {err}. {_HOW_TO_GET_FOLDER.format(name=name)}")
        hint = _HOW_TO_GET_HUB.format(name=name, short=name.rsplit("/", 1)[-1])
        return FileNotFoundError(f"cannot load the backbone from hub id {name!r}: {err}. {hint}")

    def _make_processor(self) -> Any:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        except OSError as err:
            raise self._missing(err) from err
        for sub in ("image_processor", "video_processor"):
            proc = getattr(processor, sub, None)
            if proc is not None and isinstance(getattr(proc, "size", None), dict) and "longest_edge" in proc.size:
                proc.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16384}
        return processor

    def _make_empty_model(self, torch_dtype: torch.dtype) -> nn.Module:
        """The model of this folder's config.json on the meta device: no weight file is read."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            config = AutoConfig.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        except OSError as err:
            raise self._missing(err) from err
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(
                config, dtype=torch_dtype, attn_implementation=self.attn_implementation,
                trust_remote_code=self.trust_remote_code,
            )

    def _make_model(self, torch_dtype: torch.dtype, quantization_config: Any) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        try:
            return AutoModelForImageTextToText.from_pretrained(
                self.model_name_or_path,
                dtype=torch_dtype,
                attn_implementation=self.attn_implementation,
                quantization_config=quantization_config,
                trust_remote_code=self.trust_remote_code,
            )
        except OSError as err:
            raise self._missing(err) from err
