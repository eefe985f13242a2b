"""Video-MME without subtitles as lmms-eval 0.7.3 runs it (task ``videomme``, dataset
``lmms-eval/Video-MME``, split ``test``).

Rows: ``videoID`` (the video is ``data/<videoID>.mp4``, else ``.MP4`` or ``.mkv``, under
lmms-eval's ``videomme`` cache folder), ``question_id``, ``duration`` (short / medium / long),
``domain``, ``sub_category``, ``task_type``, ``question``, ``options`` ("A. ..." lines),
``answer`` (a letter).

- Prompt: "Select the best answer to the following multiple-choice question based on the video
  and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.", the
  question, the option lines, then "\\nAnswer with the option's letter from the given choices
  directly." (so an empty line before it). Greedy, 16 new tokens.
- Score: :func:`~p2r.evaluation.lmms_eval.common.extract_mcq_answer` over A-D; the figure counts a
  question right when that letter equals ``answer`` exactly.
- Figure (``videomme_perception_score``, percent): right / all questions; per duration as
  lmms-eval logs it.
"""

from __future__ import annotations

from typing import Any

from callbacks.evaluation import Scored
from p2r.evaluation.lmms_eval.common import extract_mcq_answer

INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the subtitles. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
CHOICES = ("A", "B", "C", "D")
MAX_NEW_TOKENS = 16
CACHE_DIR = "videomme"
DURATIONS = ("short", "medium", "long")


def prompt(row: dict[str, Any]) -> str:
    """The user text lmms-eval sends."""
    options = "\n".join(str(option) for option in row["options"])
    return f"{INSTRUCTION}\n{row['question']}\n{options}\n{POST_PROMPT}"


def score(row: dict[str, Any], output: str) -> Scored:
    """One output scored by lmms-eval's aggregation rule (exact letter)."""
    parsed = extract_mcq_answer(output, CHOICES)
    return Scored(parsed, 1.0 if parsed == row["answer"] else 0.0, "accuracy", row["answer"],
                  {"duration": row["duration"], "task_type": row.get("task_type")})


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``videomme_perception_score`` and the per-duration figures (percent)."""
    def percent(subset: list[dict[str, Any]]) -> float:
        return 100 * sum(1 for row in subset if row["score"] == 1.0) / len(subset) if subset else 0

    return {
        "figure": percent(rows),
        "units": "percent",
        "metric": "videomme_perception_score",
        "categories": {d: percent([r for r in rows if r["details"]["duration"] == d]) for d in DURATIONS
                       if any(r["details"]["duration"] == d for r in rows)},
    }


def video_path(row: dict[str, Any]) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``); p2r reads the ``.mp4`` name."""
    return f"{CACHE_DIR}/data/{row['videoID']}.mp4"
