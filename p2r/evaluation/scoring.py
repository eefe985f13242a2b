"""Answer extraction and metrics of the benchmarks, as pure functions (text in, numbers out).

The answer is the text inside ``<answer>`` or else the whole output (METHOD.md), read by the
reasoning reward's lenient reader (``answer_reader="lenient"``, ``callbacks.rewards.parsing``):
option letters from "(B)", "B.", "B: text", "The answer is B" or a bare "b"; numbers from digits or
number words. Two departures from
Video-R1's ``eval_bench.py``, both in the lenient direction: a multiple-choice answer counts when
the letter it names is right (Video-R1 demanded the answer text be exactly the letter), and a
number is read out of text ("about 3.5 m"; Video-R1 needed the bare number, and for numerical
questions also the same use of a decimal point as the ground truth).

Mean relative accuracy (VSI-Bench's numerical questions) exists in two conventions that differ
where the relative error meets a threshold, and each is reproduced with its reference
implementation's arithmetic, float artifacts included (tests hold hand-worked values):

- ``video_r1`` (the paper's; Video-R1 ``eval_bench.py``): float32 tensors, thresholds
  ``arange(0.5, 0.975, 0.05)``, relative error ``|p - t| / (|t| + 1e-8)``, strict ``<``;
- ``lmms_eval`` (lmms-eval's ``vsibench``): float64, thresholds ``linspace(0.5, 0.95, 10)``,
  relative error ``|p - t| / t``, ``<=``; a zero ground truth (a division by zero there) gives
  error 0 for a zero prediction and infinity otherwise.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import torch

from callbacks.evaluation import Scored
from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.parsing import lenient_answer, parse_number, parse_option_letter
from p2r.data.records import VideoRecord

MRAConvention = Literal["video_r1", "lmms_eval"]
MRA_CONVENTIONS: tuple[str, ...] = ("video_r1", "lmms_eval")


def mean_relative_accuracy(prediction: float, truth: float, convention: MRAConvention = "video_r1") -> float:
    """Fraction of the thresholds 0.50, 0.55, ..., 0.95 at which ``prediction`` is close enough to
    ``truth``: relative error below 1 - threshold (see module doc for the two conventions).

    >>> mean_relative_accuracy(3.0, 4.0), mean_relative_accuracy(3.0, 4.0, "lmms_eval")
    (0.5, 0.6)
    """
    if convention == "video_r1":
        pred = torch.tensor(prediction, dtype=torch.float32)
        target = torch.tensor(truth, dtype=torch.float32)
        error = torch.abs(pred - target) / (torch.abs(target) + 1e-8)
        thresholds = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)
        hits = error < (1 - thresholds)
        return int(hits.sum()) / len(thresholds)
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


# VSI-Bench question types from the fixed wording of its question templates, for records that do
# not carry the type; first match wins. Names as in VSI-Bench and lmms-eval.
_VSI_TEMPLATES = (
    ("object_counting", r"\bhow many\b"),
    ("object_size_estimation", r"longest dimension"),
    ("room_size_estimation", r"size of (?:this|the) room|room size"),
    ("object_abs_distance", r"direct distance"),
    ("object_rel_distance", r"which of these objects.*\bclosest\b"),
    ("object_rel_direction_hard", r"standing by.*facing.*front-left"),
    ("object_rel_direction_medium", r"standing by.*facing.*left, right, or back"),
    ("object_rel_direction_easy", r"standing by.*facing"),
    ("route_planning", r"\brobot\b|navigate to"),
    ("obj_appearance_order", r"appearance order"),
)


def vsi_question_type(question: str) -> str | None:
    """The VSI-Bench question type of a question, from its template wording; None if none fits.

    >>> vsi_question_type("How many chair(s) are in this room?")
    'object_counting'
    """
    for name, pattern in _VSI_TEMPLATES:
        if re.search(pattern, question, re.IGNORECASE | re.DOTALL):
            return name
    return None


def videomme_duration(seconds: float) -> str:
    """VideoMME's duration class of a video (short < 2 min, medium 4-15 min, long 30-60 min).

    The classes leave gaps; the cut points are put in the middle of them (3 and 22.5 minutes)
    so that a decoder's slightly-off duration never changes the class.

    >>> videomme_duration(95), videomme_duration(600), videomme_duration(2400)
    ('short', 'medium', 'long')
    """
    if seconds < 180:
        return "short"
    return "medium" if seconds < 1350 else "long"
