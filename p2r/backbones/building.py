"""Building a backbone's weights: dtype, quantization, LoRA, ``weights_from``, frozen copies.

:func:`build_model` is what :meth:`p2r.backbones.base.VideoBackbone.build` runs: the subclass makes
the plain model (``make_model(dtype, quantization_config)``: from a hub folder, or from a config
with seeded random weights, :func:`seeded_model`), then the options every p2r job shares apply on
top: a checkpoint of an earlier stage (``weights_from``), 4/8-bit quantization (bitsandbytes),
a frozen vision tower, gradient checkpointing and LoRA adapters (peft, never on the vision tower).
The runtime interface (encode, prefill and decode, the log-prob head, generate) is the backbone's.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2r.checkpoints import (BACKBONE_PREFIX, distributed_backbone_entries, load_distributed_into, read_backbone_options,
                             read_backbone_state)

# Names Hugging Face VLMs give their vision encoder.
VISUAL_NAMES = ("visual", "vision_tower", "vision_model")

MakeModel = Callable[[torch.dtype, Any], nn.Module]  # (dtype, quantization_config or None) -> plain model


@dataclass
class LoraOptions:
    """LoRA adapters on the language model (peft); the vision tower never gets adapters."""

    r: int = 16
    """Rank of the adapters."""
    alpha: int = 32
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the language-model linear layers that get adapters."""


