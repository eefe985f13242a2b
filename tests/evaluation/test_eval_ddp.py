"""Two DDP ranks on the CPU (gloo) give the same predictions and totals as one process, and a
resumed two-rank run (one rank with nothing left to score) gives them again.

The run is a script in a subprocess, so Lightning's DDP launcher can start the second rank and
pytest's process stays clean. The module answers from the record alone (right or wrong by a hash
of the id, numbers off by id-dependent amounts), so outputs do not depend on batching or rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2r.data.synthetic import make_synthetic

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import hashlib, json, sys
from pathlib import Path

import lightning as L
import torch

from callbacks.evaluation import BenchmarkEvaluation, Generation
from p2r.data.datamodule import VideoDataModule
from p2r.data.video import FrameSampling
from p2r.evaluation import MMVU, Synthetic, VSIBench

data, out, devices, tag = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


class Scripted(L.LightningModule):
    """Answers that depend on the record only; writes the ids it generated for, per rank."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def test_step(self, batch, batch_idx):
        pass

    def generate_answers(self, batch, prompts, generation=None):
        # Video-R1's decoding for its protocol's benchmarks, the module's own (None) for the synthetic set.
        assert generation == (None if batch[0].benchmark == "synthetic" else Generation(1024, 0.1, 0.001)), generation
        with (out / f"generated.{tag}.rank{self.global_rank}.txt").open("a") as f:
            f.writelines(s.record.id + "\n" for s in batch)
        answers = []
        for s, prompt in zip(batch, prompts):
            assert s.record.problem in prompt
            h = int(hashlib.sha256(s.record.id.encode()).hexdigest(), 16)
            truth = s.record.answer
            if s.record.problem_type == "multiple choice":
                answers.append(f"<answer>{truth if h % 3 else 'D' if truth != 'D' else 'A'}</answer>")
            elif s.record.problem_type in ("numerical", "regression"):
                answers.append(f"<think>counting</think><answer>{float(truth) * (1 + 0.07 * (h % 6)):.3f}</answer>")
            else:
                answers.append(f"<answer>{truth if h % 2 else 'something else'}</answer>")
        return answers


dm = VideoDataModule(
    test_sets={"synthetic": str(data / "shards/test-*.tar"), "vsibench": str(data / "eval_vsibench.json"),
               "mmvu": str(data / "eval_mmvu.json")},
    media_root=str(data), eval_batch_size=3, num_workers=0,
    eval_frames=FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784),
)
evaluation = BenchmarkEvaluation({"synthetic": Synthetic(), "vsibench": VSIBench(), "mmvu": MMVU()}, output_dir=str(out),
                                 protocol="video_r1")
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluation])
trainer.test(Scripted(), datamodule=dm, verbose=False)
'''

COUNTS = ["How many chair(s) are in this room?", "What is the size of this room (in square meters)?",
          "What is the length of the longest dimension (length, width, or height) of the bed, measured in centimeters?"]


def eval_records(videos: list[str]) -> tuple[list[dict], list[dict]]:
    """A VSI-like file (numerical + multiple choice) and an MMVU-like file whose open-ended
    questions sit at even positions, so that with two ranks they all fall on rank 0."""
    vsi, mmvu = [], []
    for i, video in enumerate(videos):
        numeric = i % 2 == 0
        vsi.append({
            "problem_id": f"vsi-{i}", "problem": COUNTS[i % 3] if numeric else "Which of these objects (sofa, tv) is the closest to the bed?",
            "problem_type": "regression" if numeric else "multiple choice", "data_type": "video", "path": video,
            "options": [] if numeric else ["A. sofa", "B. tv", "C. lamp", "D. desk"],
            "solution": f"<answer>{3 + 7 * i}</answer>" if numeric else f"<answer>{'ABCD'[i % 4]}</answer>",
        })
        open_ended = i % 2 == 0 and i < 4
        mmvu.append({
            "problem_id": f"mmvu-{i}", "problem": f"Which law explains clip {i}?", "data_type": "video", "path": video,
            "problem_type": "free-form" if open_ended else "multiple choice",
            "options": [] if open_ended else ["A. Newton", "B. Hooke", "C. Ohm", "D. Snell"],
            "solution": "<answer>inertia</answer>" if open_ended else f"<answer>{'ABCD'[(i + 1) % 4]}</answer>",
        })
    return vsi, mmvu


def run(script: Path, data: Path, out: Path, devices: int, tag: str) -> None:
    # Without a launcher's variables (LOCAL_RANK...), which an in-process run may have left behind.
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK")}
    env = {**inherited, "PYTHONPATH": str(REPO), "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    done = subprocess.run([sys.executable, str(script), str(data), str(out), str(devices), tag], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def predictions(out: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keyed = {(r["benchmark"], r["id"]): r for r in rows}
    assert len(keyed) == len(rows), "an id was written twice"
    return keyed


def generated(out: Path, tag: str) -> list[list[str]]:
    return [p.read_text().split() for p in sorted(out.glob(f"generated.{tag}.rank*.txt"))]


def test_two_ddp_ranks_give_the_totals_of_one_process(tmp_path):
    data = tmp_path / "data"
    split = make_synthetic(data, 2, 2, 9, seed=1, progress=False)["test"]
    vsi, mmvu = eval_records([r.path for r in split.records])
    (data / "eval_vsibench.json").write_text(json.dumps(vsi))
    (data / "eval_mmvu.json").write_text(json.dumps(mmvu))
    script = tmp_path / "ddp_eval.py"
    script.write_text(SCRIPT)

    run(script, data, tmp_path / "one", 1, "first")
    run(script, data, tmp_path / "two", 2, "first")
    one, two = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert len(one) == 9 + 9 + 7  # two open-ended MMVU questions are left out
    assert {k: (r["score"], r["parsed"], r["category"]) for k, r in one.items()} == \
           {k: (r["score"], r["parsed"], r["category"]) for k, r in two.items()}
    first = generated(tmp_path / "two", "first")
    assert len(first) == 2 and all(first) and not set(first[0]) & set(first[1])  # each sample on exactly one rank
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))

    results_one = json.loads((tmp_path / "one/results.json").read_text())
    results_two = json.loads((tmp_path / "two/results.json").read_text())
    assert results_two["results"] == results_one["results"]
    assert results_two["n-samples"] == results_one["n-samples"] == {
        "mmvu": {"scored": 7, "excluded": 2}, "synthetic": {"scored": 9, "excluded": 0}, "vsibench": {"scored": 9, "excluded": 0}}
    vsi_block = results_one["results"]["vsibench"]
    assert set(vsi_block["metrics"]) == {"accuracy", "mra"} and 0 < vsi_block["figure"] < 1
    assert vsi_block["figure"] == (vsi_block["mean_acc"] + vsi_block["mean_mra"]) / 2
    assert results_two["config"]["world_size"] == 2

    # Resume with two ranks: nothing is generated; rank 1 has no row at all, rank 0 holds the old ones.
    run(script, data, tmp_path / "two", 2, "again")
    assert all(not ids for ids in generated(tmp_path / "two", "again"))
    assert json.loads((tmp_path / "two/results.json").read_text())["results"] == results_one["results"]
    assert predictions(tmp_path / "two") == two
