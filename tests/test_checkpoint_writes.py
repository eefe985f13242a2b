"""No save leaves a broken ``last.ckpt``: savers killed at random moments, with the checkpoint
folder on another filesystem than TMPDIR (the usual cluster layout: local /tmp, shared checkpoint
storage), and a full disk.

The other filesystem is a tmpfs mounted in a private mount namespace (``unshare -rm``, no root
needed where unprivileged user namespaces are allowed) or, where they are not, ``/dev/shm`` when
it is another filesystem than the test's TMPDIR; the test says which it skipped. The full disk is
a 36 MB tmpfs in the same kind of namespace, and, everywhere, an ENOSPC raised by the write itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import p2r.checkpoints as checkpoints
from p2r.checkpoints import AtomicCheckpointIO, atomic_write, install_atomic_checkpoint_io
from p2r.strategies import FSDP2Strategy

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# What a run does for every checkpoint, as fast as it can: 16 MB files whose every value is the step.
SAVER = r"""
import sys, torch
from p2r.checkpoints import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), int(sys.argv[2])
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((4_000_000,), float(step))}}, sys.argv[1])
    if step == int(sys.argv[2]) + 1:
        print("saving", flush=True)  # started: the killer may strike from now on
"""

# Kills savers at staggered moments and checks last.ckpt after each kill; prints a JSON report.
KILLER = r"""
import json, os, subprocess, sys, tempfile, time, torch
folder, rounds = sys.argv[1], int(sys.argv[2])
target = os.path.join(folder, "last.ckpt")
report = {"same_fs_as_tmpdir": os.stat(folder).st_dev == os.stat(tempfile.gettempdir()).st_dev, "rounds": []}
for i in range(rounds):
    proc = subprocess.Popen([sys.executable, "-c", sys.argv[3], target, str(1000 * i)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saving\n", "the saver died"
    time.sleep(0.05 + 0.11 * i)  # somewhere inside a later save of 16 MB
    proc.kill()
    proc.wait()
    try:
        ckpt = torch.load(target, weights_only=True)
        ok = torch.equal(ckpt["state_dict"]["w"], torch.full((4_000_000,), float(ckpt["global_step"])))
        report["rounds"].append({"ok": bool(ok), "saves": ckpt["global_step"] - 1000 * i})
    except Exception as err:
        report["rounds"].append({"ok": False, "error": f"{type(err).__name__}: {err}", "size": os.path.getsize(target)})
report["leftovers"] = sorted(n for n in os.listdir(folder) if n != "last.ckpt")
print(json.dumps(report))
"""

# Fills a small filesystem: one 16 MB save fits, a 24 MB one does not (with the old file beside it).
FULL_DISK = r"""
import json, os, sys, torch
from p2r.checkpoints import AtomicCheckpointIO
target = os.path.join(sys.argv[1], "last.ckpt")
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.full((4_000_000,), 1.0)}}, target)
report = {}
try:
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.full((6_000_000,), 2.0)}}, target)
    report["error"] = None
except OSError as err:
    report["error"], report["errno"] = str(err), err.errno
