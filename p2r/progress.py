"""Progress as plain lines, for runs whose output is a log file rather than a terminal.

Lightning's default progress bar (Rich, or tqdm) redraws one line in place: written to a file, as
under SLURM, ``nohup`` or CI, Rich shows nothing until the run ends and tqdm leaves carriage-return
noise. When stderr is not a terminal and the run configures no progress bar of its own, the p2r
CLI installs :class:`LineProgressBar`, which prints one flushed line every ``every_s`` seconds
(and at the end of each training epoch and each evaluation set) on global rank 0:

    train epoch 0 step 500/2250 (22%) | 5.12 steps/s | 1m38s elapsed, 5m42s left | train/loss 0.159

Set ``trainer.enable_progress_bar: false`` for no progress output, or configure any Lightning
progress bar in ``trainer.callbacks`` to use it instead.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``98.4`` -> ``"1m38s"``; ``7`` -> ``"7s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_value(value: Any) -> str:
    """A metric as a log reads it: 4 significant digits, large numbers whole (``10840``, not ``1.084e+04``)."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(stage: str, done: int, total: float, elapsed_s: float, unit: str,
                  metrics: dict[str, Any], epoch: int | None = None, first: int = 0) -> str:
    """One progress line: where the stage is, its rate, time elapsed and left, and the metrics.

    ``done`` of ``total`` are done; ``first`` is the count this process began at (a resumed fit
    starts at its checkpoint's step), so the rate ``(done - first) / elapsed_s`` counts this
    process's work only. ``total`` may be ``inf`` (a stream of unknown length): then
    no share and no time left. The rate is over the whole stage, steadier in a log than a window.
    """
    where = f"{stage} epoch {epoch}" if epoch is not None else stage
    known = math.isfinite(total) and total > 0
    count = f"{unit} {done}/{int(total)} ({100 * done / total:.0f}%)" if known else f"{unit} {done}"
    rate = (done - first) / elapsed_s if elapsed_s > 0 else float("nan")
    left = (total - done) / rate if known and rate > 0 else float("nan")
    timing = f"{format_duration(elapsed_s)} elapsed" + (f", {format_duration(left)} left" if known else "")
    units = "batches" if unit == "batch" else f"{unit}s"
    parts = [f"{where} {count}", f"{rate:.2f} {units}/s" if math.isfinite(rate) else f"- {units}/s", timing]
    shown = [f"{k} {format_value(v)}" for k, v in metrics.items() if k != "v_num"]
    return " | ".join(parts + ([" ".join(shown)] if shown else []))


class LineProgressBar(ProgressBar):
    """A progress bar for log files: a line every ``every_s`` seconds, per stage (module docstring)."""

    def __init__(self, every_s: float = 30.0) -> None:
        """
        Args:
            every_s: seconds between two lines of the same stage (0: a line after every batch).
        """
        super().__init__()
        if every_s < 0:
            raise ValueError(f"LineProgressBar: every_s must be >= 0 seconds, got {every_s}")
        self.every_s = every_s
        self._enabled = True
        self._start: dict[str, float] = {}  # stage -> monotonic time it began
        self._last: dict[str, float] = {}  # stage -> monotonic time of its last line
        self._first: dict[str, int] = {}  # stage -> count it began at
        self._train_total = math.inf  # optimizer steps of the whole fit

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _begin(self, stage: str, first: int = 0) -> None:
        self._start[stage] = self._last[stage] = time.monotonic()
        self._first[stage] = first

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str, done: int, total: float,
                force: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or not trainer.is_global_zero or stage not in self._start:
            return
        if not force and now - self._last[stage] < self.every_s:
            return
        self._last[stage] = now
        train = stage == "train"  # evaluation lines carry no metrics: they are computed at the stage's end
        line = progress_line(stage, done, total, now - self._start[stage], "step" if train else "batch",
                             self.get_metrics(trainer, pl_module) if train else {},
                             trainer.current_epoch if train else None, self._first[stage])
        print(line, file=sys.stderr, flush=True)

    # Training counts optimizer steps over the whole run (what max_steps and the schedule count).
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin("train", trainer.global_step)
        self._train_total = float(trainer.estimated_stepping_batches)  # inf for a stream without max_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._report(trainer, pl_module, "train", trainer.global_step, self._train_total)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train", trainer.global_step, self._train_total, force=True)

    # Evaluation stages count the batches of each dataloader (each benchmark of a test run), timed
    # from the start of their first batch (from its end, a one-batch pass would report an absurd rate).
    @staticmethod
    def _eval_name(stage: str, counts: list[float], dataloader_idx: int) -> str:
        return f"{stage} set {dataloader_idx + 1}/{len(counts)}" if len(counts) > 1 else stage

    def _begin_eval(self, stage: str, counts: list[float], batch_idx: int, dataloader_idx: int) -> None:
        if batch_idx == 0:
            self._begin(self._eval_name(stage, counts, dataloader_idx))

    def _report_eval(self, trainer: Trainer, pl_module: LightningModule, stage: str, counts: list[float],
                     batch_idx: int, dataloader_idx: int) -> None:
        total = float(counts[dataloader_idx])
        self._report(trainer, pl_module, self._eval_name(stage, counts, dataloader_idx), batch_idx + 1, total,
                     force=batch_idx + 1 == total)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._begin_eval("validate", trainer.num_val_batches, batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._begin_eval("test", trainer.num_test_batches, batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._begin_eval("predict", trainer.num_predict_batches, batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._report_eval(trainer, pl_module, "validate", trainer.num_val_batches, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._report_eval(trainer, pl_module, "test", trainer.num_test_batches, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._report_eval(trainer, pl_module, "predict", trainer.num_predict_batches, batch_idx, dataloader_idx)


def wants_line_progress(trainer_config: dict[str, Any], stream: Any = None) -> bool:
    """Whether the CLI should add a LineProgressBar: output is not a terminal, progress is on, and
    the config names no progress bar of its own."""
    stream = sys.stderr if stream is None else stream
    if trainer_config.get("enable_progress_bar") is False or stream.isatty():
        return False
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return not any(isinstance(c, ProgressBar) for c in callbacks)
