"""Exact resume through the real CLI in subprocesses (tiny SFT, a DataLoader worker, an epoch
boundary inside the run):

- a run killed with SIGKILL mid-run and resumed with ``--ckpt_path last`` continues its step
  count and ends with the same weights and the same final loss, bit for bit, as a run that was
  never interrupted (model, optimizer, schedule and the data stream position all resume);
- SIGTERM (SLURM pre-emption) saves ``last.ckpt`` at the current step before the process exits,
  and resuming from it also ends exactly where the uninterrupted run does;
- ``max_epochs=2`` trains exactly 2 x 9 steps, the cosine schedule ends at lr 0, and resuming
  from the checkpoint taken at the last step of epoch 0 or in the middle of epoch 1 ends bit for
  bit where the uninterrupted run does.

(Killing savers, also across filesystems and on a full disk: ``tests/test_checkpoint_writes.py``.)
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

REPO = Path(__file__).resolve().parents[1]
STEPS = 14  # 9 batches of 2 per epoch on the 18 training clips: the run crosses an epoch boundary


def overlay(tmp: Path, run: Path, data: Path, max_epochs: int = -1, every: int = 2) -> Path:
    path = tmp / f"{run.name}.yaml"
    path.write_text(f"""
trainer:
  max_steps: {STEPS if max_epochs < 0 else -1}
  max_epochs: {max_epochs}
  log_every_n_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: {run}
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {run}, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, save_last: true, every_n_train_steps: {every}, save_top_k: -1}}
    - class_path: p2r.checkpoints.FinalCheckpoint
model:
  init_args:
    backbone:
      init_args: {{hidden_size: 32, num_layers: 2, vision_hidden_size: 32}}
data:
  train_shards: {data}/shards/train-*.tar
  val_shards: null
  batch_size: 2
  num_workers: 1
""")
    return path


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "p2r", "fit", "--config", str(REPO / "configs/sft.yaml"),
            "--config", str(REPO / "configs/tiny.yaml"), "--config", str(config), *extra]


LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK")
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def interrupt(cmd: list[str], wait_for: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` as soon as ``wait_for`` exists, and wait for the process to end."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not wait_for.exists():
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{wait_for} never appeared"
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)  # the main process and its DataLoader worker, no chance to clean up
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def final_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def logged(run_dir: Path, version: int) -> list[dict[str, str]]:
    rows = csv.DictReader(open(run_dir / f"logs/version_{version}/metrics.csv"))
    return [r for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = tmp / "straight"
    run(command(overlay(tmp, run_dir, synthetic_root)))
    return tmp, run_dir


def assert_same_end(run_dir: Path, reference: Path, steps: int = STEPS) -> None:
    step, state = final_state(run_dir)
    ref_step, ref_state = final_state(reference)
    assert step == ref_step == steps
    assert state.keys() == ref_state.keys()
    differ = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    last, ref_last = logged(run_dir, 1)[-1], logged(reference, 0)[-1]
    assert last["step"] == ref_last["step"] and last["train/loss"] == ref_last["train/loss"]


def test_sigkill_then_resume_from_last_ends_like_an_uninterrupted_run(uninterrupted, synthetic_root):
    tmp, reference = uninterrupted
    run_dir = tmp / "killed"
    config = overlay(tmp, run_dir, synthetic_root)
    killed = interrupt(command(config), run_dir / "checkpoints/epoch=0-step=4.ckpt", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    saved_step, _ = final_state(run_dir)
    assert 2 <= saved_step < STEPS  # last.ckpt may still be the step-2 one: the kill can precede its update
    run(command(config, "--ckpt_path", "last"))
    resumed = logged(run_dir, 1)
    assert int(resumed[0]["step"]) >= saved_step  # the step count continues, it does not restart at 0
    assert_same_end(run_dir, reference)


def test_sigterm_saves_last_and_the_resumed_run_ends_the_same(uninterrupted, synthetic_root):
    tmp, reference = uninterrupted
    run_dir = tmp / "preempted"
    config = overlay(tmp, run_dir, synthetic_root)
    stopped = interrupt(command(config), run_dir / "checkpoints/epoch=0-step=4.ckpt", signal.SIGTERM)
    assert "SIGTERM: saved" in stopped.stdout + stopped.stderr
    saved_step, _ = final_state(run_dir)
    assert 4 <= saved_step < STEPS
    run(command(config, "--ckpt_path", "last"))
    assert_same_end(run_dir, reference)


EPOCH = 9  # batches per epoch: 18 clips in batches of 2


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("epochs")
    run_dir = tmp / "straight"
    run(command(overlay(tmp, run_dir, synthetic_root, max_epochs=2, every=3)))
    return tmp, run_dir


def test_max_epochs_trains_whole_epochs_and_the_schedule_ends_at_zero(two_epochs):
    _, run_dir = two_epochs
    rows = logged(run_dir, 0)
    assert [int(r["step"]) for r in rows] == list(range(2 * EPOCH))  # no phantom one-batch epoch
    assert [int(r["epoch"]) for r in rows] == [0] * EPOCH + [1] * EPOCH
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * EPOCH
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0  # cosine over exactly the steps taken
    lr = [float(r["train/lr"]) for r in csv.DictReader(open(run_dir / "logs/version_0/metrics.csv")) if r.get("train/lr")]
    assert lr[-1] == 0.0 and lr[0] > lr[EPOCH] > 0


@pytest.mark.parametrize("resume_step", [EPOCH, EPOCH + 3])  # the last step of epoch 0; the middle of epoch 1
def test_resume_at_and_after_an_epoch_boundary_ends_like_the_uninterrupted_run(two_epochs, synthetic_root, resume_step):
    tmp, reference = two_epochs
    run_dir = tmp / f"from-{resume_step}"
    config = overlay(tmp, run_dir, synthetic_root, max_epochs=2, every=3)
    saved = reference / f"checkpoints/epoch={(resume_step - 1) // EPOCH}-step={resume_step}.ckpt"
    done = run(command(config, "--ckpt_path", str(saved)))
    steps = [int(r["step"]) for r in logged(run_dir, 0)]
    assert steps == list(range(resume_step, 2 * EPOCH)), done.stderr[-2000:]
    step, state = final_state(run_dir)
    ref_step, ref_state = final_state(reference)
    assert step == ref_step == 2 * EPOCH
    differ = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
