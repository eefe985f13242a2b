"""RolloutTableWriter: JSONL + HTML every N steps, NaN-safe, escaped, once per global step."""

import json
import math
from types import SimpleNamespace

from callbacks.rollout_table import RolloutTableWriter, render_html
from callbacks.rollouts import Rollouts

PROMPTS = [{"id": "p0", "question": "Is it <b>bold</b>?", "options": [], "answer": "yes", "problem_type": "free-form"}]
TEXTS = ["<observation>a <script>x</script></observation><think>t</think><answer>yes</answer>", "no tags"]


def fake_trainer(step, root, rank_zero=True):
    return SimpleNamespace(global_step=step, log_dir=None, default_root_dir=str(root), is_global_zero=rank_zero)


def scored():
    r = Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS, truncated=[False, True])
    r.set_reward("perception/accuracy", [1.0, math.nan], "perception")
    r.set_reward("reasoning/accuracy", [1.0, 0.0], "reasoning")
    return r


def test_writes_every_n_steps_once_per_step(tmp_path):
    writer = RolloutTableWriter(every_n_steps=2, max_samples=5)
    for step in (0, 0, 1, 2, 3):  # step 0 twice: gradient accumulation
        writer.on_rollouts_scored(fake_trainer(step, tmp_path), None, scored())
    writer.on_rollouts_scored(fake_trainer(4, tmp_path, rank_zero=False), None, scored())
    out = tmp_path / "rollouts"
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    first, second = rows[0], rows[1]
    assert first["observation"] == "a <script>x</script>" and first["think"] == "t" and first["model_answer"] == "yes"
    assert second["rewards"] == {"perception/accuracy": None, "reasoning/accuracy": 0.0}  # NaN -> null
    assert second["perception_total"] is None and second["truncated"] is True
    assert sorted(p.name for p in out.iterdir()) == ["rollouts.jsonl", "step_0000000.html", "step_0000002.html"]
    page = (out / "step_0000000.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;bold" in page


def test_out_dir_and_max_samples(tmp_path):
    writer = RolloutTableWriter(every_n_steps=1, max_samples=1, out_dir=str(tmp_path / "here"))
    writer.on_rollouts_scored(fake_trainer(0, tmp_path), None, scored())
    assert len((tmp_path / "here" / "rollouts.jsonl").read_text().splitlines()) == 1


def test_render_html_columns():
    page = render_html([], "empty")
    assert page.startswith("<!DOCTYPE html>") and "<th>observation</th>" in page


def test_every_rank_asks_for_the_log_dir_at_a_writing_step(tmp_path):
    # Under a distributed strategy Trainer.log_dir is a broadcast: rank 0 alone asking hung PA-GRPO on
    # several ranks at step 0. Every rank asks at the steps that write; only rank 0 writes.
    asked = []

    class Trainer(SimpleNamespace):
        @property
        def log_dir(self):
            asked.append((self.global_step, self.is_global_zero))
            return None

    writer = RolloutTableWriter(every_n_steps=2)
    for step in (0, 1, 2):
        writer.on_rollouts_scored(Trainer(global_step=step, default_root_dir=str(tmp_path), is_global_zero=False), None, scored())
    assert asked == [(0, False), (2, False)] and not (tmp_path / "rollouts").exists()
