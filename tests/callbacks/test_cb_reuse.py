"""callbacks/ used by a LightningModule that is NOT p2r's: only `callbacks`, lightning and torch here.

The module below is the smallest RL-shaped module: every training step it builds rollouts by
hand, asks the trainer's reward callbacks to score them (score_all), notifies observers, and
turns the totals into a (toy) loss. It proves the package works on its own.
"""

import json
import os

import lightning as L
import pytest
import torch

from callbacks.reward_callbacks import (
    PerceptionFormatReward,
    PerceptionJudgeReward,
    ReasoningAccuracyReward,
    ReasoningFormatReward,
    notify_rollouts_scored,
    score_all,
)
from callbacks.rewards.judges import RuleBasedJudge
from callbacks.rollout_table import RolloutTableWriter
from callbacks.rollouts import Rollouts

PROMPTS = [{"id": "p0", "question": "What colour is the ball?", "options": [], "answer": "red",
            "problem_type": "free-form", "facts": {"evidence": [["red"], ["ball"]]}}]
COMPLETIONS = [
    "<observation>A red ball rolls.</observation><think>It is red.</think><answer>red</answer>",
    "<observation>Something rolls.</observation><think>Maybe blue.</think><answer>blue</answer>",
]


class ToyPolicy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2, 1)
        self.scored = []

    def training_step(self, batch, batch_idx):
        rollouts = Rollouts(group_size=2, prompts=PROMPTS, completions=list(COMPLETIONS))
        score_all(self.trainer, self, rollouts)
        notify_rollouts_scored(self.trainer, self, rollouts)
        self.scored.append(rollouts)
        advantage = torch.tensor(rollouts.total())  # (G,)
        advantage = advantage - advantage.mean()
        logits = self.head(batch[0]).squeeze(-1)  # (G,)
        return -(advantage * logits).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callbacks_drive_a_foreign_lightning_module(tmp_path):
    module = ToyPolicy()
    before = module.head.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[ReasoningAccuracyReward(), ReasoningFormatReward(), PerceptionFormatReward(),
                   PerceptionJudgeReward(judge=RuleBasedJudge()), RolloutTableWriter(every_n_steps=1, max_samples=2)],
    )
    trainer.fit(module)
    assert len(module.scored) == 2
    for rollouts in module.scored:
        # Video-R1's free-form score of an exact one-word answer: ROUGE-1 1, ROUGE-2 0, ROUGE-L 1.
        assert rollouts.rewards["reasoning/accuracy"] == pytest.approx([2 / 3, 0.0])
        assert rollouts.rewards["reasoning/format"] == [1.0, 1.0]
        assert rollouts.rewards["perception/format"] == [1.0, 1.0]
        assert rollouts.rewards["perception/accuracy"] == [1.0, 0.0]
        assert rollouts.total() == pytest.approx([3 + 2 / 3, 2.0])
    metrics = trainer.callback_metrics
    assert float(metrics["reward/reasoning/accuracy"]) == pytest.approx(1 / 3)
    assert float(metrics["reward/perception/accuracy"]) == 0.5
    assert float(metrics["judge/failures"]) == 0.0
    assert float(metrics["judge/cache_hits"]) == 2.0  # the second step asks the same questions
    assert not torch.equal(before, module.head.weight)  # the toy loss trained something
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "rollouts", "rollouts.jsonl"))]
    assert [(r["step"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["observation"] == "A red ball rolls." and rows[0]["model_answer"] == "red"
    assert sorted(os.listdir(tmp_path / "rollouts")) == ["rollouts.jsonl", "step_0000000.html", "step_0000001.html"]
