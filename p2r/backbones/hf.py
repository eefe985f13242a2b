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

_HOW_TO_GET = (
    "Download it first, e.g. `huggingface-cli download {name} --local-dir models/{short}`, "
    "then set backbone.init_args.model_name_or_path to that folder (or set HF_HOME to a cache that has it)."
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
        where = f"folder {name!r}" if Path(name).exists() or name.startswith((".", "/")) else f"hub id {name!r}"
        hint = _HOW_TO_GET.format(name=name, short=name.rsplit("/", 1)[-1])
        return FileNotFoundError(f"cannot load the backbone from {where}: {err}. {hint}")

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
