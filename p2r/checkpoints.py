"""Checkpoints: written so that no crash breaks one, kept final, and read back whatever wrote them.

Writing. :func:`atomic_write` writes a file beside its destination under a hidden temporary name,
flushes and fsyncs it, renames it over the destination (atomic within one filesystem) and fsyncs
the folder, so the destination is always either the previous complete file or the new complete
one, whatever kills the process and whatever filesystems TMPDIR and the checkpoint folder are on
(Lightning's own save stages the file in TMPDIR and, across filesystems, falls back to a copy
that truncates the previous file first). A full disk fails the save with an error and leaves the
previous file as it was. :class:`AtomicCheckpointIO` is the Trainer's checkpoint writer that
does this; ``p2r.cli`` installs it on every run (sharded FSDP2 folders are handled by
``p2r.strategies.FSDP2Strategy``). :class:`FinalCheckpoint` keeps ``last.ckpt`` the final state
of a run however it ends. :func:`check_writable` refuses folders that cannot be written before
anything is built.

Reading. A Lightning checkpoint is one ``.ckpt`` file (single device, DDP, FSDP1 full state) or,
from a sharded FSDP2 run (``configs/strategy/fsdp2.yaml``), a folder: Lightning's ``meta.pt`` plus
torch.distributed.checkpoint (DCP) files holding ``{"state_dict": ..., "optimizer_0": ...}``.
Both give the same ``backbone.*`` tensors; from a folder only those are read, in one process
and without a process group (the optimizer state, often twice the model's size, stays on disk).
Used by ``weights_from`` (the next stage's starting weights) and ``tools/export_hf.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from p2r.compat import last_saved_step, save_last_checkpoint, uses_default_checkpoint_io

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


def distributed_backbone_entries(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The ``backbone.*`` tensors of a Lightning distributed checkpoint folder, as DCP metadata
    (``.size``, ``.properties.dtype``; keys with the ``backbone.`` prefix): nothing is read but the
    metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / _META).is_file():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} is a folder without {_META}: not a Lightning distributed checkpoint "
            "(pass a .ckpt file or the checkpoint folder itself)"
        )
    try:
        entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what}: {str(path)!r} has {_META} but no torch.distributed.checkpoint files: {err}") from err
    return {k[len(_DCP_MODEL) :]: m for k, m in entries.items()
            if k.startswith(_DCP_MODEL + BACKBONE_PREFIX) and isinstance(m, TensorStorageMetadata)}


def load_distributed_into(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Read the entries ``tensors`` names (``backbone.*`` keys) of a distributed checkpoint folder
    straight into those tensors, in this one process: no second copy of the weights exists."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load({"state_dict": tensors}, checkpoint_id=Path(path), no_dist=True)


def _read_distributed(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The model entries of a Lightning distributed checkpoint, read in this one process."""
    model = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in distributed_backbone_entries(path, what).items()}
    load_distributed_into(model, path)
    return model


# ---- writing ---------------------------------------------------------------------------------

PARTIAL_SUFFIX = ".partial"  # a file or folder being written; never a checkpoint Lightning looks for


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where the filesystem cannot)."""
    with contextlib.suppress(OSError):  # some network filesystems refuse fsync on a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it is always the old or the new complete file.

    The data go to a hidden temporary file beside ``path`` (same folder, so the same filesystem),
    which is flushed, fsynced and renamed over ``path``; then the folder is fsynced. The previous
    file stays untouched until the rename. Temporary files left by writers that were killed are
    removed first. On any error (a full disk, a kill signal turned into an exception) the
    temporary file is removed and the error raised, naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
    partial = _partial_name(path)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            partial.unlink()
        cause = _os_error_in(err)
        if cause is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "there was no previous file"
        hint = " (the disk is full)" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(cause.errno, f"could not write checkpoint {path}{hint}: {cause.strerror or cause}; {kept}") from err
    fsync_folder(path.parent)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (torch.save reports a full disk as a RuntimeError raised while
    closing its zip writer, with the OSError as its context)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _is_local(path: str | Path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_write` for local paths (see the module doc).

    The checkpoint is serialised straight into the temporary file (no second copy in memory).
    Remote URLs (``s3://``, ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(str(path).removeprefix("file://"), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading (``--ckpt_path``), with a file that is not a readable checkpoint reported
        as such: torch's own message for it advises loading with ``weights_only=False``, which would run
        any code the file carries. p2r never does that."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise UnreadableCheckpoint(path, _unpickling_cause(str(err))) from None
        except (EOFError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
                raise
            raise UnreadableCheckpoint(path, str(err).splitlines()[0]) from None


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read with weights-only loading: corrupt, truncated or not a checkpoint."""

    def __init__(self, path: Any, cause: str) -> None:
        super().__init__(
            f"--ckpt_path: {str(path)!r} is not a readable checkpoint ({cause}). The file is corrupt, truncated, "
            "or not a PyTorch Lightning checkpoint; p2r reads checkpoints with weights-only loading and never "
            "unpickles code from them. Resume from another checkpoint (e.g. a periodic one in the same folder)."
        )


