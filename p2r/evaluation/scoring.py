"""The ``p2r`` protocol (p2r's own lenient reading) and mean relative accuracy.

NOT comparable to a published number: use the ``video_r1`` or ``lmms_eval`` protocol for that.
The answer is the text inside ``<answer>`` or else the whole output, read by the reasoning
reward's lenient reader (``answer_reader="lenient"``, ``callbacks.rewards.parsing``): option letters from "(B)", "B.", "B: text", "The
answer is B", a bare "b" or the option's text; numbers from digits or number words inside text.
Video-R1's ``eval_bench.py`` needs the exact letter, the bare number and, for numerical questions,
the same use of a decimal point as the truth. The prompt is p2r's (:func:`p2r.data.prompts.build_prompt`, the videop2r template by default),
decoding is the module's own setting, and a benchmark's figure is the unweighted mean over its
metric families (VSI-Bench: multiple-choice accuracy and MRA) of each family's mean.

Mean relative accuracy (VSI-Bench's numerical questions) exists in two conventions that differ
where the relative error meets a threshold, and each is reproduced with its reference
implementation's arithmetic, float artifacts included (tests hold hand-worked values):

- ``video_r1`` (the paper's; Video-R1 ``eval_bench.py``): float32 tensors, thresholds
  ``arange(0.5, 0.975, 0.05)``, relative error ``|p - t| / (|t| + 1e-8)``, strict ``<``, the
  float32 mean of the hits as a Python float (0.9 is 0.8999999761581421);
- ``lmms_eval`` (lmms-eval's ``vsibench``): float64, thresholds ``linspace(0.5, 0.95, 10)``,
  relative error ``|p - t| / t``, ``<=``; a zero ground truth (a division by zero there) gives
  error 0 for a zero prediction and infinity otherwise.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from callbacks.evaluation import Scored
from callbacks.evaluation.report import family_mean
from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.parsing import lenient_answer, parse_number, parse_option_letter
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.records import VideoRecord
from p2r.evaluation.categories import record_category

MRAConvention = Literal["video_r1", "lmms_eval"]
MRA_CONVENTIONS: tuple[str, ...] = ("video_r1", "lmms_eval")


def mean_relative_accuracy(prediction: float, truth: float, convention: MRAConvention = "video_r1") -> float:
    """Fraction of the thresholds 0.50, 0.55, ..., 0.95 at which ``prediction`` is close enough to
    ``truth``: relative error below 1 - threshold (see module doc for the two conventions).

    >>> mean_relative_accuracy(3.0, 4.0), mean_relative_accuracy(3.0, 4.0, "lmms_eval")
    (0.5, 0.6)
    >>> mean_relative_accuracy(9.0, 10.0)
    0.8999999761581421
    """
    if convention == "video_r1":
        pred = torch.tensor(prediction, dtype=torch.float32)
        target = torch.tensor(truth, dtype=torch.float32)
        error = torch.abs(pred - target) / (torch.abs(target) + 1e-8)
        thresholds = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)
        hits = error < (1 - thresholds)
        return hits.float().mean().item()
    if convention == "lmms_eval":
        if truth == 0:
            error = 0.0 if prediction == 0 else float("inf")
        else:
            error = abs(prediction - truth) / truth
        thresholds = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))
        return int((error <= 1 - thresholds).sum()) / len(thresholds)
    raise ValueError(f"unknown MRA convention {convention!r}, expected one of {MRA_CONVENTIONS}")


def read_answer(output: str, record: VideoRecord) -> str | float | None:
    """What a scorer reads from a model output: an option letter, a number, or the answer text.

    >>> from p2r.data.records import VideoRecord
    >>> mc = VideoRecord("1", "Q?", "multiple choice", "video", "v.mp4", "<answer>B</answer>", ["A. up", "B. down"])
    >>> read_answer("<think>it falls</think><answer>(b) down</answer>", mc)
    'B'
    """
    text = lenient_answer(output)
    if record.problem_type == "multiple choice":
        return parse_option_letter(text, len(record.options), record.options)
    if record.problem_type in ("numerical", "regression"):
        return parse_number(text)
    return text


def mra_score(output: str, record: VideoRecord, convention: MRAConvention) -> Scored:
    """MRA of a numerical answer (0 when either side has no readable number)."""
    got, want = read_answer(output, record), parse_number(record.answer)
    if got is None or want is None:
        return Scored(got, 0.0, "mra", want)
    return Scored(got, mean_relative_accuracy(got, want, convention), "mra", want)


def reward_score(output: str, record: VideoRecord) -> Scored:
    """The reasoning-accuracy reward with its lenient reader, for any problem type (option letter,
    number to 2 decimals, 1 - WER, ROUGE, 1 - relative error)."""
    return Scored(
        read_answer(output, record),
        reasoning_accuracy(output, record.solution, record.problem_type, record.options, answer_reader="lenient"),
        "accuracy",
        read_answer(record.solution, record),
    )


def score_by_type(output: str, record: VideoRecord, convention: MRAConvention = "video_r1") -> Scored:
    """Video-R1's evaluation rule by problem type: regression by MRA, every other type by
    :func:`reward_score`."""
    if record.problem_type == "regression":
        return mra_score(output, record, convention)
    return reward_score(output, record)


class LenientRules:
    """One benchmark under the ``p2r`` protocol (see module doc)."""

    protocol = "p2r"

    def __init__(self, benchmark: str, template: PromptTemplate = "videop2r", mra_convention: MRAConvention = "video_r1",
                 category_fields: list[str] | None = None) -> None:
        if mra_convention not in MRA_CONVENTIONS:
            raise ValueError(f"unknown MRA convention {mra_convention!r}, expected one of {MRA_CONVENTIONS}")
        self.benchmark = benchmark
        self.template = template
        self.mra_convention = mra_convention
        self.category_fields = category_fields

    def includes(self, record: VideoRecord) -> bool:
        return self.benchmark not in ("mmvu", "vcrbench") or record.problem_type == "multiple choice"

    def prompt(self, record: VideoRecord) -> str:
        return build_prompt(record, self.template)

    def generation(self, record: VideoRecord) -> None:
        return None  # the module's eval_max_new_tokens / eval_temperature / eval_top_p

    def category(self, record: VideoRecord) -> str | None:
        return record_category(self.benchmark, record, self.category_fields)

    def score(self, record: VideoRecord, output: str) -> Scored:
        if self.benchmark == "vsibench" and record.problem_type != "multiple choice":
            return mra_score(output, record, self.mra_convention)
        return score_by_type(output, record, self.mra_convention)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The unweighted mean over metric families of each family's mean, overall and per category."""
        def by_family(subset: list[dict[str, Any]]) -> dict[str, list[float]]:
            families: dict[str, list[float]] = {}
            for row in subset:
                families.setdefault(row["metric"], []).append(float(row["score"]))
            return families

        categories = {name: family_mean(by_family([r for r in rows if r["category"] == name]))
                      for name in sorted({r["category"] for r in rows})}
        return {"figure": family_mean(by_family(rows)) if rows else 0.0, "units": "fraction",
                "metric": "mean over metric families", "categories": categories}
