"""The process-aware prompt for each problem type."""

from __future__ import annotations

import pytest

from p2r.data.prompts import build_prompt, build_question, format_options
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


def test_template_off_gives_question_and_rule_only():
    on, off = build_prompt(record()), build_prompt(record(), template=False)
    assert off == build_question(record()) + "\n" + on.split("\n")[-1]
    assert "<observation>" not in off and "<think>" not in off


def test_image_records_name_the_image():
    prompt = build_prompt(record("numerical", data_type="image"))
    assert "image" in prompt.split("\n")[1] and "video" not in prompt