def _unpickling_cause(message: str) -> str:
    """The part of torch's weights-only error that says what was wrong, without its advice."""
    marker = "WeightsUnpickler error:"
    if marker in message:
        return message.split(marker, 1)[1].strip().splitlines()[0]
    return message.splitlines()[0]


def install_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Make ``trainer`` write single-file checkpoints with :class:`AtomicCheckpointIO`, unless a
    config chose another writer (a plugin that is not Lightning's default ``TorchCheckpointIO``)."""
    if uses_default_checkpoint_io(trainer.strategy):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def check_writable(folders: dict[str, str | Path]) -> None:
    """Create each folder if needed and write a probe file in it; raise naming the option otherwise.

    ``folders`` maps the option that set a folder (``trainer.default_root_dir``, ...) to the
    folder. Run before the model is built, so a read-only checkpoint folder fails in seconds, not
    at the first save hours later with the metrics of the steps before lost.
    """
    for option, folder in folders.items():
        if not _is_local(folder):
            continue
        folder = Path(str(folder).removeprefix("file://"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise PermissionError(
                f"{option}: cannot write to {str(folder)!r} ({err.strerror or err}); checkpoints and logs go there: "
                "point it at a writable folder"
            ) from err


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: the ModelCheckpoint's ``last.ckpt`` (else the run folder's)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def check_last_destination(trainer: L.Trainer, ckpt_path: str | Path | None) -> None:
    """Before a fit builds anything: refuse a ``last.ckpt`` in the destination that this run would
    write over or could not write, instead of finding out at the first save or at the end.

    - a fresh run (no ``--ckpt_path``) into a folder that holds another run's ``last.ckpt``: its
      saves would go to ``last-v1.ckpt`` beside the old file, and ``--ckpt_path last`` would
      then pick either;
    - a run resuming from another checkpoint into such a folder: the same;
    - a ``last.ckpt`` folder (a sharded FSDP2 or FSDP checkpoint) where this run writes single files
      (no sharded strategy): its final save would fail with "Is a directory" after every step.
    """
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
        return
    last = last_checkpoint_path(trainer)
    if not last.exists():
        return
    if last.is_dir() and not isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
        raise FileExistsError(
            f"{last} is a sharded checkpoint folder (written by an FSDP2/FSDP run) but this run "
            f"({type(trainer.strategy).__name__}) writes single-file checkpoints there. Write this run "
            "elsewhere (--trainer.default_root_dir=...), run it with the strategy that wrote the folder, "
            "or move the folder away (its weights load with weights_from)"
        )
    resuming = ckpt_path is not None and (str(ckpt_path) == "last" or Path(ckpt_path).resolve() == last.resolve())
    if not resuming:
        what = "starts from scratch" if ckpt_path is None else f"resumes from {ckpt_path}"
        raise FileExistsError(
            f"{last} is an earlier run's checkpoint, and this run {what} into the same folder (its saves "
            "would go beside it as last-v1.ckpt). Resume that run with --ckpt_path last, write this one "
            "elsewhere with --trainer.default_root_dir=..., or delete the old checkpoints"
        )


class FinalCheckpoint(L.Callback):
    """``last.ckpt`` holds the final state of every run that ends or is stopped.

    - The run ends (``max_steps``, ``max_epochs``, an early stop, the non-finite stop): Lightning's
      ModelCheckpoint writes ``last.ckpt`` only at its ``every_n_train_steps`` (a run to step 10
      with N = 7 would keep step 7), so this saves it at the end unless it was just saved at the
      final step.
    - SIGTERM (SLURM pre-emption or time limit, ``scancel``, Kubernetes eviction, a spot instance
      reclaimed): Lightning stops at the end of the current batch on every rank; this saves
      ``last.ckpt`` at that step before the process exits, and ``--ckpt_path last`` resumes there
      (model, optimizer, schedule, callbacks, data position). SLURM: ask for the signal ahead of the
      kill (``#SBATCH --signal=TERM@120``) so the save has time to finish.

    Saves go where ``--ckpt_path last`` looks (the ModelCheckpoint's folder).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last or trainer.global_step == 0:
            return
        # ModelCheckpoint saves last.ckpt with every periodic save, so a save at the final step means it is current.
        if last_saved_step(callback) == trainer.global_step and callback.last_model_path:
            return
        self._save(trainer, "end of training")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")

    @staticmethod
    def _save(trainer: L.Trainer, why: str) -> None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            # Through the callback, so that it knows last.ckpt is current and its own on_train_end does
            # not save it again as last-v1.ckpt (which --ckpt_path last would then resume from).
            save_last_checkpoint(callback, trainer)
            path = Path(callback.last_model_path)
        else:
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
        rank_zero_info(f"{why}: saved {path} at global step {trainer.global_step}; resume with --ckpt_path last")
