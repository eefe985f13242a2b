"""Record parsing and validation (native and RL all-string layouts), answers, SFT targets."""

from __future__ import annotations

import json

import pytest

from callbacks.rewards.format import think_answer_format
from p2r.data.records import RecordError, VideoRecord, parse_record, target_text, think_answer_target
from p2r.data.synthetic import VideoSpec, generate_split


def native(**changes) -> dict:
    raw = {
        "id": "clip-1",
        "problem": "Which way does the red circle move?",
        "problem_type": "multiple choice",
        "data_type": "video",
        "path": "videos/clip-1.mp4",
        "solution": "<answer>B</answer>",
        "options": ["A. left", "B. right"],
        "observation": "<observation>A red circle moves right.</observation>",
        "process": "<think>It moves right, option B.</think>",
        "output": "",
        "data_source": "synthetic",
        "facts": {"evidence": [["moves right"]]},
    }
    raw.update(changes)
    return raw


def rl_style(**changes) -> dict:
    """The RL file's layout: every value a string, options and facts included."""
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in native().items()}
    del raw["id"]
    raw["problem_id"] = "17"
    raw.update(changes)
    return raw


def test_native_record_parses_every_field():
    rec = parse_record(native())
    assert rec == VideoRecord(
        id="clip-1", problem="Which way does the red circle move?", problem_type="multiple choice",
        data_type="video", path="videos/clip-1.mp4", solution="<answer>B</answer>", options=["A. left", "B. right"],
        observation="<observation>A red circle moves right.</observation>",
        process="<think>It moves right, option B.</think>", output="", data_source="synthetic",
        facts={"evidence": [["moves right"]]},
    )
    assert rec.answer == "B"
    assert parse_record(rec.to_dict()) == rec


@pytest.mark.parametrize("options", ['["A. left", "B. right"]', "['A. left', 'B. right']", "('A. left', 'B. right')"])
def test_rl_all_string_record_parses(options):
    rec = parse_record(rl_style(options=options))
    assert rec.options == ["A. left", "B. right"]
    assert rec.facts == {"evidence": [["moves right"]]}
    assert rec.id == "17"  # problem_id is the id when there is no id


def test_case_whitespace_and_numeric_options_are_normalised():
    rec = parse_record(native(problem_type=" Multiple Choice ", data_type="VIDEO", options=[1, 2.5], id=3))
    assert (rec.problem_type, rec.data_type, rec.options, rec.id) == ("multiple choice", "video", ["1", "2.5"], "3")
    assert parse_record(native(problem_type="ocr", options="")).problem_type == "OCR"


def test_id_falls_back_to_default_then_to_where():
    raw = native()
    del raw["id"]
    assert parse_record(raw, where="f.json[4]", default_id="f-000004").id == "f-000004"
    assert parse_record(raw, where="f.json[4]").id == "f.json[4]"


def test_empty_optional_fields_become_empty():
    raw = native(problem_type="numerical", options="[]", observation=None, process="", facts="")
    rec = parse_record(raw)
    assert (rec.options, rec.observation, rec.process, rec.facts) == ([], "", "", None)
    assert "facts" not in rec.to_dict()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"problem": ""}, "missing field(s) problem"),
        ({"path": None, "solution": ""}, "missing field(s) path, solution"),
        ({"problem_type": "essay"}, "unknown problem_type 'essay'"),
        ({"data_type": "audio"}, "unknown data_type 'audio'"),
        ({"options": []}, "multiple choice record needs a non-empty 'options'"),
        ({"options": "[]"}, "multiple choice record needs a non-empty 'options'"),
        ({"options": "A. left or B. right"}, "'options' is a string that is not a list"),
        ({"options": {"A": "left"}}, "'options' must be a list of strings, got dict"),
        ({"options": "5"}, "'options' must be a list of strings, got int"),
        ({"options": [["A"], ["B"]]}, "'options' must be a list of strings"),
        ({"facts": "{not json"}, "'facts' is a string that is not JSON"),
        ({"facts": [1, 2]}, "'facts' must be an object"),
        ({"facts": "[1, 2]"}, "'facts' must be an object"),
    ],
)
def test_bad_records_raise_naming_the_record(changes, message):
    with pytest.raises(RecordError) as err:
        parse_record(native(**changes), where="train.json[17]")
    assert str(err.value).startswith("train.json[17]: ")
    assert message in str(err.value)