ckpt = torch.load(target, weights_only=True)
report["step"] = ckpt["global_step"]
report["intact"] = bool(torch.equal(ckpt["state_dict"]["w"], torch.full((4_000_000,), 1.0)))
report["files"] = sorted(os.listdir(sys.argv[1]))
print(json.dumps(report))
"""


def can_mount_tmpfs(tmp_path: Path) -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in its own mount namespace."""
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe").mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'probe'}"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def in_tmpfs_namespace(tmp_path: Path, size: str, script: str, *args: str) -> dict:
    """Run ``script`` with a fresh tmpfs of ``size`` as its folder, in a private mount namespace."""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    command = f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && exec "$@"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command, "sh", str(mount), sys.executable, "-c", script, str(mount), *args],
                          env={**ENV, "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_never_broken(report: dict) -> None:
    assert not report["same_fs_as_tmpdir"]
    assert all(r["ok"] for r in report["rounds"]), report["rounds"]
    assert max(r["saves"] for r in report["rounds"]) > 1  # the saver really overwrote the file while it was killed
    assert all(name.endswith(".partial") for name in report["leftovers"])  # only what a killed save was writing


@pytest.mark.slow
def test_killed_savers_never_break_last_when_the_folder_is_on_another_filesystem_than_tmpdir(tmp_path):
    if can_mount_tmpfs(tmp_path):
        assert_never_broken(in_tmpfs_namespace(tmp_path, "256m", KILLER, "4", SAVER))
        return
    shm = Path("/dev/shm")  # the fallback: often a tmpfs of its own
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no user namespaces for a tmpfs, and /dev/shm is missing or on the same filesystem as TMPDIR")
    folder = Path(shm / f"p2r-test-{os.getpid()}")
    folder.mkdir()
    try:
        done = subprocess.run([sys.executable, "-c", KILLER, str(folder), "4", SAVER], env={**ENV, "TMPDIR": str(tmp_path)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_never_broken(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    report = in_tmpfs_namespace(tmp_path, "36m", FULL_DISK)
    assert report["errno"] == errno.ENOSPC
    assert "disk is full" in report["error"] and "the previous file is unchanged" in report["error"]
    assert report["step"] == 1 and report["intact"]
    assert report["files"] == ["last.ckpt"]  # the partial file was removed


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_failing_write_or_fsync_keeps_the_previous_file(tmp_path, monkeypatch, code, where):
    """The same without a small filesystem: the failure is raised by the write (or the fsync) itself."""
    target = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.arange(1000)}, target)

    def failing_write(f):
        f.write(b"x" * 5000)  # part of the file is written, then the disk is full
        raise OSError(code, os.strerror(code))

    if where == "fsync":
        monkeypatch.setattr(checkpoints.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        write = lambda f: torch.save({"global_step": 2}, f)  # noqa: E731
    else:
        write = failing_write
    with pytest.raises(OSError, match=f"could not write checkpoint {target}.*the previous file is unchanged") as raised:
        atomic_write(target, write)
    assert raised.value.errno == code
    assert ("disk is full" in str(raised.value)) == (code != errno.EIO)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert os.listdir(target.parent) == ["last.ckpt"]


def test_atomic_save_writes_beside_the_target_with_ordinary_permissions(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last.ckpt"
    stale = target.with_name(".last.ckpt.12345.partial")  # what a saver killed mid-write left behind
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    created = []
    real_open = os.open
    monkeypatch.setattr(checkpoints.os, "open", lambda path, *a: created.append(Path(path)) or real_open(path, *a))
    old_umask = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 7}, target)
    finally:
        os.umask(old_umask)
    assert created[0].parent == target.parent and created[0].name.endswith(".partial")  # beside it, not in TMPDIR
    assert torch.load(target, weights_only=True)["global_step"] == 7
    assert (target.stat().st_mode & 0o777) == 0o644
    assert os.listdir(target.parent) == ["last.ckpt"]


def test_the_atomic_writer_replaces_only_lightnings_default():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    install_atomic_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    class Mine(TorchCheckpointIO):
        pass

    custom = L.Trainer(accelerator="cpu", plugins=[Mine()], logger=False, enable_progress_bar=False)
    install_atomic_checkpoint_io(custom)
    assert type(custom.strategy.checkpoint_io) is Mine


class FakeRanks:
    """What FSDP2Strategy.save_checkpoint needs of a process group, for one process."""

    def __init__(self, monkeypatch, fail: bool = False) -> None:
        from lightning.pytorch.strategies import ModelParallelStrategy

        def write(strategy, checkpoint, path, storage_options=None):
            path.mkdir(parents=True)
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            (path / "meta.pt").write_text(json.dumps(checkpoint))

        monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write)
        self.strategy = FSDP2Strategy()
        monkeypatch.setattr(self.strategy, "broadcast", lambda obj, src=0: obj)
        monkeypatch.setattr(self.strategy, "barrier", lambda name=None: None)


def step_of(folder: Path) -> int:
    return json.loads((folder / "meta.pt").read_text())["step"]


def test_fsdp2_folders_are_swapped_in_and_a_lone_previous_is_never_deleted(tmp_path, monkeypatch):
    last, previous = tmp_path / "last.ckpt", tmp_path / "last-previous.ckpt"
    FakeRanks(monkeypatch).strategy.save_checkpoint({"step": 1}, last)
    FakeRanks(monkeypatch).strategy.save_checkpoint({"step": 2}, last)
    assert step_of(last) == 2 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    last.rename(previous)  # a crash between the two renames of a save: only the previous folder is complete
    with pytest.raises(OSError, match="No space left"):
        FakeRanks(monkeypatch, fail=True).strategy.save_checkpoint({"step": 3}, last)
    assert step_of(last) == 2  # put back in place before the failed write, never deleted
    FakeRanks(monkeypatch).strategy.save_checkpoint({"step": 4}, last)
    assert step_of(last) == 4 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
