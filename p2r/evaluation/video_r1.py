"""The ``video_r1`` protocol: Video-R1's ``src/eval_bench.py`` (tulerfeng/Video-R1), reproduced.

Records are Video-R1's evaluation files (``eval_<name>.json``: ``problem``, ``options``,
``solution`` as ``<answer>X</answer>``, ``problem_type``). What eval_bench.py does, and so this:

- Prompt: the problem, for multiple choice followed directly (no newline) by "Options:" and one
  option per line; then the reasoning template and the answer rule of the problem type. The
  template is Video-R1's think/answer instruction (``template: video_r1``, what eval_bench.py
  sends) or VideoP2R's observation/think/answer one (``template: videop2r``; the paper does not
  print its evaluation prompt, so this is p2r's wording of its template with Video-R1's answer
  rules).
- Decoding: temperature 0.1, top_p 0.001 (greedy in effect), 1,024 new tokens. Video-R1's README
  says temperature 0.01; the script uses 0.1.
- Reading: the first ``<answer>\\s*(.*?)\\s*</answer>`` (case-sensitive); when that is empty or
  absent, the whole output. The truth is the same match in ``solution``, with no fallback.
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

import re
from typing import Any

import torch

from callbacks.evaluation import Generation, Scored
from p2r.data.prompts import TEMPLATE_INSTRUCTION
from p2r.data.records import VideoRecord
from p2r.evaluation.categories import record_category
from p2r.evaluation.scoring import mean_relative_accuracy

TEMPLATES = ("video_r1", "videop2r")
GENERATION = Generation(max_new_tokens=1024, temperature=0.1, top_p=0.001)
MULTIPLE_CHOICE_ONLY = ("mmvu", "vcrbench")  # the paper reports these on their multiple-choice questions

QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
    "between the <answer> and </answer> tags."
)
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def question_text(record: VideoRecord) -> str:
    """The problem, with "Options:" and the option lines appended for multiple choice (as Video-R1)."""
    if record.problem_type == "multiple choice":
        return record.problem + "Options:\n" + "".join(option + "\n" for option in record.options)
    return record.problem


def prompt(record: VideoRecord, template: str = "video_r1") -> str:
    """The user text of a question under ``template`` (see module doc)."""
    if template == "video_r1":
        body = QUESTION_TEMPLATE.format(Question=question_text(record))
    elif template == "videop2r":
        body = question_text(record) + "\n" + TEMPLATE_INSTRUCTION.format(media=record.data_type)
    else:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return body + TYPE_TEMPLATE[record.problem_type]


def answer_block(text: str) -> str:
    """The first ``<answer>`` block's text, stripped; "" when there is none."""
    match = _ANSWER.search(text)
    return match.group(1).strip() if match else ""


def read_answer(output: str) -> str:
    """eval_bench.py's reading: the answer block, or the whole output when it is empty or missing.

    >>> read_answer("<think>so</think><answer> B </answer>"), read_answer("B"), read_answer("<answer></answer>x")
    ('B', 'B', '<answer></answer>x')
    """
    return answer_block(output) or output


def to_number(text: str) -> float | None:
    """``float()`` of the text with commas removed; None when that fails."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def mra(prediction: float, truth: float) -> float:
    """eval_bench.py's mean relative accuracy: float32, strict ``<``, the float32 mean as a Python float."""
    return mean_relative_accuracy(prediction, truth, "video_r1")


def score_answer(answer: str, truth: str, problem_type: str) -> float:
    """eval_bench.py's ``reward_fn`` on a read answer and the truth's answer block."""
    if problem_type == "multiple choice":
        return 1.0 if answer.strip() == truth.strip() else 0.0
    if problem_type == "numerical":
        if (("." in truth) or ("," in truth)) != (("." in answer) or ("," in answer)):
            return 0.0
        got, want = to_number(answer), to_number(truth)
        if got is None or want is None:
            return 0.0
        return 1.0 if round(want, 2) == round(got, 2) else 0.0
    if problem_type == "regression":
        got, want = to_number(answer), to_number(truth)
        return 0.0 if got is None or want is None else mra(got, want)
    return 0.0


def float32_mean(values: list[float]) -> float | None:
    """``torch.tensor(values).mean().item()`` as eval_bench.py computes it; None for no values."""
    return torch.tensor(values).mean().item() if values else None


class VideoR1Rules:
    """One benchmark under the ``video_r1`` protocol (see module doc)."""

    protocol = "video_r1"

    def __init__(self, benchmark: str, template: str = "video_r1", category_fields: list[str] | None = None) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
        self.benchmark = benchmark
        self.template = template
        self.category_fields = category_fields

    def includes(self, record: VideoRecord) -> bool:
        return self.benchmark not in MULTIPLE_CHOICE_ONLY or record.problem_type == "multiple choice"

    def prompt(self, record: VideoRecord) -> str:
        return prompt(record, self.template)

    def generation(self, record: VideoRecord) -> Generation:
        return GENERATION

    def category(self, record: VideoRecord) -> str | None:
        return record_category(self.benchmark, record, self.category_fields)

    def score(self, record: VideoRecord, output: str) -> Scored:
        answer, truth = read_answer(output), answer_block(record.solution)
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
