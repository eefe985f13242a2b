"""The teacher's instruction for step 1 of the CoT pipeline (METHOD.md, "Three-step CoT generation").

The paper does not print its generation prompt; ours states its rules in our own words:
observe what the question needs, reason only from those observations with self-checks, give a
concise answer, in the exact tag template. The teacher is NOT told the correct answer: step 2
checks the answer it reaches, which is only a filter when the teacher could have been wrong.
The question and the per-type answer rule are the ones the student is trained and rewarded on
(:mod:`p2r.data.prompts`), so a kept trace answers in the format the reasoning reward parses.
"""

from __future__ import annotations

from p2r.data.prompts import ANSWER_RULES, build_question
from p2r.data.records import VideoRecord

TEACHER_RULES = (
    "Write a worked answer that first looks, then thinks.\n"
    "1. Observe. Inside <observation> </observation>, describe what the {media} shows that this question "
    "needs: the objects, people, text, counts, positions, motions and order of events the answer depends "
    "on. Describe what is visible; do not state the answer or an option letter there, and leave out "
    "details the question does not need.\n"
    "2. Reason. Inside <think> </think>, reason step by step using only what your observation says, as if "
    "you could no longer see the {media}. Check each step against the observation, and check the final "
    "answer against the question{options_check} before you give it.\n"
    "3. Answer. Inside <answer> </answer>, give only the final answer, as briefly as possible.\n"
    "Reply with exactly this template and nothing before or after it:\n"
    "<observation>...</observation>\n<think>...</think>\n<answer>...</answer>"
)


def teacher_prompt(record: VideoRecord) -> str:
    """The user text a teacher reads for ``record`` (the media is attached by the teacher back-end).

    >>> r = VideoRecord(id="1", problem="How many cups?", problem_type="numerical", data_type="image",
    ...                 path="a.jpg", solution="<answer>3</answer>")
    >>> teacher_prompt(r).splitlines()[:2]
    ['Question:', 'How many cups?']
    """
    options_check = " and every option" if record.problem_type == "multiple choice" and record.options else ""
    rules = TEACHER_RULES.format(media=record.data_type, options_check=options_check)
    return f"Question:\n{build_question(record)}\n\n{rules}\n{ANSWER_RULES[record.problem_type]}"
