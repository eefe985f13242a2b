"""MVBench as lmms-eval 0.7.3 runs it: 20 tasks ``mvbench_<task>`` (dataset ``OpenGVLab/MVBench``,
one config per task, split ``train``), one figure per task and none for the group.

Rows: ``video`` (the file inside the task's source folder), ``question``, ``candidates`` (option
texts), ``answer`` (the right option's text).

- Prompt: "Question:" + question + "\\nOption:\\n", one "(A) text" line per candidate, then "Only
  give the best option.\\n". Greedy, 16 new tokens.
- Score: the right letter is the candidate equal to ``answer``. Output and letter are read alike:
  an "X. text" answer (X in A-E, either case) gives X; otherwise the text is cleaned of
  punctuation the VQA way, lower-cased, and its first standalone letter a-e (so an article "a"
  reads as A) is the answer, else the cleaned text itself; correct when both readings are equal.
- Figure per task (``mvbench_accuracy``, percent): correct / answered, where an empty output
  (after lmms-eval strips reasoning tags) is not answered and leaves the denominator.
"""

from __future__ import annotations

import re
import string
from typing import Any

from callbacks.evaluation import Scored

TASK_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation", "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
POST_PROMPT = "Only give the best option.\n"
MAX_NEW_TOKENS = 16
CACHE_DIR = "mvbench_video"

_LETTER_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_THOUSANDS_COMMA = re.compile(r"(\d)(\,)(\d)")
# The VQA period rule as lmms-eval writes it: "(?!<=\d)" is a look-ahead, so every "." not followed by
# a digit goes, and re.UNICODE lands in sub()'s count argument: at most 32 of them.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_PUNCTUATION = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def prompt(row: dict[str, Any]) -> str:
    """The user text lmms-eval sends."""
    options = "".join(f"({letter}) {option}\n" for letter, option in zip(string.ascii_uppercase, row["candidates"]))
    return f"Question:{row['question']}\nOption:\n{options}{POST_PROMPT}"


def _clean_punctuation(text: str) -> str:
    out = text
    joined = _THOUSANDS_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or joined else " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def read_option(text: str) -> str:
    """What MVBench's ``mcq_acc`` compares: an option letter (upper case) or the cleaned text.

    >>> read_option("(B) the cup"), read_option("a person runs"), read_option("c. red")
    ('B', 'A', 'C')
    """
    match = _LETTER_OPTION.match(text.strip())
    if match:
        return match.group(1).upper()
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    cleaned = _clean_punctuation(cleaned)
    cleaned = cleaned.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", cleaned, re.IGNORECASE)
    return letter.group(1).upper() if letter else cleaned


def truth_letter(row: dict[str, Any]) -> str:
    """The letter of the candidate equal to ``answer``; raises when none is (lmms-eval would crash)."""
    for letter, candidate in zip(string.ascii_uppercase, row["candidates"]):
        if candidate == row["answer"]:
            return letter
    raise ValueError(f"MVBench row {row.get('video')!r}: answer {row['answer']!r} is none of its candidates")


def score(row: dict[str, Any], output: str, task: str) -> Scored:
    """One output scored; ``details`` say whether it was answered at all."""
    truth = truth_letter(row)
    parsed = read_option(output)
    correct = parsed == read_option(truth)
    return Scored(parsed, 1.0 if correct else 0.0, "accuracy", truth, {"task": task, "answered": output != ""})


def task_figure(rows: list[dict[str, Any]]) -> float:
    """``mvbench_accuracy`` of one task: percent correct among the answered (non-empty) outputs."""
    answered = [row for row in rows if row["details"]["answered"]]
    correct = sum(1 for row in answered if row["score"] == 1.0)
    return 100 * correct / len(answered) if answered else 0


def video_path(row: dict[str, Any], task: str) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``; clevrer and star videos may sit under
    an extra ``data0613/`` there, which lmms-eval also tries)."""
    return f"{CACHE_DIR}/{TASK_FOLDERS[task]}/{row['video']}"
