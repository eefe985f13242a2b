"""Write sample rollouts to JSONL and a self-contained HTML table every N steps.

Reading what the policy actually writes (its observation, its reasoning, its answer) next to each
reward is the quickest way to spot reward hacking or a broken parser; the scalar curves hide both.
The RL module calls ``on_rollouts_scored`` on every callback that has it, after scoring
(``callbacks.reward_callbacks.notify_rollouts_scored``).

Files, under ``out_dir`` (default: ``<trainer.log_dir or default_root_dir>/rollouts``):
``rollouts.jsonl`` (one line per sample, appended at every written step) and
``step_<global_step>.html`` (that step's samples). Only global rank 0 writes.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

import lightning as L

from callbacks.rewards.parsing import extract_tag, video_r1_answer
from callbacks.rollouts import Rollouts

_STYLE = (
    "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;white-space:pre-wrap;max-width:420px}"
    "th{background:#eee;position:sticky;top:0}"
)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 4)


def rollout_rows(rollouts: Rollouts, max_samples: int, step: int) -> list[dict[str, Any]]:
    """The first ``max_samples`` samples as flat dicts (NaN rewards become ``None`` for valid JSON)."""
    totals = rollouts.process_totals()
    rows = []
    for i in range(min(max_samples, len(rollouts))):
        prompt = rollouts.prompt_of(i)
        completion = rollouts.completions[i]
        rows.append({
            "step": step,
            "prompt_id": prompt.get("id"),
            "sample": i,
            "question": prompt.get("question", ""),
            "answer": prompt.get("answer", ""),
            "problem_type": prompt.get("problem_type", ""),
            "observation": rollouts.observation(i),
            "think": extract_tag(completion, "think") or "",
            "model_answer": video_r1_answer(completion),  # what the default reasoning reward reads
            "truncated": bool(rollouts.truncated[i]) if rollouts.truncated is not None else None,
            "rewards": {name: _finite(values[i]) for name, values in rollouts.rewards.items()},
            "perception_total": _finite(totals["perception"][i]),
            "reasoning_total": _finite(totals["reasoning"][i]),
        })
    return rows


def render_html(rows: list[dict[str, Any]], title: str) -> str:
    """A self-contained HTML page (inline CSS, no scripts) with one table row per sample."""
    reward_names = sorted({name for row in rows for name in row["rewards"]})
    columns = ["prompt_id", "sample", "question", "answer", "observation", "think", "model_answer",
               "perception_total", "reasoning_total"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns + reward_names)
    body = []
    for row in rows:
        cells = [row[c] for c in columns] + [row["rewards"].get(n) for n in reward_names]
        body.append("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in cells) + "</tr>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h3>{html.escape(title)}</h3>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>")


class RolloutTableWriter(L.Callback):
    """Every ``every_n_steps`` optimizer steps, dump ``max_samples`` scored rollouts for reading."""

    def __init__(self, every_n_steps: int = 50, max_samples: int = 16, out_dir: str | None = None) -> None:
        """
        Args:
            every_n_steps: write when ``trainer.global_step`` is a multiple of this (step 0 included).
            max_samples: samples written per step (the first ones: whole groups when a multiple of G).
            out_dir: where to write; default ``<log_dir>/rollouts`` of the run.
        """
        if every_n_steps < 1:
            raise ValueError(f"RolloutTableWriter: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.out_dir = out_dir
        self._last_step: int | None = None

    def directory(self, trainer: L.Trainer) -> str:
        if self.out_dir is not None:
            return self.out_dir
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "rollouts")

    def on_rollouts_scored(self, trainer: L.Trainer, pl_module: L.LightningModule, rollouts: Rollouts) -> None:
        step = trainer.global_step
        # With gradient accumulation several rollout batches share one global step: write the first.
        if step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        # On every rank: under a distributed strategy Trainer.log_dir is a broadcast from rank 0, and
        # rank 0 alone asking for it would wait there while the others went on to the loss (a hang).
        out = self.directory(trainer)
        if not trainer.is_global_zero:
            return
        rows = rollout_rows(rollouts, self.max_samples, step)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rollouts.jsonl"), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(os.path.join(out, f"step_{step:07d}.html"), "w", encoding="utf-8") as f:
            f.write(render_html(rows, f"Rollouts at step {step}"))
