"""Non-finite losses and gradients: the step is skipped (parameters and Adam moments untouched),
counted and logged; K bad steps in a row stop the run with a clear error. SFT (automatic
optimization) and PA-GRPO (manual) alike."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import webdataset as wds

import p2r.algorithms.pagrpo as pagrpo_module
import p2r.algorithms.sft as sft_module
from p2r.algorithms.nonfinite import NonFiniteGuard, tensors_finite
from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.algorithms.sft import SFTModule
from p2r.backbones import TinyQwen25VL
from p2r.data.datamodule import decode_sample
from p2r.data.video import FrameSampling
from varied_rewards import TokenSumReward

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784)


def test_guard_counts_resets_and_stops():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.record(True, "loss", 0) and not guard.record(False, "loss", 1)
    assert guard.record(True, "loss", 2) and guard.in_a_row == 0 and guard.total == 1
    assert not guard.record(False, "loss", 3)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at 2 optimizer steps in a row \(up to global step 4"):
        guard.record(False, "gradients", 4)
    assert tensors_finite([torch.ones(2), None]) and not tensors_finite([torch.tensor([1.0, float("nan")])])


@pytest.fixture(scope="module")
def batches(synthetic_root):
    raw = wds.tarfile_to_samples()(iter([{"url": str(u)} for u in sorted((synthetic_root / "shards").glob("train-*.tar"))]))
    samples = [decode_sample(r, FRAMES) for r in raw]
    return [samples[i : i + 2] for i in range(0, 12, 2)]


class Snapshots(L.Callback):
    """The trainable parameters before every optimizer step and at the end."""

    def __init__(self):
        self.before = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append([p.detach().clone() for p in module.parameters() if p.requires_grad])


def fit(module, batches, steps: int) -> tuple[Snapshots, L.Trainer]:
    snaps = Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snaps, *module_rewards(module)])
    loader = torch.utils.data.DataLoader(batches[:steps], batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    snaps.before.append([p.detach().clone() for p in module.parameters() if p.requires_grad])
    return snaps, trainer


def module_rewards(module) -> list:
    return [TokenSumReward()] if isinstance(module, PAGRPOModule) else []


def moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def make(kind: str, **kwargs):
    backbone = TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1, seed=0, freeze_vision=True)
    if kind == "sft":
        return SFTModule(backbone, lr=1e-3, schedule="constant", **kwargs)
    return PAGRPOModule(backbone, lr=1e-3, schedule="constant", rollout=RolloutSettings(group_size=2, max_completion_length=6),
                        loss=LossSettings(beta=0.0), **kwargs)


def poison(monkeypatch, kind: str, bad_calls: set[int]) -> None:
    """Make the loss NaN on the given calls (0-based) of the module's loss function."""
    target, name = (sft_module, "answer_loss") if kind == "sft" else (pagrpo_module, "pagrpo_loss")
    real, calls = getattr(target, name), []

    def loss_fn(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) - 1 in bad_calls:
            return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(target, name, loss_fn)


@pytest.mark.parametrize("kind", ["sft", "pagrpo"])
def test_a_nan_loss_skips_only_its_step(batches, monkeypatch, kind):
    poison(monkeypatch, kind, {1})
    module = make(kind)
    snaps, trainer = fit(module, batches, 4)
    steps = snaps.before
    assert moved(steps[0], steps[1])  # step 0 trained
    assert not moved(steps[1], steps[2])  # step 1 (NaN loss) changed nothing
    assert moved(steps[2], steps[3])  # training went on
    assert module.nonfinite.total == 1
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("kind", ["sft", "pagrpo"])
def test_nan_gradients_skip_the_step(batches, kind):
    module = make(kind)
    module.configure_model()
    calls = []

    def nan_on_second_backward(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 2 else grad

    next(p for p in module.parameters() if p.requires_grad).register_hook(nan_on_second_backward)
    snaps, _ = fit(module, batches, 3)
    assert moved(snaps.before[0], snaps.before[1]) and not moved(snaps.before[1], snaps.before[2])
    assert module.nonfinite.total == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("kind", ["sft", "pagrpo"])
def test_k_bad_steps_in_a_row_stop_the_run(batches, monkeypatch, kind):
    poison(monkeypatch, kind, {1, 2, 3})
    with pytest.raises(FloatingPointError, match="non-finite loss at 3 optimizer steps in a row"):
        fit(make(kind, max_nonfinite_steps=3), batches, 6)


@pytest.mark.parametrize("kind", ["sft", "pagrpo"])
def test_k_steps_of_nan_gradients_in_a_row_stop_the_run(batches, kind):
    """The loss is finite on every step; the gradients are not from the second backward on."""
    module = make(kind, max_nonfinite_steps=3)
    module.configure_model()
    calls = []

    def nan_from_the_second_backward(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) >= 2 else grad

    next(p for p in module.parameters() if p.requires_grad).register_hook(nan_from_the_second_backward)
    with pytest.raises(FloatingPointError, match="non-finite gradients at 3 optimizer steps in a row"):
        fit(module, batches, 6)
