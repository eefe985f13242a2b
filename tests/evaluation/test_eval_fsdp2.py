"""Evaluation on an FSDP2-sharded model over two CPU ranks (gloo): ``p2r test`` gives the same
predictions and results as one rank, though the ranks run different numbers of batches (7 test
clips, one per batch: 4 on rank 0, 3 on rank 1), and fit's validation loop and the periodic
benchmark evaluation run on the sharded policy between training steps.

Runs go through the CLI in subprocesses (Lightning's launcher starts the second rank). One clip per
batch keeps each answer's computation the same whatever the rank layout (no padding to another
clip's length), so greedy answers must agree token for token. Before p2r held the sharded model
whole for evaluation passes (p2r.strategies.held_whole), these runs were refused up front: a rank
with fewer batches stops calling the all-gathers that the other rank's next forward waits for.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2r.data.synthetic import make_synthetic
from test_strategies import child_env  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.slow  # several ranks in subprocesses

REPO = Path(__file__).resolve().parents[2]
SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vision_hidden_size=32)
CONFIGS = ["configs/tiny.yaml", "configs/strategy/fsdp2.yaml"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp2_eval")
    make_synthetic(root, 8, 7, 7, seed=3, progress=False)
    return root


def p2r(subcommand: str, job: str, overlay: str, cwd: Path, devices: int) -> None:
    (cwd / "overlay.yaml").write_text(overlay)
    configs = [a for c in (job, *CONFIGS) for a in ("--config", str(REPO / c))]
    cmd = [sys.executable, "-m", "p2r", subcommand, *configs, "--config", str(cwd / "overlay.yaml"),
           f"--trainer.devices={devices}"]
    done = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]


def backbone(**extra) -> str:
    return json.dumps({**SIZES, **extra})


def test_sharded_test_on_two_ranks_equals_one_rank(data, tmp_path):
    overlay = f"""
trainer:
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: callbacks.evaluation.BenchmarkEvaluation
      init_args: {{benchmarks: {{synthetic: {{class_path: p2r.evaluation.Synthetic}}}}, progress_bar: false}}
model:
  init_args: {{eval_max_new_tokens: 12, backbone: {{init_args: {backbone()}}}}}
data: {{test_sets: {{synthetic: {data}/shards/test-*.tar}}, eval_batch_size: 1, num_workers: 0}}
"""
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"ranks{devices}"
        out.mkdir()
        p2r("test", "configs/eval.yaml", overlay, out, devices)
        out = out / "runs/eval"  # configs/eval.yaml's default_root_dir, under the run's folder
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        runs[devices] = ({r["id"]: r for r in rows}, json.loads((out / "results.json").read_text()))
        assert len(rows) == len(runs[devices][0]) == 7  # every clip scored exactly once
    (one, results_one), (two, results_two) = runs[1], runs[2]
    assert {k: (r["output"], r["score"]) for k, r in one.items()} == {k: (r["output"], r["score"]) for k, r in two.items()}
    assert any(r["output"] for r in one.values())  # the model answered something (not an all-empty agreement)
    assert results_two["results"] == results_one["results"]
    assert results_two["config"]["world_size"] == 2


def test_fit_validates_and_watches_a_benchmark_on_the_sharded_policy(data, tmp_path):
    # SFT for 2 steps on 2 ranks: Lightning's validation loop after step 1 (7 val clips: 4 and 3 batches)
    # and the callback's periodic evaluation of 5 clips (3 on rank 0, 2 on rank 1) after each step.
    overlay = f"""
trainer:
  max_steps: 2
  val_check_interval: 1
  check_val_every_n_epoch: null
  limit_val_batches: null
  num_sanity_val_steps: 0
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
        max_samples: 5
model:
  init_args: {{eval_max_new_tokens: 8, backbone: {{init_args: {backbone()}}}}}
data:
  train_shards: {data}/shards/train-*.tar
  val_shards: {data}/shards/val-*.tar
  batch_size: 2
  eval_batch_size: 1
  num_workers: 0
"""
    p2r("fit", "configs/sft.yaml", overlay, tmp_path, 2)
    with (tmp_path / "logs/version_0/metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    periodic = [r for r in rows if r.get("eval/val/accuracy")]
    validation = [r for r in rows if r.get("val/val/accuracy")]
    assert len(periodic) == 2 and len(validation) == 2, rows
    assert all(0.0 <= float(r["eval/val/accuracy"]) <= 1.0 for r in periodic)
    assert [r for r in rows if r.get("train/loss")], "training went on after the evaluation passes"


def test_pagrpo_watches_a_benchmark_on_two_sharded_ranks(data, tmp_path):
    # configs/pagrpo.yaml's way of watching a benchmark (a named val set from a records file), on 2
    # FSDP2 ranks between PA-GRPO steps; every step here instead of every 100: 5 questions, 3 + 2.
    sizes = [f"--model.init_args.backbone.init_args.{k}={v}" for k, v in SIZES.items()]
    cmd = [sys.executable, "-m", "p2r", "fit", *[a for c in ("configs/pagrpo.yaml", "configs/tiny.yaml", "configs/tiny_rl.yaml",
                                                        "configs/strategy/fsdp2.yaml") for a in ("--config", str(REPO / c))],
           "--trainer.devices=2", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", *sizes,
           "--model.init_args.backbone.init_args.weights_from=null", "--model.init_args.rollout.group_size=2",
           "--model.init_args.rollout.max_completion_length=8", "--model.init_args.micro_batch_size=4",
           "--model.init_args.eval_max_new_tokens=6", f"--data.train_shards={data}/shards/train-*.tar", "--data.val_shards=null",
           "--data.val_sets=" + json.dumps({"bench": str(data / "val.json")}), f"--data.media_root={data}",
           "--data.batch_size=1", "--data.eval_batch_size=1", "--data.num_workers=0",
           "--trainer.callbacks+=callbacks.evaluation.BenchmarkEvaluation",
           "--trainer.callbacks.benchmarks=" + json.dumps({"bench": {"class_path": "p2r.evaluation.Synthetic"}}),
           "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.max_samples=5",
           "--trainer.callbacks+=varied_rewards.TokenSumReward"]
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    with next((tmp_path / "runs/pagrpo/logs").glob("version_*/metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    watched = [r for r in rows if r.get("eval/bench/accuracy")]
    assert len(watched) == 2 and all(0.0 <= float(r["eval/bench/accuracy"]) <= 1.0 for r in watched), rows
    assert len([r for r in rows if r.get("train/loss")]) == 2
