"""Accuracy, format and length rewards: hand-worked values on realistic outputs, and ranges for ANY string."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks.rewards.accuracy import (
    decimal_rule_accuracy,
    edit_distance,
    exact_match_accuracy,
    free_form_accuracy,
    lenient_accuracy,
    ocr_accuracy,
    reasoning_accuracy,
    regression_accuracy,
    video_r1_accuracy,
    video_r1_number,
    word_error_rate,
)
from callbacks.rewards.format import perception_format, reasoning_format, think_answer_format
from callbacks.rewards.length import length_reward


def trace(observation="Three red cars are parked.", think="I count three cars.", answer="3"):
    return f"<observation>{observation}</observation>\n<think>{think}</think>\n<answer>{answer}</answer>"


OPTIONS = ["A. The man sits down", "B. The man picks up the cup", "C. The man leaves", "D. Nothing happens"]


# --- Video-R1's accuracy_reward, rule by rule (values worked out from its grpo.py) ---------------

@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("B", "B", 1.0), (" B\n", "B", 1.0), ("b", "B", 0.0), ("B.", "B", 0.0), ("(B)", "B", 0.0),
        ("B. The man picks up the cup", "B", 0.0), ("The answer is B", "B", 0.0), ("C", "B", 0.0),
        ("", "B", 0.0), ("", "", 1.0),  # an empty answer equals an empty ground truth
    ],
)
def test_multiple_choice_is_exact_match(answer, truth, expected):
    assert exact_match_accuracy(answer, truth) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("3", "3", 1.0), ("03", "3", 1.0), ("-0", "0", 1.0), ("1e3", "1000", 1.0),
        ("3.0", "3", 0.0), ("3.", "3", 0.0), ("3", "3.0", 0.0),  # one side has a decimal mark: 0
        ("3.", "3.00", 1.0), ("3.004", "3.0", 1.0), ("3.006", "3.0", 0.0), ("3.01", "3.0", 0.0),
        ("1,000", "1000", 0.0), ("1000", "1,000", 0.0),  # a comma is a decimal mark too
        ("1,000", "1,000.0", 1.0), ("1,000", "1.000", 0.0), ("1,5", "1.5", 0.0),  # commas are deleted: 15
        ("2.675", "2.67", 1.0), ("2.675", "2.68", 0.0),  # Python's round of the binary double
        ("three", "3", 0.0), ("3 cars", "3", 0.0), ("", "3", 0.0), ("", "", 0.0),
        ("1_000", "1000", 1.0), ("\u0663", "3", 1.0),  # Python's float() reads these
        ("nan", "nan", 0.0), ("inf", "inf", 1.0),
    ],
)
def test_numerical_decimal_rule(answer, truth, expected):
    assert decimal_rule_accuracy(answer, truth) == expected


def test_video_r1_number_is_float_without_commas():
    assert video_r1_number("1,234.5") == 1234.5 and video_r1_number(" -7 ") == -7.0
    assert video_r1_number("7 m") is None and video_r1_number("") is None and video_r1_number("1.2.3") is None


def test_word_error_rate_by_hand():
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2  # one substitution, one insertion
    assert word_error_rate("STOP AHEAD 200 M", "STOP AHEAD 200 M") == 0.0
    assert word_error_rate("STOP AHEAD 200 M", "STOP 200 M") == 0.25
    assert word_error_rate("STOP AHEAD", "stop ahead") == 1.0  # case-sensitive
    assert word_error_rate("STOP AHEAD", "the sign says STOP AHEAD") == 1.5  # 3 insertions / 2 words
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x y z") == 3.0  # / max(1, 0)


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("STOP AHEAD 200 M", "STOP AHEAD 200 M", 1.0),
        ("STOP  AHEAD\n200 M", "STOP AHEAD 200 M", 1.0),  # any whitespace splits words
        ("STOP 200 M", "STOP AHEAD 200 M", 0.75),
        ("STOP AHEAD 200 M PLEASE", "STOP AHEAD 200 M", 0.75),
        ("STOP AHEAD now", "STOP AHEAD", 0.5),  # one extra word over two
        ("the sign says STOP AHEAD", "STOP AHEAD", 0.0),  # WER 1.5 clipped
        ("STOP, AHEAD", "STOP AHEAD", 0.5),  # punctuation stays on the word
        ("stop ahead", "STOP AHEAD", 0.0),
        ("", "EXIT", 0.0), ("", "", 1.0), ("x", "", 0.0),
    ],
)
def test_ocr(answer, truth, expected):
    assert ocr_accuracy(answer, truth) == expected


def test_free_form_is_rouge_score_with_stemming_by_hand():
    # Porter stems: running/runs -> run, walked/walks -> walk, cars -> car, dogs -> dog.
    assert free_form_accuracy("He walked to the cars", "he walks to the car") == 1.0
    assert free_form_accuracy("A cat!", "a cat") == 1.0  # lower case, punctuation dropped
    # One word on each side: R1 = 1, R2 = 0 (no bigram), RL = 1.
    assert free_form_accuracy("running", "runs") == pytest.approx(2 / 3)
    assert free_form_accuracy("cat", "cat") == pytest.approx(2 / 3)
    # "the dog are run" vs "the dog is run": R1 = 3/4, R2 = 1/3, RL = 3/4.
    assert free_form_accuracy("The dogs are running", "the dog is running") == pytest.approx((0.75 + 1 / 3 + 0.75) / 3)
    # "a dog run fast" vs "the dog run": R1 = F(2/4, 2/3) = 4/7; R2 = F(1/3, 1/2) = 2/5; RL = 4/7.
    assert free_form_accuracy("a dog runs fast", "the dog runs") == pytest.approx((4 / 7 + 2 / 5 + 4 / 7) / 3)
    # "the man" vs "a man walk": R1 = F(1/2, 1/3) = 2/5, R2 = 0, RL = 2/5.
    assert free_form_accuracy("the man", "a man walking") == pytest.approx(0.8 / 3)
    # Word order: "run dog the" vs "the dog run": R1 = 1, R2 = 0, LCS 1 -> RL = 1/3.
    assert free_form_accuracy("runs dog the", "the dog runs") == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert free_form_accuracy("", "the dog runs") == 0.0
    assert free_form_accuracy("", "") == 0.0 and free_form_accuracy("\u732b", "\u732b") == 0.0  # no [a-z0-9] tokens


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("7.5", "10", 0.75), ("12.5", "10", 0.75), ("25", "10", 0.0), ("-10", "10", 0.0), ("1,250", "1000", 0.75),
        ("0", "0", 0.0), ("0.25", "0", 0.0),  # a zero ground truth: relative error >= 1
        ("about 4.5 meters", "5", 0.0), ("", "5", 0.0), ("5", "", 0.0),
        ("inf", "10", 0.0), ("nan", "10", 1.0), ("inf", "inf", 1.0),  # NaN error: max(0.0, nan) is 0.0
    ],
)
def test_regression(answer, truth, expected):
    assert regression_accuracy(answer, truth) == pytest.approx(expected, abs=1e-9)


def test_regression_exact_answer_is_just_below_one():
    assert regression_accuracy("10", "10") == 1 - 1e-9 / (10 + 1e-9) < 1.0
    assert regression_accuracy("4.0", "4") == regression_accuracy("4", "4")  # no decimal-point rule here


def test_video_r1_reads_only_the_first_complete_answer_block():
    sol = "<answer>3</answer>"
    # The cases: cut off inside <think> after a right observation, or no tags at all: 0.
    cut = "<observation>There are 3 cars.</observation><think>So the answer"
    assert video_r1_accuracy(cut, sol, "numerical") == 0.0
    assert video_r1_accuracy("I think there are 3 cars.", sol, "numerical") == 0.0
    assert video_r1_accuracy(trace(answer="3"), sol, "numerical") == 1.0
    assert video_r1_accuracy(trace("I see 4 cars.", "Four cars minus one is 3.", "3"), sol, "numerical") == 1.0
    assert video_r1_accuracy("<think>t</think><answer>3", sol, "numerical") == 0.0  # unclosed
    assert video_r1_accuracy("<answer>4</answer><answer>3</answer>", sol, "numerical") == 0.0  # the first counts
    assert video_r1_accuracy("<answer>3</answer><answer>4</answer>", sol, "numerical") == 1.0
    assert video_r1_accuracy("<Answer>3</Answer>", sol, "numerical") == 0.0
    assert video_r1_accuracy("<answer>\n  3 \n</answer>", "<answer> 3 </answer>", "numerical") == 1.0
    assert video_r1_accuracy("<answer>B</answer>", "<answer>B</answer>", "multiple choice") == 1.0
    assert video_r1_accuracy("<answer>b</answer>", "<answer>B</answer>", "multiple choice") == 0.0
    assert video_r1_accuracy("<answer>EXIT 12</answer>", "<answer>EXIT 12</answer>", "OCR") == 1.0
    assert video_r1_accuracy("<answer>4</answer>", "<answer>5</answer>", "regression") == pytest.approx(0.8)


def test_video_r1_solution_without_tags_reads_as_empty():
    # The ground truth is also read with the answer-block rule: "B" alone reads as "".
    assert video_r1_accuracy("<answer>B</answer>", "B", "multiple choice") == 0.0
    assert video_r1_accuracy("no answer at all", "B", "multiple choice") == 1.0  # "" == ""
    assert video_r1_accuracy("<answer></answer>", "B", "multiple choice") == 1.0
    assert video_r1_accuracy("no answer", "EXIT", "OCR") == 1.0  # WER of "" vs "" is 0
    assert video_r1_accuracy("<answer>3</answer>", "3", "numerical") == 0.0
    assert video_r1_accuracy("no answer", "3", "numerical") == 0.0  # float("") fails


def test_video_r1_problem_types_are_exact_strings():
    good = "<answer>EXIT</answer>"
    assert video_r1_accuracy(good, good, "OCR") == 1.0
    for other in ("ocr", "Multiple Choice", "essay", ""):
        assert video_r1_accuracy(good, good, other) == 0.0


# --- the lenient reader (explicit option) -------------------------------------------------------

@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("B", "B", 1.0), ("(b)", "B", 1.0), ("The answer is B.", "<answer>B</answer>", 1.0),
        ("B. The man picks up the cup", "B", 1.0), ("The man picks up the cup", "B", 1.0),
        ("C", "B", 0.0), ("A B C D", "B", 0.0), ("", "B", 0.0), ("E", "E", 0.0),  # E is not an option
        ("B", "The man picks up the cup", 1.0),  # a ground truth given as option text
    ],
)
def test_lenient_multiple_choice(answer, truth, expected):
    assert lenient_accuracy(answer, truth, "multiple choice", OPTIONS) == expected


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("3", "3", 1.0), ("3.0", "3", 1.0), ("three", "3", 1.0), ("3.004", "3", 1.0), ("2.996", "3", 1.0),
        ("3.01", "3", 0.0), ("There are 3 cars.", "3", 1.0), ("1,200", "1200", 1.0), ("-2.5", "-2.50", 1.0),
        ("4", "3", 0.0), ("many", "3", 0.0), ("3", "n/a", 0.0),
    ],
)
def test_lenient_numerical(answer, truth, expected):
    assert lenient_accuracy(answer, truth, "numerical") == expected


def test_lenient_reads_outside_the_answer_block_and_keeps_the_metrics():
    cut = "<observation>There are 3 cars.</observation><think>So the answer"
    assert lenient_accuracy(cut, "3", "numerical") == 1.0  # the whole text: why it is not the default
    assert lenient_accuracy("<think>t</think><answer>3", "<answer>3</answer>", "numerical") == 1.0
    assert lenient_accuracy("The answer is C.", "C", "multiple choice", OPTIONS) == 1.0
    assert lenient_accuracy(trace(answer="about 4.5 meters"), "5", "Regression") == pytest.approx(0.9)
    assert lenient_accuracy("0", "0", "regression") == 0.0  # Video-R1's formula on the numbers read
    assert lenient_accuracy(trace(answer="running"), "runs", "free-form") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown problem_type"):
        lenient_accuracy("B", "B", "essay")


def test_reasoning_accuracy_picks_the_reader():
    text = "The answer is (b)."
    assert reasoning_accuracy(text, "<answer>B</answer>", "multiple choice", OPTIONS) == 0.0
    assert reasoning_accuracy(text, "<answer>B</answer>", "multiple choice", OPTIONS, answer_reader="lenient") == 1.0
    with pytest.raises(ValueError, match="answer_reader"):
        reasoning_accuracy(text, "B", "multiple choice", answer_reader="strict")


@pytest.mark.parametrize(
    "completion, p, r",
    [
        (trace(), 1.0, 1.0),
        ("  " + trace() + "\n", 1.0, 1.0),
        ("<observation>x</observation><think>t</think><answer>3</answer>", 1.0, 1.0),  # no whitespace needed
        ("Sure! " + trace(), 1.0, 0.0),  # stray text before is reasoning text: breaks reasoning only
        ("<think>t</think><observation>x</observation><answer>3</answer>", 0.0, 1.0),  # observation after think
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
    "completion, expected",
    [
        ("<think>t</think><answer>B</answer>", 1.0),
        ("<think>t\n\nmore</think>\n \n<answer>B</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),  # empty blocks pass
        (" <think>t</think><answer>B</answer>", 0.0),  # nothing before <think>, not even a space
        ("<think>t</think><answer>B</answer>\n", 0.0),  # nor after </answer>
        ("<think>t</think>so<answer>B</answer>", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),  # the lazy groups stretch
        ("<think>a</think>x<think>b</think><answer>c</answer>", 1.0),
        ("<observation>o</observation><think>t</think><answer>B</answer>", 0.0),  # VideoP2R's template
        ("<Think>t</Think><answer>B</answer>", 0.0),
        ("<think>t</think><answer>B", 0.0),
        ("", 0.0),
    ],
)
def test_think_answer_format_is_video_r1s_fullmatch(completion, expected):
    assert think_answer_format(completion) == expected


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
    for reader in ("video_r1", "lenient"):
        assert 0.0 <= reasoning_accuracy(completion, truth, problem_type, OPTIONS, reader) <= 1.0
    acc = reasoning_accuracy(completion, truth, problem_type, OPTIONS)
    for fn in (exact_match_accuracy, decimal_rule_accuracy, ocr_accuracy, free_form_accuracy, regression_accuracy):
        assert 0.0 <= fn(completion, truth) <= 1.0
    assert perception_format(completion) in (0.0, 1.0)
    assert reasoning_format(completion) in (0.0, 1.0)
    assert think_answer_format(completion) in (0.0, 1.0)
    assert length_reward(acc, reasoning_format(completion), len(completion), 0, 10) in (0.0, 0.2)
