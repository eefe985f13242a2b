"""The ``video_r1`` protocol on hand-worked cases from Video-R1's ``src/eval_bench.py``: its prompt,
decoding, exact scoring and float32 figures (its reading, answer block else the whole output, is
tested with the other readers in tests/callbacks/test_cb_parsing.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from callbacks.evaluation import Generation
from p2r.data.records import VideoRecord
from p2r.evaluation.video_r1 import VideoR1Rules

MC = VideoRecord("1", "What is the boy doing?", "multiple choice", "video", "v.mp4", "<answer>B</answer>",
                 ["A. running", "B. jumping"])
NUM = VideoRecord("2", "How many cars?", "numerical", "video", "v.mp4", "<answer>3</answer>")
DEC = VideoRecord("3", "How fast, in m/s?", "numerical", "video", "v.mp4", "<answer>2.50</answer>")
REG = VideoRecord("4", "How long is the bed, in cm?", "regression", "video", "v.mp4", "<answer>200</answer>")
OCR = VideoRecord("5", "What is written?", "OCR", "video", "v.mp4", "<answer>EXIT</answer>")


def test_prompt_is_eval_bench_and_decoding_its_settings():
    rules = VideoR1Rules("mvbench")
    prompt = rules.prompt(MC)
    # the problem runs straight into "Options:" (no newline), as eval_bench.py builds it
    assert prompt.startswith("What is the boy doing?Options:\nA. running\nB. jumping\n\nPlease think about this question")
    assert "between the <think> and </think> tags, and then give your final answer between the <answer> and </answer> tags." in prompt
    assert prompt.endswith(" Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert rules.prompt(REG).endswith("Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.")
    assert "<observation>" in VideoR1Rules("mvbench", template="videop2r").prompt(MC)
    assert rules.generation(MC) == Generation(1024, 0.1, 0.001)


@pytest.mark.parametrize(("record", "output", "score"), [
    (MC, "<answer>B</answer>", 1.0), (MC, "B", 1.0), (MC, " B \n", 1.0),
    (MC, "<answer>b</answer>", 0.0), (MC, "<answer>(B)</answer>", 0.0), (MC, "<answer>B.</answer>", 0.0),
    (MC, "<answer>B. jumping</answer>", 0.0), (MC, "The answer is B", 0.0),
    (MC, "<think>B</think><answer>B", 0.0),                         # unclosed: the whole output is compared
    (NUM, "<answer>3</answer>", 1.0), (NUM, "3", 1.0), (NUM, "<answer>3.0</answer>", 0.0),  # the decimal rule
    (NUM, "<answer>3 cars</answer>", 0.0), (NUM, "<answer>three</answer>", 0.0),
    (DEC, "<answer>2.5</answer>", 1.0), (DEC, "<answer>2.504</answer>", 1.0), (DEC, "<answer>3</answer>", 0.0),
    (REG, "<answer>200</answer>", 1.0), (REG, "<answer>180</answer>", np.float32(0.9).item()),  # error 0.1 < 0.15
    (REG, "<answer>150</answer>", np.float32(0.5).item()),          # error 0.25: 0.25 < 0.25 fails (strict)
    (REG, "<answer>1,990</answer>", 0.0), (REG, "<answer>about 200</answer>", 0.0),
    (OCR, "<answer>EXIT</answer>", 0.0),                            # eval_bench.py scores OCR and free-form 0
])
def test_scores(record, output, score):
    assert VideoR1Rules("vsibench").score(record, output).score == score


def test_truth_without_an_answer_block_reads_empty():
    bare = VideoRecord("6", "Q?", "multiple choice", "video", "v.mp4", "B", ["A. x", "B. y"])
    assert VideoR1Rules("mvbench").score(bare, "B").score == 0.0  # eval_bench.py reads "" as the truth


def test_figures_are_float32_means_and_vsi_is_their_mean():
    rules = VideoR1Rules("vsibench")
    outputs = [(MC, "B"), (MC, "A"), (MC, "b"), (REG, "<answer>180</answer>"), (REG, "<answer>150</answer>"),
               (REG, "<answer>200</answer>")]
    rows = []
    for record, output in outputs:
        scored = rules.score(record, output)
        rows.append({"score": scored.score, "metric": scored.metric, "category": record.problem_type})
    figure = rules.aggregate(rows)
    mean_acc = torch.tensor([1.0, 0.0, 0.0]).mean().item()          # 0.3333333432674408, float32
    mean_mra = torch.tensor([np.float32(0.9).item(), 0.5, 1.0]).mean().item()
    assert (figure["mean_acc"], figure["mean_mra"]) == (mean_acc, mean_mra)
    assert figure["figure"] == (mean_acc + mean_mra) / 2 and figure["units"] == "fraction"
    only_mc = VideoR1Rules("mvbench").aggregate(rows[:3])
    assert (only_mc["figure"], only_mc["mean_mra"], only_mc["metric"]) == (mean_acc, 0.0, "mean_acc")


@pytest.mark.parametrize("benchmark", ["mmvu", "vcrbench"])
def test_mmvu_and_vcrbench_count_multiple_choice_only(benchmark):
    rules = VideoR1Rules(benchmark)
    assert rules.includes(MC) and not rules.includes(OCR)
    assert VideoR1Rules("mvbench").includes(OCR)
