"""The same model outputs through every protocol, and where the protocols differ.

The records are made from dataset rows by ``native_record`` (what ``tools/native_records.py``
writes), so each carries both the Video-R1 layout (``video_r1``, ``p2r``) and the native row
(``lmms_eval``), and they go through the adapters exactly as ``p2r test`` sends them.
"""

from __future__ import annotations

import numpy as np
import pytest

from p2r.data.datamodule import Sample
from p2r.data.records import parse_record
from p2r.data.video import Clip
from p2r.evaluation import MVBench, VSIBench
from p2r.evaluation.lmms_eval.records import native_record

PROTOCOLS = ("video_r1", "lmms_eval", "p2r")
MV_ROW = {"video": "clip.mp4", "question": "What is the boy doing?", "candidates": ["running", "jumping", "sitting"],
          "answer": "running"}
VSI_ROW = {"id": 7, "dataset": "scannet", "scene_name": "scene0001", "question_type": "object_counting",
           "question": "How many chair(s) are in this room?", "options": None, "ground_truth": "4"}


def sample_of(benchmark: str, row: dict, task: str | None) -> Sample:
    record = parse_record(native_record(benchmark, row, task, 0))
    return Sample(record, Clip(np.zeros((2, 28, 28, 3), np.uint8), fps=2.0, frame_indices=[0, 1], total_frames=2),
                  benchmark=benchmark)


def test_a_native_record_carries_both_layouts():
    record = parse_record(native_record("mvbench", MV_ROW, "action_count", 3))
    assert (record.id, record.problem_type, record.options, record.answer) == (
        "mvbench_action_count/3", "multiple choice", ["A. running", "B. jumping", "C. sitting"], "A")
    assert record.path == "mvbench_video/perception/videos/clip.mp4"
    assert record.extra["native"] == MV_ROW and record.extra["task"] == "mvbench_action_count"
    assert record.extra["task_type"] == "action_count"  # the category field the Video-R1 layout is read by
    vsi = parse_record(native_record("vsibench", VSI_ROW, None, 0))
    assert (vsi.id, vsi.problem_type, vsi.answer, vsi.path) == ("vsibench/7", "regression", "4", "vsibench/scannet/scene0001.mp4")


# Truth: A ("running"). Verdicts per protocol: video_r1 needs the exact letter (in an answer block or as the
# whole output); lmms_eval's MVBench reader lower-cases and takes the first standalone a-e, after stripping
# <think> only; p2r reads letters, answer phrases and option texts, but not a lower-case article.
MV_CASES = [
    # output                                        video_r1 lmms_eval p2r
    ("A",                                            1, 1, 1),
    ("<answer>A</answer>",                           1, 1, 1),
    ("<think>B is wrong</think><answer>A</answer>",  1, 1, 1),
    ("a",                                            0, 1, 1),
    ("(A) running",                                  0, 1, 1),
    ("The answer is A.",                             0, 1, 1),
    ("running",                                      0, 0, 1),
    ("a boy running",                                0, 1, 0),
    ("<answer>a</answer>",                           0, 1, 1),
    ("<think>so A</think><answer>A",                 0, 1, 1),
    ("B",                                            0, 0, 0),
    ("",                                             0, 0, 0),
]


@pytest.mark.parametrize(("output", "video_r1", "lmms_eval", "p2r"), MV_CASES, ids=[repr(c[0]) for c in MV_CASES])
def test_one_mvbench_output_under_every_protocol(output, video_r1, lmms_eval, p2r):
    sample = sample_of("mvbench", MV_ROW, "action_count")
    verdicts = tuple(MVBench(protocol=p).score(sample, output).score for p in PROTOCOLS)
    assert verdicts == (video_r1, lmms_eval, p2r)


