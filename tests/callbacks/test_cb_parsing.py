"""Answer parsing on realistic model outputs: hand-checked expectations, and never raising."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks.rewards.parsing import (
    eval_bench_answer,
    extract_tag,
    lenient_answer,
    parse_number,
    parse_option_letter,
    solution_answer,
    video_r1_answer,
)

FULL = (
    "<observation>A man in a red shirt picks up a cup from the table, then walks to the door.</observation>\n"
    "<think>The cup is lifted before he walks. Option B says he picks up the cup first.</think>\n"
    "<answer>B</answer>"
)


# (text, Video-R1's reading, the lenient reading, the ground-truth reading of a solution)
ANSWER_READINGS = [
    (FULL, "B", "B", "B"),
    ("<answer> (C) the dog </answer>", "(C) the dog", "(C) the dog", "(C) the dog"),
    ("<answer>A</answer> wait, <answer>D</answer>", "A", "D", "A"),  # Video-R1: the FIRST block
    ("<ANSWER>7</ANSWER>", "", "7", "<ANSWER>7</ANSWER>"),  # Video-R1's tags are case-sensitive
    ("The answer is 3", "", "The answer is 3", "The answer is 3"),  # no tag
    ("  \n B \n", "", "B", "B"),
    ("<think>long</think><answer>C", "", "C", "<think>long</think><answer>C"),  # cut inside the answer
    ("<answer>C", "", "C", "<answer>C"),
    ("<answer>\n\n</answer>", "", "", ""),  # an empty block
    ("<answer>\n 2.5 \t\n</answer>", "2.5", "2.5", "2.5"),
    ("<answer>two\nlines</answer>", "two\nlines", "two\nlines", "two\nlines"),
    ("<answer>a <answer>b</answer>", "a <answer>b", "a <answer>b", "a <answer>b"),  # nested opening tag
    ("</answer><answer>B</answer>", "B", "B", "B"),  # a stray closing tag first
    ("<answer>B</answer >", "", "B</answer >", "<answer>B</answer >"),  # "</answer >" is no closing tag
    ("", "", "", ""),
]


@pytest.mark.parametrize("text, video_r1, lenient, solution", ANSWER_READINGS)
def test_answer_readings(text, video_r1, lenient, solution):
    assert video_r1_answer(text) == video_r1
    assert lenient_answer(text) == lenient
    assert solution_answer(text) == solution


def test_extract_tag_last_block_and_missing():
    assert extract_tag(FULL, "think").startswith("The cup is lifted")
    assert extract_tag("<think>a</think> <think> b </think>", "think") == "b"
    assert extract_tag("<think>unclosed", "think") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"), ("b", "B"), ("(B)", "B"), ("[c]", "C"), ("**D**", "D"), ("B.", "B"), ("d)", "D"),
        ("B. The man picks up the cup", "B"),
        ("B: he picks up the cup", "B"),
        ("B) he picks up the cup", "B"),
        ("(C) The dog runs left", "C"),
        ("C, because the ball falls", "C"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("The correct answer is option C.", "C"),
        ("answer: b", "B"),
        ("Answer: (a)", "A"),
        ("The answer is (d) the blue one", "D"),
        ("Option C", "C"),
        ("option (b)", "B"),
        ("I think B fits best", "B"),
        ("Based on the video, C is correct.", "C"),
        ("A red circle moves, so the answer is D", "D"),  # article "A" never beats a real candidate
        ("A red circle moves to the left and then stops near B", "B"),
        ("A red circle moves", "A"),  # nothing else names an option: last resort
        ("The answer is A, not B? No: the answer is C", "C"),  # self-correction: last answer phrase
        ("Option A is wrong; option C fits", None),  # two option phrases disagree
        ("A B C D", None),  # listing every letter earns nothing
        ("the answer is a car", None),  # lower-case "a" followed by a word is the article
        ("I am not sure", None),
        ("e.g. the red one", None),
        ("The answer is E", None),  # out of range for 4 options
        ("E", None),
        ("", None),
        ("   ", None),
        ("None of the above", None),
    ],
)
def test_parse_option_letter_four_options(text, expected):
    assert parse_option_letter(text, num_options=4) == expected


def test_parse_option_letter_matches_option_text():
    options = ["A. a blue square", "B. a red circle", "C. a green star", "D. nothing"]
    assert parse_option_letter("a red circle", 4, options) == "B"
    assert parse_option_letter("Red circle.", 4, options) == "B"
    assert parse_option_letter("a purple hexagon", 4, options) is None
    unlettered = ["left", "right"]
    assert parse_option_letter("Right", 2, unlettered) == "B"


def test_parse_option_letter_without_num_options_allows_any_letter():
    assert parse_option_letter("The answer is (F)") == "F"
    assert parse_option_letter("F", num_options=5) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", 3.0), ("-3", -3.0), ("+2", 2.0), ("\u22124.5", -4.5), ("3.", 3.0), (".5", 0.5), ("2.50", 2.5),
        ("1,234,567", 1234567.0), ("1,234.5 metres", 1234.5), ("3,4", 3.0), ("1e3", 1000.0),
        ("There are 7 people and 8 chairs", 7.0), ("The distance is about 2.5 meters.", 2.5),
        ("frames 3-4", 3.0), ("(-2)", -2.0), ("45%", 45.0), ("3/4", 3.0),
        ("zero", 0.0), ("seven", 7.0), ("Twelve", 12.0), ("twenty", 20.0), ("twenty-one", 21.0),
        ("ninety nine", 99.0), ("a hundred", 100.0), ("two hundred and five", 205.0),
        ("three hundred twelve", 312.0), ("one two", 1.0),
        ("I count three cups, not 4", 3.0), ("4 cups, not three", 4.0),
        ("none", None), ("", None), ("someone", None), ("1e999", None), ("no number here", None),
    ],
)
def test_parse_number(text, expected):
    got = parse_number(text)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise(text):
    assert isinstance(video_r1_answer(text), str) and isinstance(lenient_answer(text), str)
    assert isinstance(solution_answer(text), str)
    letter = parse_option_letter(text, num_options=4)
    assert letter is None or letter in "ABCD"
    assert parse_option_letter(text) is None or len(parse_option_letter(text)) == 1
    number = parse_number(text)
    assert number is None or math.isfinite(number)


# Video-R1's src/eval_bench.py reading
@pytest.mark.parametrize(("output", "read"), [
    ("<think>so</think><answer> B </answer>", "B"),
    ("<answer>B</answer> no, <answer>A</answer>", "B"),            # the first block
    ("B", "B"),                                                     # no block: the whole output
    ("<answer></answer>B", "<answer></answer>B"),                   # an empty block also falls back
    ("<think>it is B</think><answer>B", "<think>it is B</think><answer>B"),  # unclosed: the whole output
    ("<Answer>B</Answer>", "<Answer>B</Answer>"),                   # case-sensitive tags
])
def test_eval_reader(output, read):
    assert eval_bench_answer(output) == read
