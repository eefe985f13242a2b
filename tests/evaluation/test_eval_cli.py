"""``p2r test`` end to end: the tiny model on the synthetic benchmark through the real CLI, the
files it writes, resuming, the run-identity guard, periodic evaluation during fit, and the configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from callbacks.evaluation import BenchmarkEvaluation
from callbacks.rewards.accuracy import reasoning_accuracy
from p2r.algorithms.base import VideoLVLMModule
from p2r.cli import main
from p2r.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]
EVAL = ["--config", str(REPO / "configs/eval.yaml"), "--config", str(REPO / "configs/tiny.yaml")]
# The tiny backbone shrunk further: the same code path, a few times faster on one core.
SMALLER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vision_hidden_size": 16, "vision_depth": 1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, 8, 4, 8, seed=0, progress=False)
    return root


@pytest.fixture
def generated(monkeypatch):
    """Every sample id the module generates an answer for, in order."""
    ids: list[str] = []
    original = VideoLVLMModule.generate_answers

    def counting(self, batch, prompts=None):
        ids.extend(s.record.id for s in batch)
        return original(self, batch, prompts)

    monkeypatch.setattr(VideoLVLMModule, "generate_answers", counting)
    return ids


def run_test(synthetic: Path, out: Path):
    return main(["test", *EVAL, f"--data.test_sets={json.dumps({'synthetic': str(synthetic / 'shards/test-*.tar')})}",
                 f"--data.media_root={synthetic}", f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                 "--data.num_workers=0", "--model.init_args.eval_max_new_tokens=24",
                 *(f"--model.init_args.backbone.init_args.{k}={v}" for k, v in SMALLER.items())])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_model_on_the_synthetic_benchmark_writes_predictions_and_results_and_resumes(synthetic, tmp_path, generated, capsys):
    records = {r["id"]: r for r in json.loads((synthetic / "test.json").read_text())}
    cli = run_test(synthetic, tmp_path)

    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(records) and sorted(generated) == sorted(records)
    for row in rows:
        record = records[row["id"]]
        assert set(row) == {"id", "benchmark", "protocol", "category", "metric", "prompt", "output", "parsed", "truth",
                            "score", "details", "record"}
        assert (row["benchmark"], row["category"], row["metric"]) == ("synthetic", record["problem_type"], "accuracy")
        assert row["protocol"] == "p2r" and row["record"]["solution"] == record["solution"]  # rescorable as it came in
        assert row["prompt"].startswith(record["problem"]) and "<observation>" in row["prompt"]
        assert row["score"] == reasoning_accuracy(row["output"], record["solution"], record["problem_type"], record["options"])
    results = json.loads((tmp_path / "results.json").read_text())
    block = results["results"]["synthetic"]
    assert block["n"] == 8 and block["excluded"] == 0 and block["units"] == "fraction"
    assert block["figure"] == pytest.approx(math.fsum(r["score"] for r in rows) / 8)
    types = {r["problem_type"] for r in records.values()}
    assert block["categories"] == pytest.approx(
        {t: math.fsum(r["score"] for r in rows if r["category"] == t) / sum(r["category"] == t for r in rows) for t in types})
    assert results["model"] == "TinyQwen25VL" and results["config"]["benchmarks"]["synthetic"]["class"] == "p2r.evaluation.benchmarks.Synthetic"
    assert results["config"]["module"]["eval_max_new_tokens"] == 24
    assert float(cli.trainer.callback_metrics["test/synthetic/accuracy"]) == pytest.approx(block["figure"])
    evaluation = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BenchmarkEvaluation))
    assert json.loads(json.dumps(evaluation.results)) == results
    printed = capsys.readouterr()
    table = printed.out
    assert f"synthetic={block['figure']:.3f}" in printed.err  # the bar's running score, final value
    assert "| model | VSI | VideoMMMU | MMVU | VCR | MVBench | TempCompass | VideoMME | synthetic | avg |" in table
    assert f"| TinyQwen25VL | - | - | - | - | - | - | - | {100 * block['figure']:.1f} | - |" in table

    # Resume: one finished answer is marked (it must survive), three are dropped (they must be redone).
    rows[0]["output"], rows[0]["score"] = "SENTINEL", 1.0
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    generated.clear()
    run_test(synthetic, tmp_path)
    assert sorted(generated) == sorted(r["id"] for r in rows[5:])
    again = read_jsonl(tmp_path / "predictions.jsonl")
    assert sorted(r["id"] for r in again) == sorted(records) and again[0]["output"] == "SENTINEL"
    rerun = json.loads((tmp_path / "results.json").read_text())["results"]["synthetic"]
    assert rerun["n"] == 8 and rerun["figure"] == pytest.approx(math.fsum(r["score"] for r in again) / 8)

    # Predictions made under another protocol are never counted as this run's.
    again[0]["protocol"] = "lmms_eval"
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in again))
    with pytest.raises(RuntimeError, match="tools/rescore.py"):
        run_test(synthetic, tmp_path)
    again[0]["protocol"] = "p2r"
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in again))

    # A different model never resumes these predictions.
    (tmp_path / "run.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-VL-7B-Instruct", "ckpt_path": None}))
    with pytest.raises(RuntimeError, match="another output_dir"):
        run_test(synthetic, tmp_path)


@pytest.mark.slow
def test_periodic_evaluation_during_fit_logs_eval_metrics(synthetic, tmp_path, generated):
    overlay = tmp_path / "periodic.yaml"
    overlay.write_text(f"""
