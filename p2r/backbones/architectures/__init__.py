"""Real model architectures without weights: the config.json values of the models p2r trains.

The JSON files beside this module hold the ``config.json`` of each hub model verbatim, so that
a GPU benchmark can build the real architecture with random weights and a memory plan can
count its parameters on the meta device, both without a download:

    qwen2_5_vl_3b.json   Qwen/Qwen2.5-VL-3B-Instruct   3,754,622,976 parameters (tied embeddings)
    qwen2_5_vl_7b.json   Qwen/Qwen2.5-VL-7B-Instruct   8,292,166,656 parameters

(counted on the meta device with transformers 5.24; ``tests/backbones/test_architectures.py``.)
A hub id that has no file here is read from a local folder or the local Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

HERE = Path(__file__).parent
# Hub id -> file name (without .json) of its stored config.
HUB_IDS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl_3b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b",
}


def architecture_names() -> list[str]:
    """Names of the stored architectures (the JSON files here)."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def architecture_values(name: str) -> dict[str, Any]:
    """The stored config.json values of architecture ``name`` (e.g. "qwen2_5_vl_7b")."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; stored: {architecture_names()} (p2r/backbones/architectures/)")
    return json.loads(path.read_text())


def architecture_config(name: str, **overrides: Any) -> Any:
    """A transformers config of architecture ``name``; ``overrides`` replace top-level values."""
    from transformers import AutoConfig

    values = {**architecture_values(name), **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def hub_config(model_name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The config of a hub id or folder, without network: a folder's config.json, a stored
    architecture for a known hub id, else the local Hugging Face cache."""
    from transformers import AutoConfig

    if (Path(model_name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if model_name_or_path in HUB_IDS:
        return architecture_config(HUB_IDS[model_name_or_path])
    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError as err:
        raise ValueError(
            f"no architecture for {model_name_or_path!r}: it is not a folder with a config.json, not one of the stored "
            f"hub ids {sorted(HUB_IDS)}, and not in the local Hugging Face cache. Fetch only its config, e.g. "
            f"`hf download {model_name_or_path} config.json --local-dir <folder>`, and point model_name_or_path at the folder."
        ) from err


def meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The image-text-to-text model of ``config`` on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def backbone_meta_model(cls: type, init_args: dict[str, Any]) -> nn.Module:
    """The plain model (no LoRA, quantization or ``weights_from``: they act at build time) that the
    backbone class ``cls`` with ``init_args`` builds, on the meta device: no weights, no download."""
    from p2r.backbones.hf import HFBackbone

    if issubclass(cls, HFBackbone):
        trust = bool(init_args.get("trust_remote_code"))
        return meta_model(hub_config(init_args["model_name_or_path"], trust), trust)
    # Other backbones build their config in-process and cheaply.
    args = {k: v for k, v in init_args.items() if k not in ("lora", "quantization", "weights_from")}
    backbone = cls(**args)
    with torch.device("meta"):
        return backbone._make_model(backbone.torch_dtype, None)


def model_dims(model: nn.Module) -> dict[str, int]:
    """The widths of a built (or meta) model that activation and cache estimates need: language
    model hidden / intermediate size, layers, query and key/value heads, head dim, vocabulary, and the vision
    tower's width, MLP width and depth (0 without one)."""
    text = model.config.get_text_config()
    vcfg = getattr(model.config, "vision_config", None)
    heads = text.num_attention_heads
    # Qwen2-VL's vision config calls its width embed_dim (hidden_size is the output) and has mlp_ratio.
    width = (getattr(vcfg, "embed_dim", None) or getattr(vcfg, "hidden_size", 0)) if vcfg is not None else 0
    inner = (getattr(vcfg, "intermediate_size", None) or int(getattr(vcfg, "mlp_ratio", 4) * width)) if vcfg is not None else 0
    return dict(
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", heads), head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size, vision_hidden=width, vision_intermediate=inner,
        vision_depth=getattr(vcfg, "depth", 0) if vcfg is not None else 0,
    )


class ModelParts(NamedTuple):
    """The parts of a Hugging Face VLM that a memory plan counts apart."""

    vision: nn.Module | None  # the vision tower (None: the model has none)
    lm_head: nn.Module  # the output embedding
    blocks: list[nn.Module]  # the repeated blocks (decoder layers, vision blocks): FSDP's units


def model_parts(model: nn.Module) -> ModelParts:
    """The vision tower, LM head and repeated blocks of ``model`` (built or on the meta device)."""
    from p2r.backbones.building import VISUAL_NAMES, block_classes

    vision = next((m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in VISUAL_NAMES), None)
    blocks = [m for m in model.modules() if isinstance(m, tuple(block_classes(model)))]
    return ModelParts(vision, model.get_output_embeddings(), blocks)
