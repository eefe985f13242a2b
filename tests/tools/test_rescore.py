"""tools/rescore.py and tools/native_records.py: stored outputs scored again under every protocol,
records made from dataset rows, and a ``p2r test`` run under lmms_eval rescored under video_r1."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from p2r.cli import main as p2r_main

REPO = Path(__file__).resolve().parents[2]
SMALLER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vision_hidden_size": 16, "vision_depth": 1}


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rescore, native_records = tool("rescore"), tool("native_records")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_rescore(args: list[str], capsys) -> tuple[dict, list[dict], str]:
    assert rescore.main(args) == 0
    out = Path(args[args.index("--out") + 1])
    printed = capsys.readouterr().out.strip().splitlines()
    return json.loads((out / "results.json").read_text()), read_jsonl(out / "predictions.jsonl"), printed[-1]


def video_r1_record(problem_type: str, answer: str, output: str, **extra) -> dict:
    options = ["A. running", "B. jumping"] if problem_type == "multiple choice" else []
    return {"problem": "Q?", "options": options, "solution": f"<answer>{answer}</answer>", "problem_type": problem_type,
            "data_type": "video", "path": "./Evaluation/x.mp4", "output": output, **extra}


def test_video_r1_records_keep_their_order_and_the_last_line_is_the_figure(tmp_path, capsys):
    lines = [video_r1_record("multiple choice", "B", "<think>x</think><answer>B</answer>"),
             video_r1_record("multiple choice", "A", "a"),
             video_r1_record("regression", "200", "<answer>150</answer>", original_question_type="object_size_estimation"),
             video_r1_record("free-form", "a dog", "<answer>a dog</answer>")]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    results, predictions, last = run_rescore(["--protocol", "video_r1", "--benchmark", "vsibench", str(source),
                                              "--out", str(tmp_path / "out")], capsys)
    assert [p["score"] for p in predictions] == [1.0, 0.0, 0.5, 0.0]  # free-form scores 0 in eval_bench.py
    assert [p["parsed"] for p in predictions] == ["B", "a", "150", "a dog"]
    assert all({k: p[k] for k in line} == line for p, line in zip(predictions, lines))  # each input line, in order
    mean_acc = results["mean_acc"]
    assert mean_acc == pytest.approx(1 / 3) and results["mean_mra"] == 0.5
    assert results["figure"] == (mean_acc + 0.5) / 2 and results["categories"]["object_size_estimation"] == 0.5
    assert last == f"figure: {results['figure']}"


def test_lmms_eval_rows_with_the_task_named_by_the_row_or_the_benchmark(tmp_path, capsys):
    row = {"video": "v.mp4", "question": "Q?", "candidates": ["running", "jumping"], "answer": "running"}
    rows = [{**row, "output": o} for o in ("A", "a person runs", "B", "")]
    bare = write_jsonl(tmp_path / "bare.jsonl", rows)
    results, predictions, last = run_rescore(["--protocol", "lmms_eval", "--benchmark", "mvbench_action_count", str(bare),
                                              "--out", str(tmp_path / "a")], capsys)
    assert [p["score"] for p in predictions] == [1.0, 1.0, 0.0, 0.0]
    assert (results["figure"], results["units"], last) == (100 * 2 / 3, "percent", f"figure: {100 * 2 / 3}")
    tagged = write_jsonl(tmp_path / "tagged.jsonl", [{**r, "task": "action_count"} for r in rows])
    again, _, _ = run_rescore(["--protocol", "lmms_eval", "--benchmark", "mvbench", str(tagged), "--out", str(tmp_path / "b")], capsys)
    assert again["figure"] == results["figure"] and again["tasks"] == {"mvbench_action_count": results["figure"]}
    with pytest.raises(SystemExit, match="needs the lmms-eval task"):
        rescore.main(["--protocol", "lmms_eval", "--benchmark", "mvbench", str(bare), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="another benchmark"):
        rescore.main(["--protocol", "lmms_eval", "--benchmark", "vcrbench", str(bare), "--out", str(tmp_path / "d")])


def test_native_records_refuses_rows_without_their_task(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"video": "v.mp4", "question": "Q?", "candidates": ["x"], "answer": "x"}])
    with pytest.raises(ValueError, match="mvbench_action_count"):
        native_records.main(["--benchmark", "mvbench", "--rows", str(rows), "--out", str(tmp_path / "r.jsonl")])
    assert native_records.main(["--benchmark", "mvbench", "--rows", f"action_count={rows}", "--out", str(tmp_path / "r.jsonl")]) == 0
    assert read_jsonl(tmp_path / "r.jsonl")[0]["id"] == "mvbench_action_count/0"


VSI_ROWS = [
    {"id": 1, "dataset": "scannet", "scene_name": "scene0001", "question_type": "object_counting",
     "question": "How many chair(s) are in this room?", "options": None, "ground_truth": "3"},
    {"id": 2, "dataset": "scannet", "scene_name": "scene0002", "question_type": "obj_appearance_order",
     "question": "What will be the first-time appearance order?", "options": ["A. sofa, lamp", "B. lamp, sofa"],
     "ground_truth": "A"},
]
MV_ROWS = [{"video": f"clip{i}.mp4", "question": "What is the boy doing?", "candidates": ["running", "jumping"],
            "answer": "running"} for i in range(2)]


@pytest.mark.slow
def test_p2r_test_under_lmms_eval_then_rescored_under_every_protocol(tmp_path, ramp_mp4, capsys):
    assert native_records.main(["--benchmark", "vsibench", "--rows", str(write_jsonl(tmp_path / "vsi_rows.jsonl", VSI_ROWS)),
                                "--out", str(tmp_path / "vsibench.jsonl")]) == 0
    assert native_records.main(["--benchmark", "mvbench", "--rows", f"action_count={write_jsonl(tmp_path / 'mv_rows.jsonl', MV_ROWS)}",
                                "--out", str(tmp_path / "mvbench.jsonl")]) == 0
    media = tmp_path / "hf"  # lmms-eval's cache layout under $HF_HOME
    for record in read_jsonl(tmp_path / "vsibench.jsonl") + read_jsonl(tmp_path / "mvbench.jsonl"):
        (media / record["path"]).parent.mkdir(parents=True, exist_ok=True)
        (media / record["path"]).write_bytes(ramp_mp4)
    sets = {"vsibench": str(tmp_path / "vsibench.jsonl"), "mvbench": str(tmp_path / "mvbench.jsonl")}
    out = tmp_path / "run"
    p2r_main(["test", "--config", str(REPO / "configs/eval.yaml"), "--config", str(REPO / "configs/tiny.yaml"),
              "--trainer.callbacks.init_args.protocol=lmms_eval", f"--data.test_sets={json.dumps(sets)}",
              f"--data.media_root={media}", f"--trainer.default_root_dir={out}", "--trainer.logger=false",
              "--data.num_workers=0", *(f"--model.init_args.backbone.init_args.{k}={v}" for k, v in SMALLER.items())])
    capsys.readouterr()
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 4 and {p["protocol"] for p in predictions} == {"lmms_eval"}
    vsi_prompt = next(p["prompt"] for p in predictions if p["id"] == "vsibench/1")
    assert vsi_prompt.startswith("These are frames of a video.\nHow many chair(s)")
    results = json.loads((out / "results.json").read_text())["results"]

    # The same predictions file, rescored under the protocol they were made with: the same figures.
    for benchmark in ("vsibench", "mvbench"):
        again, rows, _ = run_rescore(["--protocol", "lmms_eval", "--benchmark", benchmark, str(out / "predictions.jsonl"),
                                      "--out", str(tmp_path / f"same_{benchmark}")], capsys)
        assert again["figure"] == results[benchmark]["figure"] and again["skipped_other_benchmarks"] == 2
        assert [r["score"] for r in rows] == [p["score"] for p in predictions if p["benchmark"] == benchmark]
    # ... and under Video-R1's and p2r's rules, from the records the predictions carry.
    for protocol in ("video_r1", "p2r"):
        other, rows, last = run_rescore(["--protocol", protocol, "--benchmark", "vsibench", str(out / "predictions.jsonl"),
                                         "--out", str(tmp_path / protocol)], capsys)
        assert other["protocol"] == protocol and other["n"] == 2 and last == f"figure: {other['figure']}"
        assert {r["metric"] for r in rows} == {"accuracy", "mra"}


def test_videommmu_lines_lmms_eval_drops_have_no_score_and_count_as_left_out(tmp_path, capsys):
    # lmms-eval's videommmu_aggregate_results filters parsed_pred == "API Error": an empty open answer,
    # or that literal text. They are not wrong answers: the track figure is 1/1 here, not 1/3.
    row = {"question": "Q?", "options": [], "answer": "5", "question_type": "open", "task": "video_mmmu_adaptation"}
    rows = [{**row, "id": f"validation_Math_{i}", "output": o} for i, o in enumerate(("The answer is 5.", "", "API Error"))]
    results, predictions, last = run_rescore(["--protocol", "lmms_eval", "--benchmark", "videommmu",
                                              str(write_jsonl(tmp_path / "in.jsonl", rows)), "--out", str(tmp_path / "out")], capsys)
    assert [p["score"] for p in predictions] == [1.0, None, None]
    assert '"score": null' in (tmp_path / "out/predictions.jsonl").read_text()
    assert (results["figure"], results["n"], results["excluded"], results["n_api_error"]) == (1.0, 1, 2, 2)
    assert last == "figure: 1.0"


def test_text_only_answers_of_a_predictions_line_are_scored_again(tmp_path, capsys):
    """A ``p2r test`` line with analyses: the stored text-only answers get the new protocol's scores;
    a failed answer and the think-answer reading stay as they were."""
    reading = {"think": "B", "answer": "B", "mismatch": False, "method": "rule", "kind": "letter"}
    line = {**video_r1_record("multiple choice", "B", "<think>so B</think><answer>B</answer>"),
            "analyses": {"text_only": {"observation": "a boy jumps",
                                       "observation_only": {"output": "<answer>B</answer>", "score": 0.0, "parsed": "x"},
                                       "question_only": {"error": "HTTP 500"}},
                         "think_answer_mismatch": reading}}
    source = write_jsonl(tmp_path / "in.jsonl", [line])
    _, predictions, _ = run_rescore(["--protocol", "video_r1", "--benchmark", "mvbench", str(source),
                                     "--out", str(tmp_path / "out")], capsys)
    analyses = predictions[0]["analyses"]
    assert analyses["text_only"]["observation_only"] == {"output": "<answer>B</answer>", "score": 1.0, "parsed": "B",
                                                         "metric": "accuracy", "details": {"problem_type": "multiple choice"}}
    assert analyses["text_only"]["question_only"] == {"error": "HTTP 500"}
    assert analyses["think_answer_mismatch"] == reading and analyses["text_only"]["observation"] == "a boy jumps"
