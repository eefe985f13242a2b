"""p2r.progress: progress as plain lines when output is a log file, worked strings and a real fit."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from p2r.cli import main
from p2r.progress import LineProgressBar, format_duration, progress_line, wants_line_progress

REPO = Path(__file__).resolve().parents[1]


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_format_duration_on_worked_values():
    assert format_duration(7) == "7s"
    assert format_duration(98.4) == "1m38s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(float("inf")) == format_duration(-1) == format_duration(float("nan")) == "?"


def test_progress_line_on_worked_values():
    # 500 of 2250 steps in 100 s: 5 steps/s, 1750 left = 350 s.
    line = progress_line("train", 500, 2250, 100.0, "step", {"train/loss": 0.15871, "train/tokens_per_s": 10843.6, "v_num": 0},
                         epoch=0)
    assert line == ("train epoch 0 step 500/2250 (22%) | 5.00 steps/s | 1m40s elapsed, 5m50s left | "
                    "train/loss 0.1587 train/tokens_per_s 10844")
    # Resumed at step 400: 100 steps in 50 s is 2 steps/s, not 10; 1750 left = 875 s.
    assert progress_line("train", 500, 2250, 50.0, "step", {}, 1, first=400) == \
        "train epoch 1 step 500/2250 (22%) | 2.00 steps/s | 50s elapsed, 14m35s left"
    # A stream of unknown length: no share, no time left.
    assert progress_line("test", 30, math.inf, 10.0, "batch", {}) == "test batch 30 | 3.00 batches/s | 10s elapsed"
    assert progress_line("test", 0, 10, 0.0, "batch", {}) == "test batch 0/10 (0%) | - batches/s | 0s elapsed, ? left"


def test_line_progress_only_for_a_log_file_with_no_bar_of_its_own():
    assert wants_line_progress({}, Stream(tty=False))
    assert not wants_line_progress({}, Stream(tty=True))
    assert not wants_line_progress({"enable_progress_bar": False}, Stream(tty=False))
    assert not wants_line_progress({"callbacks": [TQDMProgressBar()]}, Stream(tty=False))
    assert wants_line_progress({"callbacks": None, "enable_progress_bar": None}, Stream(tty=False))


def test_every_s_must_not_be_negative():
    with pytest.raises(ValueError, match="every_s"):
        LineProgressBar(every_s=-1)


class Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self.layer(batch[0]).sum()

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_lines(every_s: float, capsys) -> list[str]:
    data = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 batches an epoch
    trainer = Trainer(max_epochs=2, callbacks=[LineProgressBar(every_s)], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=1, accelerator="cpu")
    trainer.fit(Linear(), data, data)
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("train", "validate"))]


def test_a_line_after_every_step_and_epoch_with_metrics(capsys):
    lines = fit_lines(0.0, capsys)
    train = [ln for ln in lines if ln.startswith("train")]
    assert len(train) == 6 + 2  # after each of 2 x 3 steps, and at each epoch's end
    assert train[0].startswith("train epoch 0 step 1/6 (17%) | ")
    assert train[-1].startswith("train epoch 1 step 6/6 (100%) | ") and "0s left" in train[-1]
    assert all("train/loss " in ln for ln in train)
    validate = [ln for ln in lines if ln.startswith("validate")]
    assert [ln.split(" |")[0] for ln in validate] == ["validate batch 1/3 (33%)", "validate batch 2/3 (67%)",
                                                         "validate batch 3/3 (100%)"] * 2  # no sanity-check lines


def test_a_long_interval_leaves_the_ends_of_epochs_and_sets(capsys):
    lines = fit_lines(3600.0, capsys)
    assert [ln.split(" |")[0] for ln in lines] == ["validate batch 3/3 (100%)", "train epoch 0 step 3/6 (50%)",
                                                   "validate batch 3/3 (100%)", "train epoch 1 step 6/6 (100%)"]


def test_each_test_set_has_its_own_lines(capsys):
    sets = [DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=2) for n in (4, 2)]
    trainer = Trainer(callbacks=[LineProgressBar(0.0)], logger=False, enable_model_summary=False, accelerator="cpu")
    trainer.test(Linear(), sets)
    lines = [ln.split(" |")[0] for ln in capsys.readouterr().err.splitlines() if ln.startswith("test")]
    assert lines == ["test set 1/2 batch 1/2 (50%)", "test set 1/2 batch 2/2 (100%)", "test set 2/2 batch 1/1 (100%)"]


def test_a_one_batch_pass_is_timed_from_the_start_of_its_batch(capsys, monkeypatch):
    """Timed from the end of the first batch, a one-batch pass reported "85055 batches/s"."""
    class Slow(Linear):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            clock[0] += 2.0  # the batch takes 2 s on the bar's clock
            return super().test_step(batch, batch_idx, dataloader_idx)

    clock = [100.0]
    monkeypatch.setattr("p2r.progress.time.monotonic", lambda: clock[0])
    trainer = Trainer(callbacks=[LineProgressBar(0.0)], logger=False, enable_model_summary=False, accelerator="cpu")
    trainer.test(Slow(), DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2))
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("test")]
    assert line.startswith("test batch 1/1 (100%) | 0.50 batches/s | 2s elapsed")


@pytest.mark.parametrize("tty, bars", [(False, (LineProgressBar,)), (True, (RichProgressBar, TQDMProgressBar))])
def test_the_cli_prints_lines_when_stderr_is_a_file(tty, bars):
    """The real CLI on the shipped SFT config: a log file gets LineProgressBar, a terminal Lightning's bar."""
    args = ["--config", str(REPO / "configs" / "sft.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
    with mock.patch.object(sys, "stderr", Stream(tty)), mock.patch.object(sys, "argv", ["p2r"]):
        cli = main(args, run=False)
    assert type(cli.trainer.progress_bar_callback) in bars
    with mock.patch.object(sys, "stderr", Stream(False)), mock.patch.object(sys, "argv", ["p2r"]):
        cli = main([*args, "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None
