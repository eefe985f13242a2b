"""The ``video_r1`` protocol: Video-R1's ``src/eval_bench.py`` (tulerfeng/Video-R1), reproduced.

Records are Video-R1's evaluation files (``eval_<name>.json``: ``problem``, ``options``,
``solution`` as ``<answer>X</answer>``, ``problem_type``). What eval_bench.py does, and so this:

- Prompt: eval_bench.py's (``template: video_r1_eval``, :func:`p2r.data.prompts.build_prompt`):
  the problem, for multiple choice followed directly (no newline) by "Options:" and one option per
  line, inside Video-R1's think/answer instruction, then the answer rule of the problem type.
  ``template: videop2r`` asks with VideoP2R's observation/think/answer template as p2r trains
  with it (the paper does not print its evaluation prompt); ``video_r1`` and ``none`` also exist.
- Decoding: temperature 0.1, top_p 0.001 (greedy in effect), 1,024 new tokens. Video-R1's README
  says temperature 0.01; the script uses 0.1.
- Reading (:func:`callbacks.rewards.parsing.eval_bench_answer`): the first ``<answer>\\s*(.*?)\\s*</answer>``
  (case-sensitive); when that is empty or absent, the whole output. The truth is the same match in
  ``solution``, with no fallback (a bare ``solution`` reads as "").
- Score: multiple choice, the stripped answer equals the stripped truth (exactly: "B" is right,
  "b", "(B)", "B." are not); numerical, 0 unless both or neither contain "." or ",", then the two
  numbers (commas dropped, ``float()``; an unreadable one scores 0) equal after rounding to 2
  places; regression, mean relative accuracy in float32 (strict ``<``); OCR and free-form 0.
- Figures: ``mean_acc``, the float32 mean of every non-regression score, and ``mean_mra``, the
  float32 mean of the regression scores (0.0 when there are none), as eval_bench.py prints them.
  The benchmark's ``figure`` is ``mean_acc``; for a benchmark with regression questions
  (VSI-Bench) it is the mean of the two, the paper's VSI-Bench figure (Video-R1 prints no single
  VSI number).

What the paper leaves unknown: its exact evaluation prompt, the frames per video (Video-R1's README:
16/32/64 at 256*28*28 pixels; the paper: 32), and its VCR-Bench file (Video-R1 has none; p2r reads
the VCR-Bench multiple-choice questions in the same layout).
"""

from __future__ import annotations

from typing import Any

import torch

from callbacks.evaluation import Generation, Scored
from callbacks.rewards.accuracy import decimal_rule_accuracy, exact_match_accuracy, video_r1_number
from callbacks.rewards.parsing import eval_bench_answer, video_r1_answer
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.records import VideoRecord
from p2r.evaluation.categories import record_category
from p2r.evaluation.scoring import mean_relative_accuracy

GENERATION = Generation(max_new_tokens=1024, temperature=0.1, top_p=0.001)
MULTIPLE_CHOICE_ONLY = ("mmvu", "vcrbench")  # the paper reports these on their multiple-choice questions


def score_answer(answer: str, truth: str, problem_type: str) -> float:
    """eval_bench.py's ``reward_fn`` on a read answer and the truth's answer block: exact match,
    the decimal rule, float32 MRA for regression, 0 for OCR and free-form and on any error."""
    try:
        if problem_type == "multiple choice":
            return exact_match_accuracy(answer, truth)
        if problem_type == "numerical":
            return decimal_rule_accuracy(answer, truth)
        if problem_type == "regression":
            got, want = video_r1_number(answer), video_r1_number(truth)
            return 0.0 if got is None or want is None else mean_relative_accuracy(got, want, "video_r1")
    except Exception:  # eval_bench.py scores any failure 0
        return 0.0
    return 0.0


def float32_mean(values: list[float]) -> float | None:
    """``torch.tensor(values).mean().item()`` as eval_bench.py computes it; None for no values."""
    return torch.tensor(values).mean().item() if values else None


class VideoR1Rules:
    """One benchmark under the ``video_r1`` protocol (see module doc)."""

    protocol = "video_r1"

    def __init__(self, benchmark: str, template: PromptTemplate = "video_r1_eval",
                 category_fields: list[str] | None = None) -> None:
        self.benchmark = benchmark
        self.template = template
        self.category_fields = category_fields

    def includes(self, record: VideoRecord) -> bool:
        return self.benchmark not in MULTIPLE_CHOICE_ONLY or record.problem_type == "multiple choice"

    def prompt(self, record: VideoRecord) -> str:
        return build_prompt(record, self.template)

    def generation(self, record: VideoRecord) -> Generation:
        return GENERATION

    def category(self, record: VideoRecord) -> str | None:
        return record_category(self.benchmark, record, self.category_fields)

    def score(self, record: VideoRecord, output: str) -> Scored:
        answer, truth = eval_bench_answer(output), video_r1_answer(record.solution)
        family = "mra" if record.problem_type == "regression" else "accuracy"
        return Scored(answer, score_answer(answer, truth, record.problem_type), family, truth,
                      {"problem_type": record.problem_type})

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``mean_acc`` / ``mean_mra`` and the figure (fractions), and the same means per category."""
        acc = [float(r["score"]) for r in rows if r["metric"] != "mra"]
        mras = [float(r["score"]) for r in rows if r["metric"] == "mra"]
        mean_acc, mean_mra = float32_mean(acc), float32_mean(mras)
        present = [m for m in (mean_acc, mean_mra) if m is not None]
        categories = {}
        for name in sorted({r["category"] for r in rows}):
            scores = [float(r["score"]) for r in rows if r["category"] == name]
            categories[name] = float32_mean(scores)
        return {
            "figure": sum(present) / len(present) if present else 0.0,
            "units": "fraction",
            "metric": "mean_acc" if mean_mra is None else "mean(mean_acc, mean_mra)",
            "categories": categories,
            "mean_acc": mean_acc,
            "mean_mra": 0.0 if mean_mra is None else mean_mra,
        }
