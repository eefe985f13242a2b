"""Accuracy, format and length rewards: hand-worked values on realistic outputs, and ranges for ANY string."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks.rewards.accuracy import (
    edit_distance,
    free_form_accuracy,
    longest_common_subsequence,
    multiple_choice_accuracy,
    numerical_accuracy,
    ocr_accuracy,
    reasoning_accuracy,
    regression_accuracy,
    word_error_rate,
)
from callbacks.rewards.format import perception_format, reasoning_format
from callbacks.rewards.length import length_reward


def trace(observation="Three red cars are parked.", think="I count three cars.", answer="3"):
    return f"<observation>{observation}</observation>\n<think>{think}</think>\n<answer>{answer}</answer>"


OPTIONS = ["A. The man sits down", "B. The man picks up the cup", "C. The man leaves", "D. Nothing happens"]


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("B", "B", 1.0), ("(b)", "B", 1.0), ("The answer is B.", "<answer>B</answer>", 1.0),
        ("B. The man picks up the cup", "B", 1.0), ("The man picks up the cup", "B", 1.0),
        ("C", "B", 0.0), ("A B C D", "B", 0.0), ("", "B", 0.0), ("E", "E", 0.0),  # E is not an option
        ("B", "The man picks up the cup", 1.0),  # a ground truth given as option text
    ],
)
def test_multiple_choice(answer, truth, expected):
    assert multiple_choice_accuracy(answer, truth, OPTIONS) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("3", "3", 1.0), ("3.0", "3", 1.0), ("three", "3", 1.0), ("3.004", "3", 1.0), ("2.996", "3", 1.0),
        ("3.01", "3", 0.0), ("There are 3 cars.", "3", 1.0), ("1,200", "1200", 1.0), ("-2.5", "-2.50", 1.0),
        ("4", "3", 0.0), ("many", "3", 0.0), ("3", "n/a", 0.0),
    ],
)
def test_numerical(answer, truth, expected):
    assert numerical_accuracy(answer, truth) == expected


def test_word_error_rate_by_hand():
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2  # one substitution, one insertion
    assert word_error_rate("STOP AHEAD 200 M", "STOP AHEAD 200 M") == 0.0
    assert word_error_rate("STOP AHEAD 200 M", "STOP 200 M") == 0.25
    assert word_error_rate("STOP AHEAD", "stop ahead") == 1.0  # case-sensitive
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == 1.0


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("STOP AHEAD 200 M", "STOP AHEAD 200 M", 1.0),
        ("STOP 200 M", "STOP AHEAD 200 M", 0.75),
        ("STOP AHEAD 200 M PLEASE", "STOP AHEAD 200 M", 0.75),
        ("a b c d e f g h", "EXIT", 0.0),  # WER 8 clipped to accuracy 0
        ("", "EXIT", 0.0),
    ],
)
def test_ocr(answer, truth, expected):
    assert ocr_accuracy(answer, truth) == expected


def test_rouge_by_hand():
    assert longest_common_subsequence(list("abcbdab"), list("bdcaba")) == 4
    # pred "a dog runs fast" vs ref "the dog runs": R1 = F(2/4, 2/3) = 4/7; R2 = F(1/3, 1/2) = 2/5; RL = 4/7.
    assert free_form_accuracy("a dog runs fast", "the dog runs") == pytest.approx((4 / 7 + 2 / 5 + 4 / 7) / 3)
    assert free_form_accuracy("The Dog, runs!", "the dog runs") == 1.0
    assert free_form_accuracy("cat", "cat") == 1.0  # ROUGE-2 undefined on both sides: left out
    # ref has a bigram, pred has none: R1 = F(1, 1/2) = 2/3, R2 = 0, RL = 2/3.
    assert free_form_accuracy("dog", "the dog") == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    # LCS order matters: "runs dog the" vs "the dog runs": R1 = 1, R2 = 0, LCS = 1 -> RL = 1/3.
    assert free_form_accuracy("runs dog the", "the dog runs") == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert free_form_accuracy("", "the dog runs") == 0.0
    assert free_form_accuracy("", "") == 1.0


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("10", "10", 1.0), ("7.5", "10", 0.75), ("12.5", "10", 0.75), ("25", "10", 0.0), ("-10", "10", 0.0),
        ("about 4.5 meters", "5", 0.9), ("0", "0", 1.0), ("0.25", "0", 0.75), ("3", "0", 0.0), ("big", "5", 0.0),
    ],
)
def test_regression(answer, truth, expected):
    assert regression_accuracy(answer, truth) == pytest.approx(expected)


def test_reasoning_accuracy_reads_only_the_answer_block():
    # The observation and the think text mention other numbers/letters: only <answer> counts.
    completion = trace("I see 4 cars; option A shows a truck.", "Four cars minus one leaving is 3.", "3")
    assert reasoning_accuracy(completion, "3", "numerical") == 1.0
    assert reasoning_accuracy(completion, "4", "numerical") == 0.0
    mc = trace("The man grabs a cup.", "That matches B, not A.", "B")
    assert reasoning_accuracy(mc, "<answer>B</answer>", "multiple choice", OPTIONS) == 1.0
    assert reasoning_accuracy(trace(answer="EXIT 12"), "EXIT 12", "OCR") == 1.0
    assert reasoning_accuracy(trace(answer="a dog runs"), "a dog runs", "free-form") == 1.0
    assert reasoning_accuracy(trace(answer="4"), "5", "Regression") == pytest.approx(0.8)
    # No answer tag (evaluation rule): the whole output is the answer.
    assert reasoning_accuracy("The answer is C.", "C", "multiple choice", OPTIONS) == 1.0
    with pytest.raises(ValueError, match="unknown problem_type"):
        reasoning_accuracy("B", "B", "essay")


@pytest.mark.parametrize(
    "completion, p, r",
    [
        (trace(), 1.0, 1.0),
        ("  " + trace() + "\n", 1.0, 1.0),
        ("<observation>x</observation><think>t</think><answer>3</answer>", 1.0, 1.0),  # no whitespace needed
        ("Sure! " + trace(), 0.0, 0.0),  # stray text before: breaks both
        (trace() + " Hope this helps.", 1.0, 0.0),  # stray text after </answer>: reasoning only
        ("<think>t</think><answer>3</answer>", 0.0, 1.0),  # no observation
        ("<observation>x</observation>", 1.0, 0.0),  # no reasoning
        ("<observation>   </observation><think>t</think><answer>3</answer>", 0.0, 1.0),  # empty observation
        ("<observation>x</observation><think>t</think><answer> </answer>", 1.0, 0.0),  # empty answer
        ("<observation>x</observation><think></think><answer>3</answer>", 1.0, 0.0),  # empty think
        ("<observation>x</observation><answer>3</answer><think>t</think>", 1.0, 0.0),  # wrong order
        ("<observation>x</observation><think>t</think><answer>3</answer><answer>4</answer>", 1.0, 0.0),
        ("<observation>x</observation><think>a</think><think>b</think><answer>3</answer>", 1.0, 0.0),
        ("<observation>a</observation><observation>b</observation><think>t</think><answer>3</answer>", 0.0, 1.0),
        ("<observation>x<think>t</think><answer>3</answer>", 0.0, 1.0),  # unclosed observation
        ("x</observation><think>t</think><answer>3</answer>", 0.0, 0.0),  # stray close is reasoning text
        ("<think>t</think><answer>3</answer><observation>x</observation>", 0.0, 1.0),  # observation last
        ("<Observation>x</Observation><Think>t</Think><Answer>3</Answer>", 0.0, 0.0),  # tags are lower case
        ("<observation>x <think>y</think></observation><think>t</think><answer>3</answer>", 0.0, 0.0),
        ("<think>t</think><answer>3", 0.0, 0.0),  # cut by the length limit
        ("", 0.0, 0.0),
    ],
)
def test_formats(completion, p, r):
    assert perception_format(completion) == p
    assert reasoning_format(completion) == r


@pytest.mark.parametrize(
    "acc, fmt, n, expected",
    [
        (1.0, 1.0, 128, 0.2), (1.0, 1.0, 320, 0.2), (1.0, 1.0, 127, 0.0), (1.0, 1.0, 321, 0.0),
        (0.3, 1.0, 200, 0.2), (0.0, 1.0, 200, 0.0), (1.0, 0.0, 200, 0.0), (math.nan, 1.0, 200, 0.0),
    ],
)
def test_length(acc, fmt, n, expected):
    assert length_reward(acc, fmt, n, 128, 320) == expected


TAGGY = st.lists(
    st.one_of(st.sampled_from(["<observation>", "</observation>", "<think>", "</think>", "<answer>", "</answer>",
                               "A", "b", "(C)", "3", "-2.5", "twenty", "1,000", " ", "\n", "answer is"]),
              st.text(max_size=8)),
    max_size=14,
).map("".join)
ANY = st.one_of(st.text(), TAGGY)


@settings(max_examples=200, deadline=None)
@given(ANY, ANY, st.sampled_from(["multiple choice", "numerical", "OCR", "free-form", "regression"]))
def test_every_reward_in_range_for_any_string(completion, truth, problem_type):
    acc = reasoning_accuracy(completion, truth, problem_type, OPTIONS)
    assert 0.0 <= acc <= 1.0
    for fn in (multiple_choice_accuracy, numerical_accuracy, ocr_accuracy, free_form_accuracy, regression_accuracy):
        assert 0.0 <= fn(completion, truth) <= 1.0
    assert perception_format(completion) in (0.0, 1.0)
    assert reasoning_format(completion) in (0.0, 1.0)
    assert length_reward(acc, reasoning_format(completion), len(completion), 0, 10) in (0.0, 0.2)
