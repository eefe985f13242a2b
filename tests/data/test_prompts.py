"""The process-aware prompt for each problem type."""

from __future__ import annotations

import pytest

from p2r.data.prompts import PROMPT_TEMPLATES, build_prompt, build_question, format_options
from p2r.data.records import VideoRecord

TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


def record(problem_type: str = "multiple choice", options=("red", "blue", "green"), data_type: str = "video") -> VideoRecord:
    return VideoRecord(
        id="r", problem="  What colour is the circle?\n", problem_type=problem_type, data_type=data_type,
        path="v.mp4", solution="<answer>A</answer>", options=list(options),
    )


def test_options_are_lettered_one_per_line():
    assert format_options(["red", " blue ", "green"]) == "Options:\nA. red\nB. blue\nC. green"


def test_already_lettered_options_are_kept():
    assert format_options(["A. red", "B) blue", "C: green", "d. pink"]) == "Options:\nA. red\nB) blue\nC: green\nd. pink"
    # Mixed: only the ones lettered in their own position are kept as given.
    assert format_options(["A. red", "blue", "A. green"]) == "Options:\nA. red\nB. blue\nC. A. green"


def test_multiple_choice_prompt_with_template():
    lines = build_prompt(record()).split("\n")
    assert lines[:5] == ["What colour is the circle?", "Options:", "A. red", "B. blue", "C. green"]
    instruction, rule = lines[5], lines[6]
    assert len(lines) == 7
    # The template asks for the three segments, in order, about the video.
    positions = [instruction.index(tag) for tag in ("<observation>", "</observation>", "<think>", "</think>", "<answer>", "</answer>")]
    assert positions == sorted(positions)
    assert "video" in instruction
    assert "letter" in rule


@pytest.mark.parametrize("problem_type", TYPES[1:])
def test_other_types_have_no_options_block_and_their_own_rule(problem_type):
    prompt = build_prompt(record(problem_type, options=["red", "blue"]))
    assert "Options:" not in prompt and "A. red" not in prompt
    assert prompt.startswith("What colour is the circle?\n")
    assert "<observation>" in prompt


def test_each_type_gets_a_distinct_answer_rule():
    rules = {t: build_prompt(record(t)).split("\n")[-1] for t in TYPES}
    assert len(set(rules.values())) == len(TYPES)
    assert "number" in rules["numerical"] and "number" in rules["regression"]
    assert "text" in rules["OCR"]


def test_template_none_gives_question_and_rule_only():
    on, off = build_prompt(record()), build_prompt(record(), template="none")
    assert on == build_prompt(record(), template="videop2r")
    assert off == build_question(record()) + "\n" + on.split("\n")[-1]
    assert "<observation>" not in off and "<think>" not in off


VIDEO_R1_THINKING = (
    "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. "
)


def test_video_r1_prompt_is_its_training_text():
    mc = VideoRecord(id="r", problem="What does the man do first?", problem_type="multiple choice", data_type="video",
                     path="v.mp4", solution="<answer>B</answer>", options=["A. He sits", "B. He stands"])
    assert build_prompt(mc, "video_r1") == (
        "What does the man do first?Options:\nA. He sits\nB. He stands\n\n"  # no newline before "Options:"
        + VIDEO_R1_THINKING
        + "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
        "between the <answer> </answer> tags. Please provide only the single option letter (e.g., A, B, C, D, "
        "etc.) within the <answer> </answer> tags."
    )
    num = VideoRecord(id="n", problem="How many cups? ", problem_type="numerical", data_type="image",
                      path="a.jpg", solution="<answer>3</answer>")
    assert build_prompt(num, "video_r1") == (
        "How many cups? \n" + VIDEO_R1_THINKING
        + "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
        "between the <answer> </answer> tags. Please provide the numerical value (e.g., 42 or 3.14) within the "
        "<answer> </answer> tags."
    )


@pytest.mark.parametrize("problem_type", TYPES)
def test_video_r1_eval_prompt_differs_from_training_in_one_sentence(problem_type):
    train, evaluation = build_prompt(record(problem_type), "video_r1"), build_prompt(record(problem_type), "video_r1_eval")
    assert train.replace("<think> </think> tags, and then give your final answer between the <answer> </answer> tags.",
                         "<think> and </think> tags, and then give your final answer between the <answer> and </answer> tags.",
                         1) == evaluation
    assert "<observation>" not in train and train.endswith(" tags.")


def test_unknown_template_is_refused():
    assert PROMPT_TEMPLATES == ("videop2r", "video_r1", "video_r1_eval", "none")
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt(record(), True)


def test_image_records_name_the_image():
    prompt = build_prompt(record("numerical", data_type="image"))
    assert "image" in prompt.split("\n")[1] and "video" not in prompt
