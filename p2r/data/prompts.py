"""The process-aware prompt: the question, its options, the output template and an answer rule.

METHOD.md fixes the output template (observation, then think, then answer) and the multiple
choice layout ("Options:" and one "A. ..." line per option). The paper does not print its exact
instruction; ours states the same rules in our own words. The per-type answer rules follow the
answer formats the reasoning reward parses (callbacks/rewards/accuracy.py).
"""

from __future__ import annotations

from p2r.data.records import VideoRecord

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

TEMPLATE_INSTRUCTION = (
    "First describe, inside <observation> </observation>, what you see in the {media} that matters "
    "for the question. Then reason step by step using only those observations inside <think> </think>. "
    "Finally give the answer inside <answer> </answer>."
)

ANSWER_RULES = {
    "multiple choice": "Answer with the option's letter only (for example <answer>A</answer>).",
    "numerical": "Answer with a number only (for example <answer>3</answer>).",
    "OCR": "Answer with the exact text only.",
    "free-form": "Answer with a short phrase or sentence.",
    "regression": "Answer with a number only (for example <answer>2.5</answer>).",
}


def format_options(options: list[str]) -> str:
    """'Options:' then one 'A. text' line per option; options already lettered are kept as given."""
    lines = []
    for letter, text in zip(OPTION_LETTERS, options):
        text = text.strip()
        already = len(text) >= 2 and text[0].upper() == letter and text[1] in ".):"
        lines.append(text if already else f"{letter}. {text}")
    return "Options:\n" + "\n".join(lines)


def build_question(record: VideoRecord) -> str:
    """The question with its options (multiple choice), as the model reads it."""
    question = record.problem.strip()
    if record.problem_type == "multiple choice" and record.options:
        question += "\n" + format_options(record.options)
    return question


def build_prompt(record: VideoRecord, template: bool = True) -> str:
    """The user text of the chat turn (the video itself is added by the backbone's chat template).

    ``template=False`` gives the bare question and answer rule, for base-model evaluation.
    """
    parts = [build_question(record)]
    if template:
        parts.append(TEMPLATE_INSTRUCTION.format(media=record.data_type))
    parts.append(ANSWER_RULES[record.problem_type])
    return "\n".join(parts)
