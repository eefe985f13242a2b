"""The user prompt of a record: the question, its options, a reasoning template and an answer rule.

One setting, :data:`PromptTemplate`, picks the template:

- ``"videop2r"`` (default): VideoP2R's observation -> think -> answer template (METHOD.md). The
  paper does not print its instruction; ours states the same rules in our own words: the question
  with "Options:" and one "A. ..." line per option, :data:`TEMPLATE_INSTRUCTION`, then the answer
  rule of the problem type (:data:`ANSWER_RULES`, the formats the reasoning reward reads).
- ``"video_r1"``: Video-R1's think/answer prompt exactly as its training scripts build it
  (``src/r1-v/src/open_r1/grpo.py`` and ``sft_video.py``): ``QUESTION_TEMPLATE`` around the question,
  then ``TYPE_TEMPLATE`` of the problem type. The question is Video-R1's too: for multiple choice
  the problem, directly followed (no newline) by "Options:\\n" and each option as stored plus "\\n".
- ``"video_r1_eval"``: the same prompt with the instruction of Video-R1's ``src/eval_bench.py``
  (and ``inference_example.py``), which differs from the training one in one sentence: "between the
  <think> and </think> tags, and then ... between the <answer> and </answer> tags" instead of
  "between the <think> </think> tags, and then ... between the <answer> </answer> tags".
- ``"none"``: the question and the answer rule only, for base models that know no template.

The chat layout is the backbone's (one user turn: the video, then this text; no system message, as
in Video-R1's RL and evaluation scripts, whose Qwen2.5-VL chat template then adds its default system
prompt).
"""

from __future__ import annotations

from typing import Literal, get_args

from p2r.data.records import VideoRecord

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

PromptTemplate = Literal["videop2r", "video_r1", "video_r1_eval", "none"]
PROMPT_TEMPLATES: tuple[str, ...] = get_args(PromptTemplate)

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

# Video-R1's instruction text, verbatim (a missing full stop after "expressions" included).
_VIDEO_R1_INSTRUCTION = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
)
VIDEO_R1_QUESTION_TEMPLATE = _VIDEO_R1_INSTRUCTION + (
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)
VIDEO_R1_EVAL_QUESTION_TEMPLATE = _VIDEO_R1_INSTRUCTION + (
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
    "between the <answer> and </answer> tags."
)
VIDEO_R1_TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
                       "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
           "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
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
    """The question with its options (multiple choice), as the videop2r and none templates show it."""
    return question_with_options(record.problem, record.options if record.problem_type == "multiple choice" else [])


def question_with_options(problem: str, options: list[str]) -> str:
    """``problem`` stripped, then :func:`format_options` when there are options."""
    return problem.strip() + ("\n" + format_options(options) if options else "")


def video_r1_question(record: VideoRecord) -> str:
    """The question as Video-R1 builds it: the problem verbatim; for multiple choice directly followed
    by "Options:\\n" and each option verbatim plus "\\n" (Video-R1's options carry their "A. " letters)."""
    if record.problem_type != "multiple choice":
        return record.problem
    return record.problem + "Options:\n" + "".join(option + "\n" for option in record.options)


def build_prompt(record: VideoRecord, template: PromptTemplate = "videop2r") -> str:
    """The user text of the chat turn (the video itself is added by the backbone's chat template)."""
    if template == "videop2r":
        instruction = TEMPLATE_INSTRUCTION.format(media=record.data_type)
        return "\n".join([build_question(record), instruction, ANSWER_RULES[record.problem_type]])
    if template == "none":
        return build_question(record) + "\n" + ANSWER_RULES[record.problem_type]
    if template in ("video_r1", "video_r1_eval"):
        question_template = VIDEO_R1_QUESTION_TEMPLATE if template == "video_r1" else VIDEO_R1_EVAL_QUESTION_TEMPLATE
        return question_template.format(Question=video_r1_question(record)) + VIDEO_R1_TYPE_TEMPLATE[record.problem_type]
    raise ValueError(f"unknown prompt template {template!r}, expected one of {PROMPT_TEMPLATES}")
