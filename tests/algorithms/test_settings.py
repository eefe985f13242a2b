"""Settings that cannot work are refused through the CLI before any model is built, naming the key
and its allowed range (issue 16): group_size 1 would train with every advantage 0, 0 and negatives
used to fail deep inside the first rollout."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings, RolloutSettings, SettingError
from p2r.algorithms.sft import SFTModule
from p2r.backbones.base import VideoBackbone
from p2r.cli import main

ROOT = Path(__file__).resolve().parents[2]
RL = ["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml"]
SFT = ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/tiny.yaml"]


@pytest.fixture(autouse=True)
def no_model_building(monkeypatch):
    """A refused setting must stop the run before the weights exist."""

    def build(self):
        raise AssertionError("the model was built before the bad setting was refused")

    monkeypatch.setattr(VideoBackbone, "build", build)


@pytest.mark.parametrize(("job", "flag", "message"), [
    (RL, "rollout.group_size=1", r"model\.init_args\.rollout\.group_size must be >= 2 .*got 1"),
    (RL, "rollout.group_size=0", r"model\.init_args\.rollout\.group_size must be >= 2 .*got 0"),
    (RL, "rollout.group_size=-2", r"model\.init_args\.rollout\.group_size must be >= 2 .*got -2"),
    (RL, "rollout.max_completion_length=0", r"model\.init_args\.rollout\.max_completion_length must be >= 1, got 0"),
    (RL, "loss.beta=-0.1", r"model\.init_args\.loss\.beta must be >= 0, got -0\.1"),
    (RL, "num_iterations=0", r"model\.init_args\.num_iterations must be >= 1, got 0"),
    (SFT, "lr=-1e-5", r"model\.init_args\.lr must be >= 0, got -1e-05"),
    (SFT, "warmup_ratio=1.5", r"model\.init_args\.warmup_ratio must be in \[0, 1\], got 1\.5"),
], ids=lambda v: v if isinstance(v, str) and "=" in v else None)
def test_the_cli_refuses_impossible_settings_naming_the_key(job, flag, message):
    with pytest.raises(SettingError, match=message):
        main([*job, f"--model.init_args.{flag}", "--trainer.logger=false"])


@pytest.mark.parametrize(("make", "message"), [
    (lambda: RolloutSettings(temperature=0), r"rollout\.temperature must be > 0"),
    (lambda: RolloutSettings(top_p=1.5), r"rollout\.top_p must be in \(0, 1\], got 1\.5"),
    (lambda: RolloutSettings(shuffled_group_size=0), r"rollout\.shuffled_group_size must be >= 1 or null"),
    (lambda: LossSettings(epsilon=0), r"loss\.epsilon must be in \(0, 1\)"),
    (lambda: LossSettings(epsilon_high=-1), r"loss\.epsilon_high must be > 0 or null"),
    (lambda: LossSettings(kl_log_ratio_clip=0), r"loss\.kl_log_ratio_clip must be > 0 or null"),
    (lambda: LossSettings(advantage_eps=-1e-4), r"loss\.advantage_eps must be >= 0"),
    (lambda: LossSettings(aggregation="mean"), r"loss\.aggregation must be one of"),
    (lambda: PAGRPOModule(None, micro_batch_size=0), r"micro_batch_size must be >= 1, got 0"),
    (lambda: PAGRPOModule(None, max_grad_norm=0), r"max_grad_norm must be > 0, got 0"),
    (lambda: SFTModule(None, weight_decay=-0.01), r"weight_decay must be >= 0"),
    (lambda: SFTModule(None, eval_max_new_tokens=0), r"eval_max_new_tokens must be >= 1, got 0"),
    (lambda: SFTModule(None, eval_temperature=-1), r"eval_temperature must be >= 0"),
    (lambda: SFTModule(None, eval_top_p=0), r"eval_top_p must be in \(0, 1\]"),
    (lambda: SFTModule(None, max_nonfinite_steps=-1), r"max_nonfinite_steps must be >= 0"),
])
def test_every_other_setting_is_checked_when_made(make, message):
    with pytest.raises(SettingError, match="model\\.init_args\\." + message):
        make()


def test_shuffled_samples_default_to_half_a_group():
    assert RolloutSettings(group_size=8).shuffled_samples == 4 and RolloutSettings(group_size=3).shuffled_samples == 1
    assert RolloutSettings(group_size=8, shuffled_group_size=8).shuffled_samples == 8
