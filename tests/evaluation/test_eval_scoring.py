"""Benchmark adapters on realistic model outputs, MRA hand-worked at the threshold boundaries,
categories, subsets and the registry."""

from __future__ import annotations

import numpy as np
import pytest

from callbacks.evaluation import Scored
from callbacks.evaluation.report import PAPER_COLUMNS
from p2r.data.datamodule import Sample
from p2r.data.records import VideoRecord
from p2r.data.video import Clip
from p2r.evaluation import (
    BENCHMARKS,
    MMVU,
    MVBench,
    Synthetic,
    TempCompass,
    VCRBench,
    VideoMME,
    VideoMMMU,
    VSIBench,
    make_benchmark,
    mean_relative_accuracy,
)
from p2r.evaluation.scoring import vsi_question_type


def sample(problem: str, solution: str, problem_type: str = "multiple choice", options: list[str] | None = None,
           facts: dict | None = None, seconds: float = 8.0, benchmark: str = "b") -> Sample:
    if options is None and problem_type == "multiple choice":
        options = ["A. running", "B. jumping", "C. sitting down", "D. waving"]
    record = VideoRecord("r1", problem, problem_type, "video", "v.mp4", solution, options or [], facts=facts)
    clip = Clip(np.zeros((2, 28, 28, 3), np.uint8), fps=25.0, frame_indices=[0, 1], total_frames=int(25 * seconds))
    return Sample(record, clip, benchmark=benchmark)


# --- mean relative accuracy: hand-worked, both conventions ------------------------------------
# Thresholds 0.50, 0.55, ..., 0.95, so 1 - threshold runs 0.50, 0.45, ..., 0.05 and MRA = hits / 10.
# video_r1 compares in float32 with a strict "<"; lmms_eval in float64 with "<=". Where the error
# lands exactly on a threshold the conventions differ, unless float rounding decides first:
#   truth 2, pred 1: error 0.5 exactly; 0.5 < 0.5 fails, 0.5 <= 0.5 holds        -> 0/10 vs 1/10
#   truth 4, pred 3: error 0.25 exactly (binary-exact 0.75): 5 vs 6 hits          -> 0.5 vs 0.6
#   truth 100, pred 130: float32 0.3f equals float32(1 - 0.7f): strict fails; in float64
#       0.29999999999999998 <= 1 - 0.7 = 0.30000000000000004 holds                 -> 0.4 vs 0.5
#   truth 10, pred 9: float32 0.1f = 0.1000000015 < 1 - 0.9f = 0.1000000238, and
#       float64 0.1 <= 1 - 0.8999999999999999 (linspace) = 0.10000000000000009      -> 0.9 both
#   truth 5, pred 4: float32 0.2f = 0.2000000030 is not < 1 - 0.8f = 0.1999999881, and
#       float64 0.2 is not <= 0.19999999999999996                                  -> 0.6 both
#   truth 20, pred 19 or 21: error 0.05 passes even the 0.95 threshold in both    -> 1.0 both
#   truth 3, pred 2: error 1/3, away from every threshold: 0.50 .. 0.35 pass        -> 0.4 both
#   truth 0: only an exact 0 counts                                                 -> 1.0 / 0.0
MRA_CASES = [
    (1, 2, 0.0, 0.1),
    (3, 4, 0.5, 0.6),
    (130, 100, 0.4, 0.5),
    (15, 10, 0.0, 0.1),
    (9, 10, 0.9, 0.9),
    (11, 10, 0.9, 0.9),
    (4, 5, 0.6, 0.6),
    (8, 10, 0.6, 0.6),
    (19, 20, 1.0, 1.0),
    (21, 20, 1.0, 1.0),
    (2, 3, 0.4, 0.4),
    (7, 7, 1.0, 1.0),
    (0, 0, 1.0, 1.0),
    (1, 0, 0.0, 0.0),
    (40, 10, 0.0, 0.0),
]


@pytest.mark.parametrize(("pred", "truth", "video_r1", "lmms_eval"), MRA_CASES)
def test_mra_hand_worked(pred, truth, video_r1, lmms_eval):
    assert mean_relative_accuracy(pred, truth) == video_r1  # the default is the paper's (Video-R1's)
    assert mean_relative_accuracy(pred, truth, "video_r1") == video_r1
    assert mean_relative_accuracy(pred, truth, "lmms_eval") == lmms_eval


def test_mra_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="video_r1"):
        mean_relative_accuracy(1.0, 1.0, "strict")


# --- the answer formats the issue lists, on every benchmark that asks multiple choice -----------
MC_ADAPTERS = [VSIBench(), VideoMMMU(), MMVU(), VCRBench(), MVBench(), TempCompass(), VideoMME(), Synthetic()]


