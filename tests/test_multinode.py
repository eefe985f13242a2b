"""Multi-node as docs/scale.md launches it: its torchrun line for two nodes on one machine
(``--nnodes 2 --nproc-per-node 1``, each node its own torchrun, a static rendezvous on a local port,
gloo, the tiny backbone, FSDP2 SFT) trains, writes a distributed checkpoint folder and, run again,
resumes from it. The command is read from docs/scale.md's "Multi-node" section, so the documented
line is the one that runs; the test only appends sizes (steps, batch, model width, no validation) and
picks a free port. The page's paper-scale torchrun line must be the same line but for its sizes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2r.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "scale.md"  # where the multi-node launch lines are documented
# Variables a launcher sets; the test's own environment must not leak them into the nodes.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "GROUP_RANK",
              "LOCAL_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS")
# Where the two documented lines may differ: the sizes (tiny.yaml is the small model's overlay).
SIZE_FLAGS = {"--nproc-per-node", "--master-addr", "--trainer.devices"}
SIZE_CONFIG = ["--config", "configs/tiny.yaml"]
# The test's sizes, appended to the documented line (later flags win).
TEST_SIZES = ["--trainer.limit_val_batches=0", "--data.batch_size=2", "--data.num_workers=0",
              *[f"--model.init_args.backbone.init_args.{k}={v}" for k, v in
                (("hidden_size", 32), ("num_layers", 2), ("vision_hidden_size", 32))]]
VIEW_WARNING = "returned a view tensor"


def documented_torchrun_lines() -> dict[str, list[str]]:
    """The torchrun commands of docs/scale.md's Multi-node section as argument lists: "localhost" (the
    line whose --master-addr is 127.0.0.1) and "paper" (the other one)."""
    text = DOC.read_text()
    start = text.index("## Multi-node")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    lines = {}
    for match in re.finditer(r"^ {4}(torchrun .*?)(?<!\\)$", section, flags=re.M | re.S):
        args = shlex.split(match.group(1).replace("\\\n", " "))
        key = "localhost" if args[args.index("--master-addr") + 1] == "127.0.0.1" else "paper"
        assert key not in lines, f"two {key} torchrun lines in docs/scale.md's Multi-node section"
        lines[key] = args
    assert set(lines) == {"localhost", "paper"}, (
        "docs/scale.md's Multi-node section needs two torchrun lines: the paper-scale one and the same one for "
        f"two nodes on localhost (--master-addr 127.0.0.1); found {sorted(lines)}")
    return lines


def test_the_documented_localhost_line_is_the_paper_line_with_other_sizes():
    lines = documented_torchrun_lines()
    local, paper = lines["localhost"], lines["paper"]
    assert local[:3] == ["torchrun", "--nnodes", "2"] and local[local.index("--nproc-per-node") + 1] == "1"
    for i in range(len(local) - 1):
        if local[i : i + 2] == SIZE_CONFIG:
            local = local[:i] + local[i + 2 :]
            break
    else:
        raise AssertionError(f"the localhost line has no {' '.join(SIZE_CONFIG)}")
    assert len(local) == len(paper), (local, paper)
    differ = {paper[i - 1] for i, (a, b) in enumerate(zip(local, paper)) if a != b}
    assert differ <= SIZE_FLAGS, f"the two documented torchrun lines differ in more than sizes: {sorted(differ - SIZE_FLAGS)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def launch_two_nodes(args: list[str], cwd: Path, timeout: float = 300) -> list[str]:
    """Run ``args`` (a torchrun line with ``$NODE_RANK``) as node 0 and node 1 at once; their outputs."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        cmd = [a.replace("$NODE_RANK", str(rank)) for a in args]
        cmd[cmd.index("--master-port") + 1] = port
        log = open(cwd / f"node{rank}.log", "w+")
        nodes.append((subprocess.Popen(launcher + cmd[1:], cwd=cwd, env=node_env(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    try:
        codes = [proc.wait(timeout=timeout) for proc, _ in nodes]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's torchrun and its worker
                proc.wait()
    outputs = []
    for proc, log in nodes:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
    return outputs


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_resume_with_the_readme_torchrun_line(tmp_path):
    args = documented_torchrun_lines()["localhost"]
    make_synthetic(tmp_path / "data/synthetic", 8, 1, 1, seed=0, samples_per_shard=4, progress=False)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the documented paths are relative to the repository
    last = tmp_path / "runs/sft/checkpoints/last.ckpt"  # configs/sft.yaml's checkpoint folder

    first = launch_two_nodes([*args, *TEST_SIZES, "--trainer.max_steps=2"], tmp_path)
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # a distributed checkpoint: one shard per node
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2

    second = launch_two_nodes([*args, *TEST_SIZES, "--trainer.max_steps=3"], tmp_path)
    assert "Restoring states from the checkpoint path" in second[0], second[0][-3000:]
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == 3
    assert len(meta["VideoDataModule"]["train_position"]["raw"]) == 2  # both nodes' data positions
    for output in first + second:
        assert VIEW_WARNING not in output, output[-3000:]
