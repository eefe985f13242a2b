"""The evaluation callback's bookkeeping on hand-made rows: metric encoding, summaries, the table,
results.json and reading predictions back."""

from __future__ import annotations

import json
import math

import pytest

from callbacks.evaluation import BenchmarkScores
from callbacks.evaluation.metric import decode_rows, encode_rows
from callbacks.evaluation.report import (
    EXCLUDED,
    markdown_table,
    read_predictions,
    results_document,
    summarize,
    table_values,
    write_json,
)

ROWS = [
    (("vsibench", "object_counting", "mra"), 0.5),
    (("vsibench", "object_counting", "mra"), 0.9),
    (("vsibench", "room_size_estimation", "mra"), 0.1),
    (("vsibench", "obj_appearance_order", "accuracy"), 1.0),
    (("vsibench", "object_rel_distance", "accuracy"), 0.0),
    (("vsibench", "object_rel_distance", "accuracy"), 1.0),
    (("mvbench", "Action Sequence", "accuracy"), 1.0),
    (("mvbench", "Fine-grained Pose ✓ «ü»", "accuracy"), 0.0),
    (("mmvu", "", EXCLUDED), 0.0),
    (("mmvu", "Chemistry", "accuracy"), 1.0),
]


def test_rows_round_trip_through_the_flat_encoding_with_any_characters():
    keys, scores = [k for k, _ in ROWS], [s for _, s in ROWS]
    assert decode_rows(encode_rows(keys, scores)) == ROWS
    with pytest.raises(ValueError, match="truncated"):
        decode_rows(encode_rows(keys, scores)[:-1])


def test_metric_accumulates_over_updates():
    metric = BenchmarkScores().on_device("cpu")
    metric.update([], [])
    assert metric.compute() == []
    metric.update([k for k, _ in ROWS[:4]], [s for _, s in ROWS[:4]])
    metric.update([], [])
    metric.update([k for k, _ in ROWS[4:]], [s for _, s in ROWS[4:]])
    assert metric.compute() == ROWS


def test_summary_vsi_is_the_mean_of_mc_accuracy_and_mra():
    summary = summarize(ROWS)
    vsi = summary["vsibench"]
    mra, acc = (0.5 + 0.9 + 0.1) / 3, (1.0 + 0.0 + 1.0) / 3
    assert vsi["metrics"]["mra"] == {"score": pytest.approx(mra), "n": 3}
    assert vsi["metrics"]["accuracy"] == {"score": pytest.approx(acc), "n": 3}
    assert vsi["score"] == pytest.approx((mra + acc) / 2) and vsi["n"] == 6
    assert vsi["categories"]["object_counting"]["score"] == pytest.approx(0.7)
    assert vsi["categories"]["object_rel_distance"]["n"] == 2
    assert summary["mvbench"]["score"] == 0.5 and set(summary["mvbench"]["categories"]) == {"Action Sequence", "Fine-grained Pose ✓ «ü»"}
    assert (summary["mmvu"]["n"], summary["mmvu"]["excluded"], summary["mmvu"]["score"]) == (1, 1, 1.0)


def test_summary_does_not_depend_on_row_order_and_empty_benchmarks_stay_valid_json():
    assert summarize(ROWS) == summarize(list(reversed(ROWS)))
    only_excluded = summarize([(("vcrbench", "", EXCLUDED), 0.0)])
    assert only_excluded["vcrbench"]["score"] is None
    json.dumps(only_excluded, allow_nan=False)


# Protocol figures come in the reference's units: VSI-Bench (lmms-eval) and Video-R1 in fractions,
# MVBench (lmms-eval) in percent; the table shows percent.
FIGURES = {"vsibench": {"figure": 0.352, "units": "fraction"}, "mvbench": {"figure": 50.0, "units": "percent"},
           "mmvu": {"figure": 1.0, "units": "fraction"}}


def test_table_has_the_papers_columns_dashes_for_missing_and_avg_only_when_complete():
    values = table_values(FIGURES, {"vsibench": "VSI", "mvbench": "MVBench", "mmvu": "MMVU"})
    assert values == {"VSI": pytest.approx(35.2), "MVBench": 50.0, "MMVU": 100.0}
    lines = markdown_table("Qwen2.5-VL-7B", values).splitlines()
    assert lines[0] == "| model | VSI | VideoMMMU | MMVU | VCR | MVBench | TempCompass | VideoMME | avg |"
    assert lines[2].split(" | ")[1:] == [f"{values['VSI']:.1f}", "-", "100.0", "-", "50.0", "-", "-", "- |"]
    full = {c: float(i) for i, c in enumerate(["VSI", "VideoMMMU", "MMVU", "VCR", "MVBench", "TempCompass", "VideoMME"])}
    assert markdown_table("m", full).splitlines()[2].endswith("| 6.0 | 3.0 |")