@pytest.mark.parametrize("adapter", MC_ADAPTERS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize(("output", "parsed"), [
    ("(B)", "B"), ("B.", "B"), ("B: jumping", "B"), ("The answer is B", "B"), ("b", "B"),
    ("<answer>b</answer>", "B"), ("<answer>jumping</answer>", "B"),
    ("<observation>A boy leaps over a puddle.</observation>\n<think>He leaves the ground, so he is jumping.</think>\n<answer>B</answer>", "B"),
    ("<think>He is not sitting.</think><answer>C</answer>", "C"),
    ("<answer>E</answer>", None), ("I cannot tell from the video.", None),
])
def test_option_letters_on_every_multiple_choice_benchmark(adapter, output, parsed):
    got = adapter.score(sample("What is the boy doing?", "<answer>B</answer>"), output)
    assert got == Scored(parsed, 1.0 if parsed == "B" else 0.0, "accuracy", "B")


# --- per benchmark: realistic outputs ------------------------------------------------------------
def test_vsibench_numerical_questions_use_mra_and_the_configured_convention():
    count = sample("How many chair(s) are in this room?", "<answer>4</answer>", "numerical")
    size = sample("What is the length of the longest dimension (length, width, or height) of the bed, measured in "
                  "centimeters?", "<answer>200</answer>", "regression")
    paper, lmms = VSIBench(), VSIBench(mra_convention="lmms_eval")
    assert paper.score(count, "<answer>4</answer>") == Scored(4.0, 1.0, "mra", 4.0)
    assert paper.score(count, "<think>I see three chairs by the table.</think><answer>3</answer>").score == 0.5
    assert lmms.score(count, "<answer>3</answer>").score == 0.6
    assert paper.score(count, "<think>Two by the desk, two by the bed.</think><answer>four</answer>").score == 1.0
    assert paper.score(count, "There are 5 chairs.").score == 0.5  # no tag: the whole output; error 0.25
    assert paper.score(count, "<answer>several</answer>") == Scored(None, 0.0, "mra", 4.0)
    assert paper.score(size, "<answer>about 180 cm</answer>") == Scored(180.0, 0.9, "mra", 200.0)
    assert paper.score(size, "<answer>1,990</answer>").score == 0.0  # a thousands comma read right: 10x off


def test_vsibench_multiple_choice_is_plain_accuracy():
    rel = sample("Measuring from the closest point of each object, which of these objects (sofa, table, tv, lamp) "
                 "is the closest to the bed?", "<answer>C</answer>", options=["A. sofa", "B. table", "C. tv", "D. lamp"])
    assert VSIBench().score(rel, "<answer>tv</answer>") == Scored("C", 1.0, "accuracy", "C")
    assert VSIBench().score(rel, "The lamp is right beside it, so D.").score == 0.0


def test_videommmu_ten_options_and_numbers_to_two_decimals():
    options = [f"{letter}. {i * 10} J" for i, letter in enumerate("ABCDEFGHIJ")]
    mc = sample("How much work is done?", "<answer>J</answer>", options=options)
    assert VideoMMMU().score(mc, "<answer>J</answer>").score == 1.0
    assert VideoMMMU().score(mc, "<answer>(j) 90 J</answer>").score == 1.0
    numeric = sample("What is the final velocity in m/s?", "<answer>3.14</answer>", "numerical")
    assert VideoMMMU().score(numeric, "<think>v = pi</think><answer>3.14159</answer>") == Scored(3.14159, 1.0, "accuracy", 3.14)
    assert VideoMMMU().score(numeric, "<answer>3.2</answer>").score == 0.0
    assert VideoMMMU().score(numeric, "The final velocity is 3.140 m/s").score == 1.0


@pytest.mark.parametrize("adapter", [MMVU(), VCRBench()], ids=lambda a: type(a).__name__)
def test_mmvu_and_vcr_report_their_multiple_choice_subset_only(adapter):
    mc = sample("Which law explains the motion?", "<answer>A</answer>",
                options=["A. Newton's first law", "B. Hooke's law", "C. Ohm's law", "D. Snell's law"])
    open_ended = sample("Explain the motion.", "<answer>inertia</answer>", "free-form")
    assert adapter.includes(mc) and not adapter.includes(open_ended)
    assert adapter.score(mc, "**A**").score == 1.0
    assert adapter.score(mc, "<answer>Newton's first law</answer>").score == 1.0


def test_mvbench_tempcompass_videomme_outputs():
    s = sample("What is the boy doing?", "<answer>A</answer>")
    assert MVBench().score(s, "(A) The boy is running.").score == 1.0
    assert MVBench().score(s, "Best option: (A)").score == 1.0
    assert TempCompass().score(s, "A. running").score == 1.0
    assert TempCompass().score(s, "<answer>The clip is played forward, so A</answer>").score == 1.0
    assert VideoMME().score(s, "The answer is A. The boy runs across the yard.").score == 1.0
    assert VideoMME().score(s, "<answer>D</answer>").score == 0.0


def test_synthetic_scores_the_five_problem_types_with_the_reasoning_reward():
    syn = Synthetic()
    cases = [
        (sample("Which shape appears first?", "<answer>B</answer>"), "<answer>B</answer>", 1.0),
        (sample("How many shapes appear?", "<answer>3</answer>", "numerical"), "<answer>three</answer>", 1.0),
        (sample("What word is written?", "<answer>CAT</answer>", "OCR"), "<answer>CAT</answer>", 1.0),
        (sample("What word is written?", "<answer>CAT</answer>", "OCR"), "<answer>cat</answer>", 0.0),
        (sample("How far does it travel?", "<answer>2</answer>", "regression"), "<answer>1.5</answer>", 0.75),
        (sample("Describe the video.", "<answer>A red circle moves from the left to the right.</answer>", "free-form"),
         "<answer>A red circle moves from the left to the right.</answer>", 1.0),
    ]
    for s, output, expected in cases:
        got = syn.score(s, output)
        assert got.metric == "accuracy", (s.record.problem_type, output)
        assert got.score == pytest.approx(expected, abs=1e-8), (s.record.problem_type, output)  # regression: +1e-9 terms
        assert syn.category(s) == s.record.problem_type


# --- categories --------------------------------------------------------------------------------
VSI_QUESTIONS = {
    "object_counting": "How many chair(s) are in this room?",
    "object_size_estimation": "What is the length of the longest dimension (length, width, or height) of the sofa, "
                              "measured in centimeters?",
    "room_size_estimation": "What is the size of this room (in square meters)? If multiple rooms are shown, estimate "
                            "the size of the combined space.",
    "object_abs_distance": "Measuring from the closest point of each object, what is the direct distance between the "
                           "bed and the lamp (in meters)?",
    "object_rel_distance": "Measuring from the closest point of each object, which of these objects (sofa, tv, lamp, "
                           "desk) is the closest to the bed?",
    "object_rel_direction_easy": "If I am standing by the sofa and facing the tv, is the lamp to the left or the right "
                                 "of the tv?",
    "object_rel_direction_medium": "If I am standing by the sofa and facing the tv, is the lamp to my left, right, or "
                                   "back? An object is to my back if I would have to turn at least 135 degrees.",
    "object_rel_direction_hard": "If I am standing by the sofa and facing the tv, is the lamp to my front-left, "
                                 "front-right, back-left, or back-right?",
    "route_planning": "You are a robot beginning at the bed facing the tv. You want to navigate to the door. You will "
                      "perform the following actions: 1. Go forward until the desk 2. [please fill in]",
    "obj_appearance_order": "What will be the first-time appearance order of the following categories in the video: "
                            "sofa, lamp, tv, bed?",
}


@pytest.mark.parametrize(("kind", "question"), VSI_QUESTIONS.items())
def test_vsi_question_type_from_its_template(kind, question):
    assert vsi_question_type(question) == kind
    assert VSIBench().category(sample(question, "<answer>A</answer>")) == kind


def test_categories_from_record_fields_win_and_unknown_ones_are_other():
    s = sample("How many chair(s) are in this room?", "<answer>4</answer>", "numerical",
               facts={"original_question_type": "object_counting_v2"})
    assert VSIBench().category(s) == "object_counting_v2"
    assert VSIBench().category(sample("Is it raining?", "<answer>A</answer>")) == "other"
    task = sample("What happened after the person took the cup?", "<answer>A</answer>", facts={"task_type": "Action Sequence"})
    assert MVBench().category(task) == "Action Sequence"
    assert MVBench().category(sample("What happened?", "<answer>A</answer>")) == "other"
    assert TempCompass().category(sample("Q?", "<answer>A</answer>", facts={"dim": "speed"})) == "speed"
    assert MMVU(category_fields=["area"]).category(sample("Q?", "<answer>A</answer>", facts={"area": "Chemistry"})) == "Chemistry"


@pytest.mark.parametrize(("seconds", "duration"), [(95, "short"), (170, "short"), (300, "medium"), (890, "medium"),
                                                   (1900, "long"), (3500, "long")])
def test_videomme_duration_from_the_decoded_video(seconds, duration):
    assert VideoMME().category(sample("Q?", "<answer>A</answer>", seconds=seconds)) == duration
    assert VideoMME().category(sample("Q?", "<answer>A</answer>", seconds=seconds, facts={"duration": "long"})) == "long"


# --- registry and prompts ------------------------------------------------------------------------
def test_registry_covers_the_papers_table_and_builds_by_name():
    assert [BENCHMARKS[name].column for name in list(BENCHMARKS)[:7]] == list(PAPER_COLUMNS)
    vsi = make_benchmark("vsibench", mra_convention="lmms_eval")
    assert isinstance(vsi, VSIBench) and vsi.mra_convention == "lmms_eval"
    with pytest.raises(KeyError, match="vsibench"):
        make_benchmark("mmbench")


def test_prompt_has_question_options_and_answer_rule_and_template_switch():
    s = sample("What is the boy doing?", "<answer>B</answer>")
    with_template, bare = MVBench().prompt(s), MVBench(template="none").prompt(s)
    assert with_template.startswith("What is the boy doing?\nOptions:\nA. running\nB. jumping")
    assert "<observation>" in with_template and "<observation>" not in bare
    assert "option's letter" in bare
    assert "number only" in VSIBench().prompt(sample("How many chair(s) are in this room?", "<answer>4</answer>", "numerical"))
