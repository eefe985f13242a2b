"""Reading the backbone weights of a p2r checkpoint, whatever wrote it.

A Lightning checkpoint is one ``.ckpt`` file (single device, DDP, FSDP1 full state) or, from a
sharded FSDP2 run (``configs/strategy/fsdp2.yaml``), a folder: Lightning's ``meta.pt`` plus
torch.distributed.checkpoint (DCP) files holding ``{"state_dict": ..., "optimizer_0": ...}``.
Both give the same ``backbone.*`` tensors; from a folder only those are read, in one process
and without a process group (the optimizer state, often twice the model's size, stays on disk).
Used by ``weights_from`` (the next stage's starting weights) and ``tools/export_hf.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

BACKBONE_PREFIX = "backbone."
# The checkpoint entry where p2r's modules record the backbone's LoRA options and quantization.
BACKBONE_OPTIONS = "p2r_backbone"
# DCP flattens the nested {"state_dict": {...}} with dots.
_DCP_MODEL = "state_dict."
_META = "meta.pt"


def read_backbone_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a p2r checkpoint (file or FSDP2 folder), prefix removed.

    ``what`` names the option the path came from, for error messages (``weights_from``, ``--ckpt``).
    Files are loaded with ``weights_only=True`` (a checkpoint cannot run code) and memory-mapped.
    """
    path = Path(path)
    if path.is_dir():
        state = _read_distributed(path, what)
    elif path.is_file():
        # Memory-mapped: the ranks of a node share the file's pages instead of each holding a copy
        # (a 7B float32 state is 31 GiB).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
    else:
        raise FileNotFoundError(f"{what}: no checkpoint file or folder at {str(path)!r} (pass what an earlier p2r fit wrote)")
    backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not backbone:
        raise ValueError(f"{what}: {str(path)!r} holds no 'backbone.*' weights in its state_dict (is it a checkpoint of a p2r run?)")
    return backbone


def read_backbone_options(path: str | Path, what: str = "checkpoint") -> dict[str, Any] | None:
    """The backbone options a p2r run stored beside its weights (``BACKBONE_OPTIONS``: LoRA options,
    quantization), or None for a checkpoint written before p2r stored them."""
    path = Path(path)
    source = path / _META if path.is_dir() else path
    if not source.is_file():
        raise FileNotFoundError(f"{what}: no checkpoint file or folder at {str(path)!r}")
    return torch.load(source, map_location="cpu", weights_only=True, mmap=True).get(BACKBONE_OPTIONS)


def _read_distributed(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The model entries of a Lightning distributed checkpoint, read in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / _META).is_file():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} is a folder without {_META}: not a Lightning distributed checkpoint "
            "(pass a .ckpt file or the checkpoint folder itself)"
        )
    try:
        entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what}: {str(path)!r} has {_META} but no torch.distributed.checkpoint files: {err}") from err
    model = {
        k[len(_DCP_MODEL) :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in entries.items()
        if k.startswith(_DCP_MODEL + BACKBONE_PREFIX) and isinstance(m, TensorStorageMetadata)
    }
    request = {"state_dict": model}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(request, checkpoint_id=path, no_dist=True)
    return request["state_dict"]