trainer:
  max_steps: 2
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp_path}, name: logs, version: 0}}
  callbacks:
    - class_path: callbacks.evaluation.BenchmarkEvaluation
      init_args:
        benchmarks: {{val: {{class_path: p2r.evaluation.Synthetic}}}}
        every_n_train_steps: 1
        max_samples: 3
model:
  init_args:
    eval_max_new_tokens: 8
    backbone: {{init_args: {json.dumps(SMALLER)}}}
data:
  train_shards: {synthetic}/shards/train-*.tar
  val_shards: {synthetic}/shards/val-*.tar
  batch_size: 2
  eval_batch_size: 2
  num_workers: 0
""")
    main(["fit", "--config", str(REPO / "configs/sft.yaml"), "--config", str(REPO / "configs/tiny.yaml"), "--config", str(overlay)])
    val_ids = {r["id"] for r in json.loads((synthetic / "val.json").read_text())}
    assert len(generated) == 6 and set(generated) <= val_ids  # 3 samples at each of steps 1 and 2
    with (tmp_path / "logs/version_0/metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("eval/val/accuracy")]
    assert [int(row["step"]) for row in logged] == [0, 1]  # Lightning logs step k's metrics at step index k-1
    assert all(0.0 <= float(row["eval/val/accuracy"]) <= 1.0 for row in logged)
    assert not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.slow
def test_validate_is_scored_by_the_callback_instead_of_the_modules_own_check(synthetic, tmp_path, generated):
    overlay = tmp_path / "validate.yaml"
    overlay.write_text(f"""
trainer:
  limit_val_batches: 1
  enable_progress_bar: false
  logger: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: callbacks.evaluation.BenchmarkEvaluation
      init_args: {{benchmarks: {{val: {{class_path: p2r.evaluation.Synthetic}}}}}}
model:
  init_args: {{eval_max_new_tokens: 8, backbone: {{init_args: {json.dumps(SMALLER)}}}}}
data: {{val_shards: {synthetic}/shards/val-*.tar, eval_batch_size: 2, num_workers: 0}}
""")
    cli = main(["validate", "--config", str(REPO / "configs/sft.yaml"), "--config", str(REPO / "configs/tiny.yaml"),
                "--config", str(overlay)])
    metrics = cli.trainer.callback_metrics
    assert len(generated) == 2 and 0.0 <= float(metrics["val/val/accuracy"]) <= 1.0
    assert "val/accuracy" not in metrics and "val/format" not in metrics  # the module's own check stood down
    assert not (tmp_path / "predictions.jsonl").exists()


def test_eval_config_parses_with_the_seven_benchmarks(capsys):
    with pytest.raises(SystemExit) as done:
        main(["test", "--config", str(REPO / "configs/eval.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for name in ("vsibench", "videommmu", "mmvu", "vcrbench", "mvbench", "tempcompass", "videomme"):
        assert f"data/eval/eval_{name}.json" in printed and f"{name}:" in printed
    assert "mra_convention: video_r1" in printed and "Qwen/Qwen2.5-VL-7B-Instruct" in printed
