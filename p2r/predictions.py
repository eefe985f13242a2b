"""What ``p2r predict`` writes: ``predictions.jsonl``, one line per question, in the questions' order.

Each line (:func:`prediction_row`) holds, for a question of ``data.predict_file`` /
``data.predict_video``: ``line`` (its line in the questions file; 0 for the command-line form),
``id``, ``input`` (the line as given), ``media`` (the resolved path or URL); for a sample of the
test sets instead: ``id`` and ``benchmark``. Then, for both: ``prompt`` (the user text the model
was given: the module's process-aware prompt, :func:`p2r.data.prompts.build_prompt`), ``output``
(the decoded answer, special tokens removed) and its parsed parts, read as the training rewards
read them:

- ``observation``: :func:`callbacks.segments.split_segments` ``(output).observation``, the text of
  every ``<observation>`` block joined by newlines (an unclosed block runs to the next tag): what
  the perception judge reads;
- ``think``: :func:`callbacks.rewards.parsing.extract_tag` ``(output, "think")``, the last complete
  ``<think>`` block;
- ``answer``: :func:`callbacks.rewards.parsing.video_r1_answer`, the first complete ``<answer>``
  block: what the reasoning reward and Video-R1's evaluation read.

A part that is missing is ``""`` (the raw ``output`` is always there). ``error`` is null, or, for
a question whose video or image could not be read or decoded, the cause; ``output`` and its parts
are then null.

Rank-safe: each rank appends its rows batch by batch to ``predictions.rank<r>.jsonl`` (a crash
keeps what was done); at the end rank 0 merges them into ``predictions.jsonl`` (written whole, or
not at all), sorted by ``line`` (data workers and ranks each take every n-th question), and removes
the parts. The folder is ``output_dir``, by default ``trainer.default_root_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.evaluation.report import append_jsonl
from callbacks.rewards.parsing import extract_tag, video_r1_answer
from callbacks.segments import split_segments
from p2r.checkpoints import atomic_write
from p2r.data.datamodule import Sample

PREDICTIONS = "predictions.jsonl"


def parse_output(output: str) -> dict[str, str]:
    """The raw output and its observation, think and answer parts (the module docstring's readers).

    >>> parse_output("<observation>a red ball</observation><think>so red</think><answer>A</answer>")["answer"]
    'A'
    """
    return {
        "output": output,
        "observation": split_segments(output).observation,
        "think": extract_tag(output, "think") or "",
        "answer": video_r1_answer(output),
    }


def prediction_row(sample: Sample, prompt: str, output: str | None) -> dict[str, Any]:
    """One line of predictions.jsonl: where the sample came from, its prompt, and its output parsed
    (``output`` None: the sample has an ``error`` and was not answered)."""
    question = sample.question
    if question is not None:
        row: dict[str, Any] = {"line": question.line, "id": sample.record.id, "input": question.input, "media": question.media}
    else:
        row = {"id": sample.record.id, "benchmark": sample.benchmark}
    parsed = parse_output(output) if output is not None else dict.fromkeys(("output", "observation", "think", "answer"))
    return {**row, "prompt": prompt, **parsed, "error": sample.error or None}


def merge_parts(parts: list[Path]) -> list[dict[str, Any]]:
    """The rows of every rank's part file, in question order (rows without a line keep their order)."""
    rows = [json.loads(line) for part in parts if part.is_file()
            for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row.get("line", 0))


class PredictionsWriter(Callback):
    """Writes predictions.jsonl from the rows ``predict_step`` returns (module docstring).

    A plain callback, not Lightning's BasePredictionWriter: that one asks the loader for batch
    indices, which a streaming (iterable) loader has none of, and warns about it on every run.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        """
        Args:
            output_dir: Folder of predictions.jsonl (default: trainer.default_root_dir).
        """
        self.output_dir = output_dir

    def _directory(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def _part(self, trainer: L.Trainer, rank: int) -> Path:
        return self._directory(trainer) / f"predictions.rank{rank}.jsonl"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._directory(trainer).mkdir(parents=True, exist_ok=True)
        self._part(trainer, trainer.global_rank).unlink(missing_ok=True)  # left by a run that crashed

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        append_jsonl(self._part(trainer, trainer.global_rank), outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank has written its part
        if not trainer.is_global_zero:
            return
        parts = [self._part(trainer, rank) for rank in range(trainer.world_size)]
        rows = merge_parts(parts)
        path = self._directory(trainer) / PREDICTIONS
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        for part in parts:
            part.unlink(missing_ok=True)
        errors = sum(row["error"] is not None for row in rows)
        print(f"predict: {len(rows)} prediction(s), {errors} with an error, written to {path}", flush=True)