def test_two_sets_with_one_header_keep_both_columns():
    figures = {"val": {"figure": 1.0, "units": "fraction"}, "synthetic": {"figure": 0.0, "units": "fraction"}}
    assert table_values(figures, {"val": "synthetic", "synthetic": "synthetic"}) == {"synthetic": 0.0, "val": 100.0}


def test_results_document_layout():
    summary = summarize(ROWS)
    figures = {b: {**f, "categories": {"x": 1.0}} for b, f in FIGURES.items()}
    doc = results_document(summary, figures, {"VSI": 35.2}, "Qwen/Qwen2.5-VL-7B-Instruct", {"ckpt_path": None})
    assert set(doc) == {"results", "n-samples", "table", "model", "config"}
    assert doc["n-samples"]["mmvu"] == {"scored": 1, "excluded": 1}
    vsi = doc["results"]["vsibench"]
    assert (vsi["figure"], vsi["units"], vsi["categories"], vsi["n"]) == (0.352, "fraction", {"x": 1.0}, 6)
    assert vsi["metrics"]["mra"]["n"] == 3
    assert not math.isnan(json.loads(json.dumps(doc))["results"]["mvbench"]["figure"])


def test_read_predictions_keeps_the_first_line_per_id_and_skips_a_torn_line(tmp_path, caplog):
    main, part = tmp_path / "predictions.jsonl", tmp_path / "predictions.rank1.jsonl"
    main.write_text(json.dumps({"id": "1", "benchmark": "mvbench", "score": 1.0}) + "\n"
                    + json.dumps({"id": "1", "benchmark": "mvbench", "score": 0.0}) + "\n"
                    + json.dumps({"id": "1", "benchmark": "mmvu", "score": 0.5}) + "\n")
    part.write_text(json.dumps({"id": "2", "benchmark": "mvbench", "score": 0.0}) + "\n" + '{"id": "3", "bench')
    done = read_predictions([main, part, tmp_path / "absent.jsonl"])
    assert sorted(done) == [("mmvu", "1"), ("mvbench", "1"), ("mvbench", "2")]
    assert done[("mvbench", "1")]["score"] == 1.0
    assert "predictions.rank1.jsonl:2" in caplog.text


def test_write_json_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json(path, {"model": "a", "note": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"model": "a", "note": "é"}

    def killed(*args):
        raise KeyboardInterrupt  # what a signal during the rename looks like to Python

    monkeypatch.setattr("callbacks.evaluation.report.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"model": "b"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"model": "a", "note": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no partial file left behind
    with pytest.raises(TypeError):  # not JSON: nothing is written at all
        write_json(tmp_path / "results.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_an_answer_the_protocol_leaves_out_is_written_with_a_null_score_and_counted_as_excluded(tmp_path):
    # e.g. lmms-eval's VideoMMMU drops "API Error" lines from its figure: score None, not a wrong 0.0.
    from types import SimpleNamespace

    from callbacks.evaluation import BenchmarkEvaluation, Scored
    from callbacks.evaluation.callback import _Pass

    class Adapter:
        protocol = "lmms_eval"

        def includes(self, sample):
            return True

        def prompt(self, sample):
            return "Q?"

        def category(self, sample):
            return "Math"

        def score(self, sample, output):
            return Scored("API Error" if not output else output, None if not output else 1.0, "accuracy", "5")

    module = SimpleNamespace(generate_answers=lambda batch, prompts: ["5", ""])
    batch = [SimpleNamespace(benchmark="videommmu", record=SimpleNamespace(id=i)) for i in ("a", "b")]
    run = _Pass("test", BenchmarkScores(), part=tmp_path / "predictions.jsonl")
    BenchmarkEvaluation({"videommmu": Adapter()})._score_batch(run, batch, module)
    rows = [json.loads(line) for line in run.part.read_text().splitlines()]
    assert [(r["id"], r["score"]) for r in rows] == [("a", 1.0), ("b", None)]
    block = summarize(run.metric.compute())["videommmu"]
    assert (block["n"], block["excluded"], block["score"]) == (1, 1, 1.0)
