"""How a run starts and ends, through the real CLI in-process (tiny SFT):

- settings that cannot work are refused before the model is built: a flag matched only by its
  prefix (``--trainer.max_step``), shards that do not exist, an output folder that cannot be written;
- ``last.ckpt`` holds the final state when the last step is not a multiple of the checkpoint
  interval and when the non-finite guard stops the run (the ``max_epochs`` end is in
  ``tests/test_resume.py``, SIGTERM too);
- every run writes its checkpoints with the atomic writer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import p2r.algorithms.sft as sft
from p2r.backbones.tiny import TinyQwen25VL
from p2r.checkpoints import AtomicCheckpointIO
from p2r.cli import main

REPO = Path(__file__).resolve().parents[1]
JOB = ["--config", str(REPO / "configs/sft.yaml"), "--config", str(REPO / "configs/tiny.yaml")]


def overlay(tmp: Path, data: Path, steps: int, every: int, ckpt_dir: Path | None = None) -> list[str]:
    path = tmp / "run.yaml"
    path.write_text(f"""
trainer:
  max_steps: {steps}
  max_epochs: -1
  log_every_n_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp}/run
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp}/run, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir or tmp / 'run/checkpoints'}, save_last: true, every_n_train_steps: {every}, save_top_k: -1}}
    - class_path: p2r.checkpoints.FinalCheckpoint
model:
  init_args:
    backbone:
      init_args: {{hidden_size: 32, num_layers: 1, vision_hidden_size: 16, vision_depth: 1}}
data:
  train_shards: {data}/shards/train-*.tar
  val_shards: null
  batch_size: 2
  num_workers: 0
""")
    return ["fit", *JOB, "--config", str(path)]


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts backbone builds (the model is built in configure_model)."""
    built: list[int] = []
    real = TinyQwen25VL.build

    def counting(self, *args, **kwargs):
        built.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TinyQwen25VL, "build", counting)
    return built


def cli(args: list[str]):
    with mock.patch.object(sys, "argv", ["p2r"]):
        return main(args)


@pytest.mark.parametrize("flag", [["--trainer.max_step", "5"], ["--data.batch_siz", "3"], ["--model.init_args.l", "0.1"],
                                  ["--seed_everythin", "1"]])
