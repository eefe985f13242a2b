"""VSI-Bench as lmms-eval 0.7.3 runs it (task ``vsibench``, dataset ``nyu-visionx/VSI-Bench``).

Rows (the dataset's fields): ``id``, ``dataset``, ``scene_name`` (the video is
``<dataset>/<scene_name>.mp4`` under lmms-eval's ``vsibench`` cache folder), ``question_type``,
``question``, ``options`` (``"A. ..."`` lines, multiple-choice types only), ``ground_truth``
(a letter or a number).

- Prompt: ``"These are frames of a video."`` (the task's empty pre-prompt falls back to it), the
  question, then for multiple choice ``"Options:"`` and the option lines and "Answer with the
  option's letter from the given choices directly.", else "Please answer the question using a
  single word or phrase."; lines joined by newlines. Greedy, 16 new tokens.
- Multiple-choice types: the first space-separated word of the output with trailing dots removed,
  compared case-insensitively with the ground-truth letter ("B. table" and "b" count, "(B)" and
  "The answer is B" do not).
- Numerical types: the first number of the output (digits, or a run of number words such as
  "twenty-one", whichever starts first) scored by mean relative accuracy with lmms-eval's
  convention (``|pred - gt| / gt <= 1 - t`` for t in ``linspace(0.5, 0.95, 10)``); no number
  scores 0.
- Figure (``vsibench_overall``, a fraction rounded to 6 places): the mean over the question types
  present of each type's mean score, after the three relative-direction types (easy, medium, hard)
  are replaced by their unweighted mean, ``object_rel_direction_accuracy``.

Departures, only where lmms-eval stops with an error: a ground truth of 0 (a division by zero
there) scores 1 for a prediction of 0 and 0 otherwise; a subset missing one of the three
relative-direction types (a KeyError there) merges the ones present.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from callbacks.evaluation import Scored
from p2r.evaluation.scoring import mean_relative_accuracy

MULTIPLE_CHOICE_TYPES = (
    "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
    "object_rel_distance", "route_planning", "obj_appearance_order",
)
NUMERICAL_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
DIRECTION_TYPES = MULTIPLE_CHOICE_TYPES[:3]
MERGED_DIRECTION = "object_rel_direction"

PRE_PROMPT = "These are frames of a video."
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
NUMERICAL_POST_PROMPT = "Please answer the question using a single word or phrase."
MAX_NEW_TOKENS = 16
CACHE_DIR = "vsibench"

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
}
_DIGITS = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER_RUN = re.compile(r"[a-z]+")


def question_kind(row: dict[str, Any]) -> str:
    """``"multiple choice"`` or ``"numerical"`` from the row's question type; raises on an unknown one."""
    kind = row.get("question_type")
    if kind in MULTIPLE_CHOICE_TYPES:
        return "multiple choice"
    if kind in NUMERICAL_TYPES:
        return "numerical"
    raise ValueError(f"VSI-Bench row {row.get('id')!r}: unknown question_type {kind!r}")


def prompt(row: dict[str, Any]) -> str:
    """The user text lmms-eval sends (the video comes first in the chat turn)."""
    if question_kind(row) == "numerical":
        return f"{PRE_PROMPT}\n{row['question']}\n{NUMERICAL_POST_PROMPT}"
    options = "Options:\n" + "\n".join(row["options"])
    return "\n".join([PRE_PROMPT, row["question"], options, MC_POST_PROMPT])


def first_word(output: str) -> str:
    """The multiple-choice reading: the text before the first space, trailing dots removed, stripped.

    >>> first_word("B. the table"), first_word("(B)"), first_word(" B")
    ('B', '(B)', '')
    """
    return output.split(" ")[0].rstrip(".").strip()


def read_number(output: str) -> float | None:
    """The first number of an output: digits (``-?\\d+(\\.\\d+)?``) or a run of number words, whichever
    starts first; ``None`` if there is neither.

    A run starts at the first number word among the lower-case letter runs of the text and goes on
    over number words and "and" until another word; everything between letter runs (spaces,
    hyphens, commas, digits) is ignored. Its value adds the words up, "hundred" multiplying what
    came before (at least 1) and "thousand" closing a group.

    >>> read_number("About 3.5 meters"), read_number("twenty-one chairs"), read_number("three hundred and two")
    (3.5, 21.0, 302.0)
    >>> read_number("one, two, 3")
    3.0
    """
    text = str(output).strip().lower()
    if not text:
        return None
    digits = _DIGITS.search(text)
    run_start, run = None, []
    for word in _LETTER_RUN.finditer(text):
        token = word.group(0)
        if run_start is None:
            if token in NUMBER_WORDS:
                run_start, run = word.start(), [token]
        elif token in NUMBER_WORDS:
            run.append(token)
        elif token != "and":
            break
    if digits is not None and (run_start is None or digits.start() < run_start):
        return float(digits.group(0))
    if run_start is None:
        return None
    total, group = 0, 0
    for token in run:
        value = NUMBER_WORDS[token]
        if value == 100:
            group = max(group, 1) * 100
        elif value == 1000:
            total, group = total + max(group, 1) * 1000, 0
        else:
            group += value
    return float(total + group)


def _truth_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def score(row: dict[str, Any], output: str) -> Scored:
    """One output scored: exact first word (multiple choice) or MRA (numerical)."""
    kind = row["question_type"]
    if question_kind(row) == "multiple choice":
        parsed = first_word(output)
        correct = parsed.lower() == str(row["ground_truth"]).lower()
        return Scored(parsed, 1.0 if correct else 0.0, "accuracy", str(row["ground_truth"]), {"question_type": kind})
    got, want = read_number(output), _truth_number(row["ground_truth"])
    value = 0.0 if got is None or want is None else mean_relative_accuracy(got, want, "lmms_eval")
    return Scored(got, value, "mra", want, {"question_type": kind})


def _type_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for row in rows:
        scores.setdefault(row["details"]["question_type"], []).append(float(row["score"]))
    # pandas' groupby mean of the original: sorted types, a float64 sum divided by the count.
    return {kind: float(np.sum(np.asarray(scores[kind], dtype=np.float64)) / len(scores[kind])) for kind in sorted(scores)}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``vsibench_overall`` and the eight per-type figures lmms-eval prints (fractions, 6 places)."""
    means = _type_means(rows)
    subscores = {}
    for kind, value in means.items():
        if kind not in DIRECTION_TYPES:
            subscores[f"{kind}_{'accuracy' if kind in MULTIPLE_CHOICE_TYPES else 'mra'}"] = value
    directions = [means[kind] for kind in ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard") if kind in means]
    if directions:
        subscores[f"{MERGED_DIRECTION}_accuracy"] = sum(directions) / float(len(directions))
    overall = sum(subscores.values()) / len(subscores) if subscores else 0.0
    return {
        "figure": round(overall, 6),
        "units": "fraction",
        "metric": "vsibench_overall",
        "categories": {name: round(value, 6) for name, value in sorted(subscores.items())},
    }


def video_path(row: dict[str, Any]) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``), as its ``doc_to_visual`` finds it."""
    return f"{CACHE_DIR}/{row['dataset']}/{row['scene_name']}.mp4"
