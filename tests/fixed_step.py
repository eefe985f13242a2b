"""One real PA-GRPO step on completions the test chooses, recording what the loss was given.

Importable as ``fixed_step`` (tests/ is on sys.path, as for ``varied_rewards``). Used by the tests
that check where each advantage lands (tests/algorithms/test_pagrpo.py, test_rl_learns.py).
"""

from __future__ import annotations

import lightning as L
import torch

import p2r.algorithms.pagrpo as pagrpo
from callbacks.reward_callbacks import RewardCallback
from p2r.algorithms.rollout import GroupRollout, prepare_prompts


class FixedReward(RewardCallback):
    """A reward with given values per sample (the step's other rewards are the real callbacks)."""

    def __init__(self, name: str, process: str, values: list[float]) -> None:
        self.name, self.process, self.values = name, process, values

    def score(self, rollouts):
        return list(self.values)


def train_sample(synthetic_root):
    """The first training sample of the synthetic shards, 4 frames of 28x28."""
    import webdataset as wds

    from p2r.data.datamodule import decode_sample
    from p2r.data.video import FrameSampling

    shard = str(sorted((synthetic_root / "shards").glob("train-*.tar"))[0])
    raw = next(iter(wds.tarfile_to_samples()(iter([{"url": shard}]))))
    return decode_sample(raw, FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784))


def one_step(module, sample, completion_ids: list[list[int]], rewards: list, monkeypatch):
    """Fit ``module`` for one step on ``sample`` whose G rollouts are ``completion_ids``; returns
    (the loss's gradient wrt the log-probs (G, T), the perception mask, the completion mask) of
    the one micro-batch."""
    seen = []
    real_loss = pagrpo.pagrpo_loss

    def fixed_rollout(backbone, prompts, clips, group_size, *args, **kwargs):
        ids = [list(c) for c in completion_ids]
        return GroupRollout(prepare_prompts(backbone, prompts, clips), group_size, ids, [False] * len(ids))

    def recording_loss(logp, *args, **kwargs):
        logp.retain_grad()
        seen.append((logp, kwargs["perception_mask"], args[3]))
        return real_loss(logp, *args, **kwargs)

    monkeypatch.setattr(pagrpo, "generate_groups", fixed_rollout)
    monkeypatch.setattr(pagrpo, "pagrpo_loss", recording_loss)
    loader = torch.utils.data.DataLoader([[sample]], batch_size=None, collate_fn=lambda b: b)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=rewards).fit(module, train_dataloaders=loader)
    (logp, perception, completion), = seen
    return logp.grad, perception, completion
