"""Every use of a framework's private member, and every process-wide setting of the CLI, in one place.

p2r relies on a few members that Lightning, transformers, torch and jsonargparse do not promise to
keep. Each is used only through this module, and ``tests/test_compat.py`` asserts that each still
exists with the signature and behaviour relied on here, so an upgrade that changes one fails there,
naming it, instead of somewhere inside a run. Checked on lightning 2.6.6, transformers 5.24,
torch 2.14 and jsonargparse 4.53.

Lightning
  - ``LightningCLI._parse_ckpt_path``: merges a checkpoint's hyperparameters (and module class) over
    the config; :class:`CheckpointSuppliesWeightsOnly` turns it off (see ``p2r.cli.P2RCLI``).
  - ``ModelParallelStrategy._data_parallel_size``: the data-parallel size its ``setup_environment``
    builds the device mesh from; :func:`set_data_parallel_size` (``p2r.strategies.FSDP2Strategy``).
  - ``LightningModule._trainer``: the trainer or None (the public ``trainer`` raises when there is
    none); :func:`attached_trainer`.
  - ``ModelCheckpoint._last_global_step_saved``: the step of its latest save; :func:`last_saved_step`
    (``p2r.checkpoints.FinalCheckpoint``).
  - ``ModelCheckpoint._save_last_checkpoint(trainer, monitor_candidates)`` and
    ``ModelCheckpoint._monitor_candidates(trainer)``: its own save of ``last.ckpt``, which records the
    file as its last one; :func:`save_last_checkpoint` (``FinalCheckpoint``: a save made any other
    way makes the callback's ``on_train_end`` save again under a versioned name, ``last-v1.ckpt``).
  - Lightning's default checkpoint writer is ``TorchCheckpointIO`` and ``strategy.checkpoint_io`` may be
    replaced before the run starts: :func:`uses_default_checkpoint_io` (``p2r.checkpoints``).
transformers
  - ``config._attn_implementation``: the attention kernel a model built from ``config`` dispatches
    to, read at every forward; :func:`attention_implementation`, :func:`set_attention_implementation`;
    :func:`register_attention_kernel` adds one (``p2r.backbones.attention``), with its masks built as
    for a built-in one (``AttentionMaskInterface``).
  - ``PreTrainedModel._from_config(config, dtype=...)``: builds a model with its weights created in
    ``dtype`` (a 7B model never exists in float32 first); :func:`model_from_config`.
torch
  - ``torch._dynamo.mark_static_address``: a tensor whose address a CUDA graph may keep;
    :func:`mark_static_address`.
jsonargparse
  - ``_typehints.subclass_spec_as_namespace``: a value given on the command line for a key nested in
    a class inside a class (``--model.init_args.backbone.init_args.weights_from=null``) is parsed, then
    turned back into text with ``str`` for the inner class's parser: ``None`` arrives as the string
    ``"None"``. :func:`fix_nested_values` writes such values back as JSON (``null``), which the inner
    parser reads as the value given.

Process-wide settings of ``p2r`` runs (:func:`configure_cli_process`, called by ``p2r.cli.main``,
never at import): the warning filters in ``QUIET_WARNINGS`` (noise that says nothing actionable to a
p2r user), ``TOKENIZERS_PARALLELISM=false`` unless set (the tokenizers library would otherwise warn
about forking DataLoader workers), jsonargparse reading the docstring under each dataclass field into
``--help``, and :func:`fix_nested_values`. Framework modules are imported inside the functions, so
importing this module loads nothing beyond torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*Qwen3VL video processing does not apply the per-frame pixel cap.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # p2r's streams split themselves over workers (p2r.data.datamodule), so __len__ is exact.
    r".*Your `IterableDataset` has `__len__` defined.*",
)


# ---- Lightning ---------------------------------------------------------------------------------


class CheckpointSuppliesWeightsOnly:
    """LightningCLI mixin: ``--ckpt_path`` supplies weights and training state, never hyperparameters.

    Lightning's CLI merges the hyperparameters saved in the checkpoint over the config (and its module
    class over the configured one) in ``_parse_ckpt_path``; this makes that step do nothing.
    """

    def _parse_ckpt_path(self) -> None:
        return


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Make a ModelParallelStrategy build its device mesh with ``size`` data-parallel ranks (call
    before its ``setup_environment``)."""
    strategy._data_parallel_size = size


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` (a LightningModule) is attached to, or None."""
    return module._trainer


def last_saved_step(callback: Any) -> int:
    """The global step of a ModelCheckpoint's latest save (0 before any)."""
    return callback._last_global_step_saved


def save_last_checkpoint(callback: Any, trainer: Any) -> None:
    """Save ``last.ckpt`` through a ModelCheckpoint exactly as its periodic saves do."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def uses_default_checkpoint_io(strategy: Any) -> bool:
    """True when ``strategy`` writes checkpoints with Lightning's default writer (no plugin chose another)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return type(strategy.checkpoint_io) is TorchCheckpointIO


# ---- transformers ------------------------------------------------------------------------------


def attention_implementation(config: Any) -> str | None:
    """The attention kernel a model built from ``config`` dispatches to ("sdpa", "eager", ...)."""
    return getattr(config, "_attn_implementation", None)


def set_attention_implementation(config: Any, name: str) -> None:
    """Make a model built from ``config`` use the attention kernel ``name`` (set before building)."""
    config._attn_implementation = name


def register_attention_kernel(name: str, function: Callable, mask_like: str) -> None:
    """Make ``name`` an attention kernel a config may dispatch to (transformers' AttentionInterface),
    whose masks transformers builds as for its kernel ``mask_like`` (AttentionMaskInterface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])


def model_from_config(model_class: type[nn.Module], config: Any, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised ``model_class`` for ``config`` with its weights created in ``dtype``."""
    return model_class._from_config(config, dtype=dtype)


# ---- torch -------------------------------------------------------------------------------------


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell torch.compile that ``tensor`` keeps its address between calls (CUDA graphs read it in place)."""
    torch._dynamo.mark_static_address(tensor)


# ---- jsonargparse ------------------------------------------------------------------------------

_NESTED_FIX = "_p2r_nested_values_as_json"


def fix_nested_values() -> None:
    """Give nested command-line values to the inner class's parser as JSON, not ``str`` (see the
    module doc): ``--a.init_args.b.init_args.c=null`` then sets ``c`` to None. Idempotent."""
    from jsonargparse import _typehints
    from jsonargparse._util import NestedArg

    original = _typehints.subclass_spec_as_namespace
    if getattr(original, _NESTED_FIX, False):
        return

    def as_namespace(val: Any, prev_val: Any = None) -> Any:
        out = original(val, prev_val)
        nested = out.get("init_args") if out is not None else None
        if isinstance(nested, NestedArg) and not isinstance(nested.val, str):
            with contextlib.suppress(TypeError, ValueError):  # not JSON: left as jsonargparse has it
                out["init_args"] = NestedArg(key=nested.key, val=json.dumps(nested.val))
        return out

    setattr(as_namespace, _NESTED_FIX, True)
    as_namespace.__wrapped__ = original  # type: ignore[attr-defined]
    _typehints.subclass_spec_as_namespace = as_namespace


# ---- the CLI process ---------------------------------------------------------------------------


def configure_cli_process() -> None:
    """The process-wide settings of a p2r run (see the module doc); ``p2r.cli.main`` calls it."""
    from jsonargparse import set_parsing_settings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    fix_nested_values()
