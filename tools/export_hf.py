"""Export a p2r checkpoint to a Hugging Face folder: LoRA merged, processor and chat template included.

    python tools/export_hf.py --ckpt runs/sft/checkpoints/last.ckpt --out models/p2r-sft --config configs/sft.yaml
    python tools/export_hf.py --ckpt runs/sft/checkpoints/last.ckpt --out models/p2r-sft-tiny \\
        --config configs/sft.yaml --config configs/tiny.yaml
    python tools/export_hf.py --ckpt runs/pagrpo/checkpoints/last.ckpt --out models/p2r-pagrpo \\
        --config runs/pagrpo/logs/version_0/config.yaml --dtype bfloat16

The folder loads with ``AutoModelForImageTextToText.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)``, and p2r evaluates it through ``HFBackbone``:

    python -m p2r test --config configs/eval.yaml \\
        --model.init_args.backbone.class_path=p2r.backbones.HFBackbone \\
        --model.init_args.backbone.init_args.model_name_or_path=models/p2r-pagrpo

Inputs:
- ``--ckpt``: a checkpoint of a p2r run, either one Lightning ``.ckpt`` file or the folder that a
  sharded FSDP2 run (Lightning's ModelParallelStrategy) writes: ``meta.pt`` plus
  torch.distributed.checkpoint files. From a folder only the model weights are read (not the
  optimizer state), in this one process, without a process group.
- ``--config``: the run's config files as given to ``p2r fit`` (repeat it; later files win), or
  the ``config.yaml`` that LightningCLI saved in the run's log folder. A checkpoint does not hold
  the backbone config (the modules leave the backbone out of their hyperparameters). Only
  ``model.init_args.backbone`` is read from each file, and jsonargparse merges these sections as
  LightningCLI does. The trainer and data sections are not built, so they need not work on this
  machine (no GPUs or shards needed). ``weights_from`` is ignored (except for QLoRA, below): the
checkpoint holds every weight.

LoRA adapters are merged into the base weights (peft ``merge_and_unload``); the folder holds a
plain model in ``--dtype`` (default: the backbone's ``dtype``).

QLoRA (backbone ``quantization: 4bit | 8bit``): the backbone is rebuilt without quantization, so
its base weights are the backbone's source weights (the hub model or folder, or the tiny preset's
seed), or the full SFT checkpoint in its ``weights_from`` when the run started from one (for
QLoRA, ``weights_from`` is kept and must still exist). Every checkpoint tensor is loaded except the quantized base weights of the language-model
linear layers and their quantization state. Those weights were frozen during training: the source
holds them at full precision, the checkpoint only their 4/8-bit rounding. The adapters are then
merged into the full-precision weights, so the exported model differs from the trained one by the
rounding error of those layers. This is the usual way to merge QLoRA adapters.

Before it reports success, the tool reloads the folder and compares it with the exported model
tensor by tensor. This needs memory for two copies of the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from p2r.backbones import VideoBackbone
from p2r.checkpoints import read_backbone_state

DTYPES = ("float32", "bfloat16", "float16")
# The checkpoint supplies every weight, nothing is trained, and the model is built at full precision.
_EXPORT_OPTIONS = {"weights_from": None, "quantization": None, "gradient_checkpointing": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\nInputs:")[0],
        epilog="How the inputs are read and how QLoRA checkpoints are merged: the module docstring of tools/export_hf.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="a p2r Lightning checkpoint: a .ckpt file or an FSDP2 checkpoint folder (meta.pt + DCP files)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created; must be empty if it exists)")
    parser.add_argument("--config", type=Path, action="append", required=True,
                        help="a config file of the run (repeat as for `p2r fit`), or the run's saved config.yaml")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the saved weights (default: the backbone's dtype)")
    return parser.parse_args(argv)


# --- the backbone, from the run's config files ------------------------------------------------
def _backbone_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_subclass_arguments(VideoBackbone, "backbone", required=True)
    return parser


def _backbone_section(path: Path) -> Any:
    """``model.init_args.backbone`` of one config file, or None when the file does not set it."""
    if not path.is_file():
        raise FileNotFoundError(f"--config: no file at {str(path)!r}")
    node = yaml.safe_load(path.read_text())
    for key in ("model", "init_args", "backbone"):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def backbone_from_configs(paths: list[Path]) -> tuple[VideoBackbone, str | None]:
    """The (unbuilt) backbone the configs describe, with export options, and its configured quantization."""
    parser = _backbone_parser()
    cfg = None
    for path in paths:
        section = _backbone_section(path)
        if section is None:
            continue
        try:
            cfg = parser.parse_object({"backbone": section}, namespace=cfg)
        except (argparse.ArgumentError, ValueError) as err:
            raise ValueError(f"--config {str(path)!r}: model.init_args.backbone is not a valid backbone: {err}") from err
    if cfg is None:
        names = ", ".join(repr(str(p)) for p in paths)
        raise ValueError(f"--config: none of {names} sets model.init_args.backbone (pass the run's config files)")
    quantization = cfg.backbone.init_args.quantization
    options = dict(_EXPORT_OPTIONS)
    if quantization:
        # QLoRA's frozen base weights are the ones the run started from: the source model, or the
        # full SFT checkpoint in weights_from (loaded into the base before the adapters).
        del options["weights_from"]
    cfg = parser.parse_object({"backbone": {"init_args": options}}, namespace=cfg)
    try:
        return parser.instantiate(cfg).backbone, quantization
    except ValueError as err:
        # jsonargparse wraps the backbone's own error (e.g. its processor not found) in a type report.
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None


# --- the checkpoint ---------------------------------------------------------------------------
def quantized_entries(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """(quantized base weights, their quantization state) among a QLoRA checkpoint's entries.

    A base weight is quantized when the checkpoint stores it as integers (bitsandbytes packs 4-bit
    weights into uint8 and keeps 8-bit ones as int8) where the full-precision model has floats; its
    quantization state is every entry the full-precision model lacks under the same layer
    (``weight.absmax``, ``weight.quant_map``, ... for 4-bit, ``SCB`` and ``weight_format`` for 8-bit).
    """
    weights = {k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()}
    layers = tuple(k.rsplit(".", 1)[0] + "." for k in weights)
    extras = {k for k in state if k not in own and layers and k.startswith(layers)}
    return weights, extras


def loadable_state(
    state: dict[str, torch.Tensor], backbone: VideoBackbone, quantization: str | None, ckpt: Path
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The checkpoint entries to load into the built backbone and the base weights kept from its
    source (QLoRA); raises when the checkpoint does not fit the backbone the configs describe."""
    own = backbone.state_dict()
    kept, extras = quantized_entries(state, own) if quantization else (set(), set())
    if quantization and not kept:
        raise ValueError(
            f"--ckpt {str(ckpt)!r} holds no quantized base weights, but the config sets quantization: "
            f"{quantization} (drop it from the config if the run trained without it)"
        )
    load = {k: v for k, v in state.items() if k not in kept and k not in extras}
    missing = [k for k in own if k not in load and k not in kept]
    unexpected = [k for k in load if k not in own]
    other = [k for k in load if k in own and (load[k].shape != own[k].shape or load[k].is_floating_point() != own[k].is_floating_point())]
    if missing or unexpected or other:
        raise ValueError(
            f"--ckpt {str(ckpt)!r} does not match the backbone of the --config files "
            f"({type(backbone).__name__}, lora={'on' if backbone.lora else 'off'}, quantization={quantization}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(other)} of another shape or kind (e.g. {other[:3]}); pass the config files the run was trained with "
            "(model size, lora, quantization)"
        )
    return load, kept


