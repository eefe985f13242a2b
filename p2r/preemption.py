"""Save a checkpoint when the run is told to stop (SIGTERM: SLURM pre-emption or time limit,
``scancel``, Kubernetes eviction, a spot instance reclaimed).

Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the current training batch, on
every rank at once, and exits; this callback saves ``last.ckpt`` into the ModelCheckpoint's
folder first, so ``--ckpt_path last`` resumes from that very step (model, optimizer, schedule,
callbacks, data position). SLURM: ask for the signal ahead of the kill
(``#SBATCH --signal=TERM@120``) so the save has time to finish.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM, write ``last.ckpt`` (where ModelCheckpoint keeps it) before the process exits."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at global step {trainer.global_step}; resume with --ckpt_path last")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: the ModelCheckpoint's ``last.ckpt`` (else the run folder's)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
