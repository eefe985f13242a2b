"""Every skip lands in ``data/skipped_samples`` at the step it happened: the items the data workers
could not use while assembling a batch, and (SFT) records without a CoT target, also when a whole
batch has none; the running total survives a checkpoint. SFT and PA-GRPO alike."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import webdataset as wds

from callbacks.reward_callbacks import RewardCallback
from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.algorithms.sft import SFTModule
from p2r.backbones import TinyQwen25VL
from p2r.data.datamodule import decode_sample
from p2r.data.video import FrameSampling

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784)


class ConstantReward(RewardCallback):
    name, process = "reasoning/constant", "reasoning"

    def score(self, rollouts):
        return [1.0] * len(rollouts.completion_ids)


class SkipsPerStep(L.Callback):
    def __init__(self) -> None:
        self.totals: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.totals.append(float(trainer.callback_metrics["data/skipped_samples"]))


@pytest.fixture(scope="module")
def samples(synthetic_root):
    raw = wds.tarfile_to_samples()(iter([{"url": str(u)} for u in sorted((synthetic_root / "shards").glob("train-*.tar"))]))
    return [decode_sample(r, FRAMES) for r in raw][:8]


def without_target(sample):
    sample = copy.copy(sample)
    sample.record = copy.copy(sample.record)
    sample.record.output = sample.record.observation = sample.record.process = ""
    return sample


def with_skips(sample, n: int):
    sample = copy.copy(sample)
    sample.skipped = n
    return sample


@pytest.mark.parametrize("kind", ["sft", "pagrpo"])
def test_each_skip_is_counted_at_its_step(samples, kind):
    s = samples
    batches = [
        [with_skips(s[0], 2), s[1]],  # the workers skipped 2 items while assembling this batch
        [without_target(s[2]), s[3]],  # SFT cannot train on a record without a CoT trace
        [with_skips(without_target(s[4]), 1), without_target(s[5])],  # nothing to train on at all
        [s[6], s[7]],
    ]
    backbone = TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1, seed=0)
    module = (SFTModule(backbone, lr=1e-3) if kind == "sft"
              else PAGRPOModule(backbone, lr=1e-3, rollout=RolloutSettings(group_size=2, max_completion_length=4),
                              loss=LossSettings(beta=0.0)))
    seen = SkipsPerStep()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[seen, *([ConstantReward()] if kind == "pagrpo" else [])])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    # PA-GRPO needs no CoT target: only the workers' skips count.
    assert seen.totals == ([2, 3, 6, 6] if kind == "sft" else [2, 2, 3, 3])
    saved: dict = {}
    module.on_save_checkpoint(saved)
    fresh = SFTModule(TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1))
    fresh.on_load_checkpoint(saved)
    assert fresh.skipped_samples == seen.totals[-1]