def test_missing_key_and_non_object_records_raise():
    raw = native()
    del raw["data_type"]
    with pytest.raises(RecordError, match=r"^rl\.json\[2\]: missing field\(s\) data_type$"):
        parse_record(raw, where="rl.json[2]")
    with pytest.raises(RecordError, match=r"^rl\.json\[3\]: a record must be a JSON object, got list$"):
        parse_record(["problem"], where="rl.json[3]")


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("<think>a</think> <answer> B </answer>", "B"),
        ("<answer>1</answer> then <answer>\n2.5\n</answer>", "1"),  # the first block, as Video-R1 reads it
        ("<answer>two\nlines</answer>", "two\nlines"),
        ("  just text  ", "just text"),  # a bare answer
        ("<answer>unclosed", "<answer>unclosed"),
        ("<ANSWER>cat</ANSWER>", "<ANSWER>cat</ANSWER>"),  # Video-R1's tags are lower case
    ],
)
def test_answer_is_the_first_answer_block_of_the_solution(solution, answer):
    assert parse_record(native(solution=solution)).answer == answer


def test_target_text_assembles_observation_think_answer():
    rec = parse_record(native(observation="A red circle moves right.", process="It moves right."))
    assert target_text(rec) == (
        "<observation>A red circle moves right.</observation>\n<think>It moves right.</think>\n<answer>B</answer>"
    )
    tagged = parse_record(native())  # already tagged segments are not wrapped twice
    assert target_text(tagged) == (
        "<observation>A red circle moves right.</observation>\n"
        "<think>It moves right, option B.</think>\n<answer>B</answer>"
    )


def test_target_text_uses_a_full_output_trace_as_is():
    output = "  <observation>obs</observation> <think>t</think> <answer>A</answer>\n"
    rec = parse_record(native(output=output))
    assert target_text(rec) == output.strip()
    # An output without the tags (e.g. a bare answer) is not a trace: the target is assembled.
    rec = parse_record(native(output="B"))
    assert target_text(rec).startswith("<observation>A red circle")


@pytest.mark.parametrize("empty", ["observation", "process"])
def test_target_text_without_a_trace_raises_naming_the_record(empty):
    rec = parse_record(native(**{empty: ""}))
    with pytest.raises(RecordError, match="record clip-1: no 'output' trace"):
        target_text(rec)


def test_think_answer_target_of_a_video_r1_cot_record_is_process_newline_solution():
    # Video-R1-COT-165k's layout: no observation, process = <think>...</think>, solution = <answer>X</answer>;
    # sft_video.py trains on process + "\n" + solution.
    rec = parse_record(native(observation="", output=""))
    assert think_answer_target(rec) == rec.process + "\n" + rec.solution
    assert think_answer_target(rec) == "<think>It moves right, option B.</think>\n<answer>B</answer>"


def test_think_answer_target_puts_a_synthetic_records_observation_inside_think():
    rec, _ = generate_split("train", 3, seed=0, spec=VideoSpec())[0]
    assert rec.observation.startswith("<observation>") and rec.process.startswith("<think>")
    target = think_answer_target(rec)
    assert target == (
        "<think>A yellow square is on a black background. It starts at the right edge and moves left across "
        "the whole frame, ending at the left edge. The square begins at the right edge and finishes at the "
        "left edge, so its motion is left. That is option A.</think>\n<answer>A</answer>"
    )
    assert "<observation>" not in target and "</observation>" not in target
    # Video-R1's whole-output format reward: 1 on this target, 0 on the process-aware one.
    assert think_answer_format(target) == 1.0 and think_answer_format(target_text(rec)) == 0.0


def test_think_answer_target_of_untagged_fields_and_a_bare_solution():
    rec = parse_record(native(observation=" A red circle moves right. ", process="It moves right.", solution="B"))
    assert think_answer_target(rec) == "<think>A red circle moves right. It moves right.</think>\n<answer>B</answer>"


def test_think_answer_target_reads_the_segments_of_a_full_output_trace():
    output = "<observation> A red circle. </observation>\n<think>So B.</think>\n<answer>B</answer>"
    rec = parse_record(native(observation="", process="", output=output))
    assert think_answer_target(rec) == "<think>A red circle. So B.</think>\n<answer>B</answer>"


@pytest.mark.parametrize("output", ["", "<observation>obs</observation> <answer>B</answer>", "<think>cut off"])
def test_think_answer_target_without_reasoning_raises_naming_the_record(output):
    rec = parse_record(native(process="", output=output))  # an observation alone is nothing to reason with
    with pytest.raises(RecordError, match="record clip-1: no 'process' and no <think>"):
        think_answer_target(rec)