def build_model(
    make_model: MakeModel,
    dtype: torch.dtype,
    quantization: str | None = None,
    lora: LoraOptions | None = None,
    weights_from: str | None = None,
    freeze_vision: bool = False,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """The model with every option applied (the arguments are :class:`VideoBackbone`'s options).

    ``weights_from`` (a p2r checkpoint of an earlier stage, the SFT run) becomes the plain model
    under this run's quantization and adapters, so that "adapters disabled" is the SFT model
    (PA-GRPO's reference with LoRA):
      - a full checkpoint is loaded into the plain model, then quantized if this run is QLoRA;
      - a LoRA checkpoint is rebuilt with ITS adapters (the options its run stored, see
        :func:`stored_options`), which are merged into the base; this run's adapters start
        fresh on the merged model;
      - a QLoRA checkpoint (4/8-bit base) only feeds a run with the same quantization: its
        adapters are merged into the quantized layers (peft re-quantizes them, so the merged
        model equals the SFT model within the quantization error).
    """
    # A full checkpoint folder (FSDP2's) is read straight into the model below; the rest is read first.
    folder = _distributed_entries(weights_from) if weights_from else None
    in_place = folder is not None and not any("lora_" in k for k in folder)
    state = read_backbone_state(weights_from, "weights_from") if weights_from and not in_place else None
    config = quantization_config(quantization, dtype)
    if not weights_from:
        model = make_model(dtype, config)
    elif state is not None and any("lora_" in k for k in state):
        model = _merged_adapter_checkpoint(make_model, state, weights_from, dtype, quantization, config, lora)
    else:
        model = make_model(dtype, None)
        if in_place:
            _load_distributed_checked(model, folder, weights_from)
        else:
            _load_checked(model, _model_entries(state), weights_from)
        if config is not None:
            model = requantize(model, config, dtype)
    if freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # bitsandbytes on CPUs with AVX512-BF16 repacks a 4-bit layer's weights the first time
        # it runs in eval mode (our rollouts) and cannot train them afterwards: keep the layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = add_lora(model, lora)
    return model


def stored_options(lora: LoraOptions | None, quantization: str | None) -> dict[str, Any]:
    """What a checkpoint must record for a later stage to rebuild these weights: the adapters'
    options (their scale alpha / r is not in the weights) and the quantization."""
    return {"lora": asdict(lora) if lora is not None else None, "quantization": quantization}


def _merged_adapter_checkpoint(
    make_model: MakeModel, state: dict[str, torch.Tensor], path: str, dtype: torch.dtype, quantization: str | None,
    config: Any, lora: LoraOptions | None,
) -> nn.Module:
    """The model a LoRA/QLoRA checkpoint stands for, its adapters merged into the base."""
    stored = read_backbone_options(path, "weights_from")
    quantized = any(k.endswith((".absmax", ".quant_map")) or ".quant_state." in k or k.endswith(".SCB") for k in state)
    source_quantization = stored.get("quantization") if stored else ("4bit" if quantized else None)
    if quantized and source_quantization != quantization:
        raise ValueError(
            f"weights_from: {path!r} is a {source_quantization} (QLoRA) checkpoint; it can only start a run with "
            f"quantization: {source_quantization}, not {quantization!r} (its base weights exist only in "
            f"{source_quantization}). Start from the full-precision checkpoint the QLoRA run began with instead."
        )
    if stored is not None and stored.get("lora") is not None:
        adapters = LoraOptions(**stored["lora"])
    elif lora is not None:
        adapters = lora
        warnings.warn(
            f"weights_from: {path!r} holds LoRA adapters but not their options (a checkpoint from an older p2r); "
            f"merging them with this run's LoRA options ({lora}). If the SFT run used another alpha or rank, "
            "the merged model is not the SFT model.",
            stacklevel=3,
        )
    else:
        raise ValueError(
            f"weights_from: {path!r} holds LoRA adapters but not their options (alpha, rank, target modules), "
            "which are needed to merge them into the base; set backbone.lora to the SFT run's LoRA options."
        )
    model = make_model(dtype, config if quantized else None)
    with_adapters = add_lora(model, adapters)
    if quantized:
        _load_quantized(with_adapters, _model_entries(state), path)
    else:
        _load_checked(with_adapters, _model_entries(state), path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear.*")
        merged = with_adapters.merge_and_unload()
    if config is not None and not quantized:
        merged = requantize(merged, config, dtype)
    return merged


def quantization_config(quantization: str | None, dtype: torch.dtype) -> Any:
    """bitsandbytes' loading config for "4bit" (NF4, double quantization, computing in ``dtype``) or
    "8bit"; None without quantization."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    # The vision tower and lm_head stay in full precision (QLoRA quantizes the language model).
    # Plain names for transformers versions that match substrings, ".*name" for those (5.2x)
    # that match from the start of the module path.
    skip = [*VISUAL_NAMES, *(f".*{n}" for n in VISUAL_NAMES), "lm_head"]
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds bitsandbytes 4/8-bit layers (transformers marks such models ``is_quantized``)."""
    return getattr(model, "is_quantized", False) or any("4bit" in type(m).__name__ or "8bit" in type(m).__name__
                                                           for m in model.modules())


def add_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """``model`` with peft LoRA adapters on the language model's ``options.target_modules``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
        exclude_modules=r".*(" + "|".join(VISUAL_NAMES) + r").*",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder submodule, found by the names Hugging Face VLMs use."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISUAL_NAMES:
            return module
    raise AttributeError(f"{type(model).__name__} has no vision tower named one of {VISUAL_NAMES}")


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated block classes of ``model`` (decoder layers, vision blocks): FSDP's units."""
    names = ("DecoderLayer", "VisionBlock", "Block", "EncoderLayer")
    return {type(m) for m in model.modules() if type(m).__name__.endswith(names) and m is not model}


def frozen_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` that never trains, its parameters in ``dtype`` (buffers keep
    theirs, as a model loaded in ``dtype`` has them): PA-GRPO's reference policy.

    The parameters are copied straight into ``dtype``, so a bfloat16 reference of a float32 policy
    never holds a second float32 model in memory (7B: 15 GiB instead of 31 GiB more per process).
    """
    params = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo=params).eval()


def seeded_model(make: Callable[[], nn.Module], seed: int, device: torch.device | str | None = None) -> nn.Module:
    """``make()`` with the random state seeded by ``seed`` and restored afterwards, so the same config
    and seed always give the same random weights; ``device`` (e.g. "cuda") creates them there (None:
    where ``make`` puts them)."""
    if device is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make()
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        return make()


def requantize(model: nn.Module, config: Any, dtype: torch.dtype) -> nn.Module:
    """bitsandbytes quantizes while loading: round-trip ``model`` through a temporary folder
    (the presets built from a config, and full-precision weights loaded before QLoRA)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return type(model).from_pretrained(tmp, quantization_config=config, dtype=dtype)


def _model_entries(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``model.*`` entries of a backbone state, prefix removed (the keys of ``backbone.model``)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def _check_shapes(own: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]], path: str) -> None:
    """Refuse a checkpoint whose keys or shapes (``theirs``) differ from the module's (``own``)."""
    resized = [k for k, shape in theirs.items() if k in own and tuple(own[k]) != tuple(shape)]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    if missing or unexpected or resized:
        raise ValueError(
            f"weights_from: {path!r} does not match this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(resized)} of another shape (e.g. {resized[:3]}); "
            "was it trained with the same backbone config (size, LoRA)?"
        )


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], path: str, ignore: set[str] = frozenset()) -> None:
    """``module.load_state_dict(state)`` after checking that every key and shape matches (keys in
    ``ignore`` were loaded otherwise)."""
    own = {k: v.shape for k, v in module.state_dict().items() if k not in ignore}
    _check_shapes(own, {k: v.shape for k, v in state.items()}, path)
    module.load_state_dict(state, strict=not ignore)


def _distributed_entries(path: str) -> dict[str, Any] | None:
    """The ``backbone.*`` metadata of a distributed checkpoint folder; None for a file."""
    return distributed_backbone_entries(path, "weights_from") if Path(path).is_dir() else None


def _load_distributed_checked(model: nn.Module, entries: dict[str, Any], path: str) -> None:
    """Load a full distributed checkpoint folder (its ``entries``' metadata) into ``model`` in place,
    after the key and shape check."""
    theirs = _model_entries({k[len(BACKBONE_PREFIX) :]: tuple(m.size) for k, m in entries.items()})
    own = model.state_dict()
    _check_shapes({k: v.shape for k, v in own.items()}, theirs, path)
    load_distributed_into({f"{BACKBONE_PREFIX}model.{k}": v for k, v in own.items()}, path)


def _load_quantized(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a QLoRA state (4-bit packed weights with their quantization state, float adapters and
    the layers left in full precision) into a module of the same layout.

    ``load_state_dict`` cannot restore bitsandbytes' packed weights: each 4-bit layer's weight is
    rebuilt from its packed data and quantization statistics (``Params4bit.from_prequantized``, as
    transformers does when it loads a quantized folder); every other entry loads as usual.
    """
    from bitsandbytes.nn import Linear4bit, Params4bit

    if any(type(m).__name__.startswith("Linear8bit") for m in module.modules()):
        raise ValueError(f"weights_from: {path!r}: adapters over an 8-bit base cannot be loaded into a later stage; "
                         "start from the full-precision checkpoint the 8-bit run began with")
    taken: set[str] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        key = f"{name}.weight"
        stats = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if key not in state or not stats:
            raise ValueError(f"weights_from: {path!r} has no 4-bit weight {key!r}: was it trained with the same "
                             "backbone config (size, quantization)?")
        layer.weight = Params4bit.from_prequantized(state[key], stats, requires_grad=False,
                                                    device=layer.weight.device, module=layer)
        taken |= {key, *(f"{key}.{k}" for k in stats)}
    _load_checked(module, {k: v for k, v in state.items() if k not in taken}, path, ignore=taken)