@pytest.mark.parametrize("sub", ["fit", "test"])
def test_a_flag_is_never_matched_by_its_prefix(sub, flag, capsys, builds):
    with pytest.raises(SystemExit) as refused:
        cli([sub, *JOB, *flag, "--print_config"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert flag[0] in err or "NestedArg(key='l'" in err  # jsonargparse names a subclass's argument by its last part
    with pytest.raises(SystemExit) as printed:  # the full name is taken
        cli([sub, *JOB, {"--trainer.max_step": "--trainer.max_steps", "--data.batch_siz": "--data.batch_size",
                         "--model.init_args.l": "--model.init_args.lr", "--seed_everythin": "--seed_everything"}[flag[0]],
             flag[1], "--print_config"])
    assert printed.value.code in (0, None) and not builds


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_checkpoint_folder_is_refused_before_the_model_is_built(tmp_path, synthetic_root, builds, where):
    if where == "under-a-file":
        (tmp_path / "a-file").write_text("not a folder")
        ckpt_dir = tmp_path / "a-file" / "checkpoints"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ckpt_dir = tmp_path / "locked"
        ckpt_dir.mkdir()
        ckpt_dir.chmod(0o500)
    with pytest.raises(PermissionError, match=f"ModelCheckpoint.dirpath: cannot write to '{ckpt_dir}'"):
        cli(overlay(tmp_path, synthetic_root, steps=3, every=2, ckpt_dir=ckpt_dir))
    assert not builds


@pytest.mark.slow
def test_a_read_only_filesystem_is_refused_even_for_root(tmp_path):
    """The same check on a read-only tmpfs (root writes into any folder, not into a read-only mount)."""
    import shutil
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    check = f"from p2r.checkpoints import check_writable; check_writable({{'ModelCheckpoint.dirpath': '{mount}/ckpts'}})"
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {mount} && exec {sys.executable} -c \"{check}\""],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode != 0
    assert f"PermissionError: ModelCheckpoint.dirpath: cannot write to '{mount}/ckpts' (Read-only file system)" in done.stderr


def test_missing_shards_are_refused_before_the_model_is_built(tmp_path, synthetic_root, builds):
    args = overlay(tmp_path, synthetic_root, steps=3, every=2)
    with pytest.raises(FileNotFoundError, match="data.train_shards: no file matches"):
        cli([*args, "--data.train_shards", str(tmp_path / "train-{000000..000003}.tar")])
    assert not builds


@pytest.mark.slow
def test_last_holds_the_final_step_when_it_is_not_a_multiple_of_the_interval(tmp_path, synthetic_root):
    run = cli(overlay(tmp_path, synthetic_root, steps=5, every=3))
    assert type(run.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    folder = tmp_path / "run/checkpoints"
    assert torch.load(folder / "epoch=0-step=3.ckpt", weights_only=True)["global_step"] == 3
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    state = run.model.state_dict()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in state.items())


@pytest.mark.slow
def test_last_holds_the_final_state_when_non_finite_losses_stop_the_run(tmp_path, synthetic_root, monkeypatch):
    real_loss = sft.answer_loss
    calls = []
    final: dict[str, torch.Tensor] = {}

    def loss_going_bad(*args):  # finite for 4 steps, then NaN: 3 NaN steps stop the run
        calls.append(1)
        loss = real_loss(*args)
        return loss if len(calls) <= 4 else loss * float("nan")

    real_end = sft.SFTModule.on_train_end

    def remember_then_end(self):
        final.update({k: v.clone() for k, v in self.state_dict().items()})
        real_end(self)

    monkeypatch.setattr(sft, "answer_loss", loss_going_bad)
    monkeypatch.setattr(sft.SFTModule, "on_train_end", remember_then_end)
    with pytest.raises(FloatingPointError, match="non-finite loss at 3 optimizer steps in a row"):
        cli(overlay(tmp_path, synthetic_root, steps=20, every=3))
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 7 and len(calls) == 7  # 4 good steps, 3 skipped ones (no update), then the stop
    assert final and all(torch.equal(last["state_dict"][k], v) for k, v in final.items())


@pytest.mark.slow
def test_a_run_ending_before_its_first_periodic_save_leaves_one_last_ckpt_and_resumes_from_it(tmp_path, synthetic_root):
    """FinalCheckpoint saves through the ModelCheckpoint, which then does not save again as last-v1.ckpt."""
    cli(overlay(tmp_path, synthetic_root, steps=3, every=10))
    folder = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    cli([*overlay(tmp_path, synthetic_root, steps=5, every=10), "--ckpt_path", "last"])
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5


def test_an_earlier_runs_last_ckpt_in_the_destination_is_refused_before_the_model_is_built(tmp_path, synthetic_root, builds):
    folder = tmp_path / "run/checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(FileExistsError, match=r"last.ckpt is an earlier run's checkpoint, and this run starts from scratch"):
        cli(overlay(tmp_path, synthetic_root, steps=3, every=2))
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(FileExistsError, match=f"this run resumes from {other} into the same folder"):
        cli([*overlay(tmp_path, synthetic_root, steps=3, every=2), "--ckpt_path", str(other)])
    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt").mkdir()  # what a sharded FSDP2 run leaves
    (folder / "last.ckpt" / "meta.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"is a sharded checkpoint folder .* this run \(SingleDeviceStrategy\) writes single-file"):
        cli([*overlay(tmp_path, synthetic_root, steps=3, every=2), "--ckpt_path", "last"])
    assert not builds


@pytest.mark.slow
def test_every_output_of_a_shipped_config_follows_default_root_dir(tmp_path, synthetic_root):
    """configs/sft.yaml leaves the logger's and the checkpoints' folders to default_root_dir."""
    moved = tmp_path / "moved"
    run = cli(["fit", *JOB, f"--trainer.default_root_dir={moved}", "--trainer.max_steps=2", "--trainer.max_epochs=-1", "--trainer.log_every_n_steps=1",
               "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
               f"--data.train_shards={synthetic_root}/shards/train-*.tar", "--data.val_shards=null", "--data.batch_size=2",
               "--data.num_workers=0", *(f"--model.init_args.backbone.init_args.{k}={v}" for k, v in
                                         {"hidden_size": 32, "num_layers": 1, "vision_hidden_size": 16, "vision_depth": 1}.items())])
    assert run.trainer.checkpoint_callback.dirpath == str(moved / "checkpoints")
    assert (moved / "checkpoints/last.ckpt").is_file() and (moved / "logs/version_0/metrics.csv").is_file()
    assert [logger.save_dir for logger in run.trainer.loggers] == [str(moved)]