def test_the_figures_of_the_same_outputs_differ_by_protocol():
    sample = sample_of("mvbench", MV_ROW, "action_count")
    figures = {}
    for protocol in PROTOCOLS:
        adapter = MVBench(protocol=protocol)
        rows = []
        for output, *_ in MV_CASES:
            scored = adapter.score(sample, output)
            rows.append({"score": scored.score, "metric": scored.metric, "category": adapter.category(sample),
                         "parsed": scored.parsed, "details": scored.details})
        figures[protocol] = adapter.aggregate(rows)
    assert figures["video_r1"]["figure"] == np.float32(3 / 12).item() and figures["video_r1"]["units"] == "fraction"
    # lmms-eval: 9 right of the 11 non-empty outputs, in percent
    assert figures["lmms_eval"]["figure"] == 100 * 9 / 11 and figures["lmms_eval"]["units"] == "percent"
    assert figures["p2r"]["figure"] == 9 / 12


def test_prompts_and_decoding_differ_by_protocol():
    sample = sample_of("mvbench", MV_ROW, "action_count")
    prompts = {p: MVBench(protocol=p).prompt(sample) for p in PROTOCOLS}
    assert prompts["video_r1"].startswith("What is the boy doing?Options:\nA. running\n") and "<think>" in prompts["video_r1"]
    assert prompts["lmms_eval"].endswith("(A) running\n(B) jumping\n(C) sitting\nOnly give the best option.\n")
    assert "<observation>" in prompts["p2r"]
    decoding = {p: MVBench(protocol=p).generation(sample) for p in PROTOCOLS}
    assert tuple(decoding["video_r1"]) == (1024, 0.1, 0.001) and tuple(decoding["lmms_eval"]) == (16, 0.0, 1.0)
    assert decoding["p2r"] is None  # the module's own eval settings
    assert MVBench(protocol="lmms_eval", protocol_generation=False).generation(sample) is None


# Truth 4. video_r1: float() of the answer block or whole output, float32 MRA with a strict "<";
# lmms_eval: the first number (digits or words) anywhere, MRA with "<="; p2r: the first number in the
# answer block (or output), MRA with video_r1's convention.
VSI_CASES = [
    # output                         video_r1              lmms_eval p2r
    ("<answer>4</answer>",           1.0,                  1.0,      1.0),
    ("<answer>3</answer>",           0.5,                  0.6,      0.5),
    ("3",                            0.5,                  0.6,      0.5),
    ("three",                        0.0,                  0.6,      0.5),
    ("about 3 chairs",               0.0,                  0.6,      0.5),
    ("<answer>5</answer>",           0.5,                  0.6,      0.5),  # error 0.25 on the 0.75 threshold
    ("<answer>4.4</answer>",         np.float32(0.8).item(), 0.9,    np.float32(0.8).item()),  # float32 error 0.1000000 ties 1 - 0.9
    ("",                             0.0,                  0.0,      0.0),
]


@pytest.mark.parametrize(("output", "video_r1", "lmms_eval", "p2r"), VSI_CASES, ids=[repr(c[0]) for c in VSI_CASES])
def test_one_vsibench_count_under_every_protocol(output, video_r1, lmms_eval, p2r):
    sample = sample_of("vsibench", VSI_ROW, None)
    scores = tuple(VSIBench(protocol=p).score(sample, output).score for p in PROTOCOLS)
    assert scores == (video_r1, lmms_eval, p2r)
    assert VSIBench(protocol="lmms_eval").category(sample) == VSIBench(protocol="video_r1").category(sample) == "object_counting"


def test_lmms_eval_needs_the_native_row():
    record = parse_record({"problem": "Q?", "problem_type": "multiple choice", "options": ["A. x", "B. y"],
                           "solution": "<answer>A</answer>", "data_type": "video", "path": "v.mp4", "id": "q1"})
    sample = Sample(record, Clip(np.zeros((2, 28, 28, 3), np.uint8), fps=2.0), benchmark="mvbench")
    assert MVBench(protocol="video_r1").score(sample, "A").score == 1.0
    with pytest.raises(ValueError, match="no 'native' row.*tools/native_records.py"):
        MVBench(protocol="lmms_eval").prompt(sample)