# --- building, merging, saving ------------------------------------------------------------------
def merged_model(backbone: VideoBackbone, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load the checkpoint's entries into the built backbone and merge LoRA: a plain Hugging Face model."""
    # Keys were checked by loadable_state; only QLoRA's kept base weights are absent from ``state``.
    backbone.load_state_dict(state, strict=False)
    if backbone.lora is None:
        return backbone.model
    merged = backbone.model.merge_and_unload()
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"LoRA modules left after merging: {leftover[:3]}")
    return merged


def save_folder(model: nn.Module, processor: Any, out: Path) -> None:
    """Write the model (safetensors + config) and the processor (tokenizer, chat template) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def verify_folder(out: Path, model: nn.Module, processor: Any) -> None:
    """Reload ``out`` with the Auto classes and check that it holds exactly what was exported."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = next(model.parameters()).dtype
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype).state_dict()
    ours = model.state_dict()
    differ = sorted(k for k in ours.keys() | reloaded.keys() if k not in ours or k not in reloaded or not torch.equal(ours[k], reloaded[k]))
    if differ:
        raise RuntimeError(f"{out}: the reloaded model differs from the exported one in {len(differ)} tensors (e.g. {differ[:3]})")
    if AutoProcessor.from_pretrained(out).chat_template != processor.chat_template:
        raise RuntimeError(f"{out}: the reloaded processor lost the chat template")


def export(ckpt: Path, out: Path, configs: list[Path], dtype: str | None = None) -> nn.Module:
    """Write the Hugging Face folder ``out`` from checkpoint ``ckpt``; returns the exported model."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty (choose a new folder, so no stale weight files mix in)")
    backbone, quantization = backbone_from_configs(configs)
    lora = f"LoRA r={backbone.lora.r}" if backbone.lora else "no LoRA"
    print(f"backbone: {type(backbone).__name__}, dtype {backbone.dtype_name}, {lora}, quantization {quantization}", flush=True)
    state = read_backbone_state(ckpt, "--ckpt")
    print(f"checkpoint: {len(state)} backbone tensors from {ckpt} ({'distributed folder' if ckpt.is_dir() else 'file'})", flush=True)
    backbone.build()
    load, kept = loadable_state(state, backbone, quantization, ckpt)
    model = merged_model(backbone, load)
    if kept:
        print(f"QLoRA: {len(kept)} quantized base weights taken at full precision from the backbone's source", flush=True)
    if backbone.lora is not None:
        print("merged the LoRA adapters into the base weights", flush=True)
    model = model.to(getattr(torch, dtype or backbone.dtype_name))
    save_folder(model, backbone.processor, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.2f}M parameters ({dtype or backbone.dtype_name}) and the processor to {out}", flush=True)
    verify_folder(out, model, backbone.processor)
    print(f"verified: {out} reloads with AutoModelForImageTextToText and AutoProcessor, tensors identical", flush=True)
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(args.ckpt, args.out, args.config, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
