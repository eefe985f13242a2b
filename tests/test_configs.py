"""Every YAML file under configs/ parses through the real CLI: job configs alone, overlays stacked
on every job config. New files are picked up by the glob, no list to update."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from p2r.cli import follow_root_dir, main

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
ALL = sorted(CONFIG_DIR.rglob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def is_job(path: Path) -> bool:
    """A job config names its LightningModule; an overlay only changes some values of a job."""
    return bool((load(path).get("model") or {}).get("class_path"))


JOBS = [p for p in ALL if is_job(p)]
OVERLAYS = [p for p in ALL if not is_job(p)]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next((i for i, l in enumerate(lines) if not l.startswith("#")), len(lines))])


def subcommand(job: Path) -> str:
    """The subcommand of the job's own launch line ('python -m p2r SUB --config configs/NAME')."""
    found = re.search(rf"python -m p2r (fit|validate|test|predict) [^\n]*--config {re.escape(rel(job))}", header(job))
    assert found, f"{rel(job)} must open with its launch command (python -m p2r <subcommand> --config {rel(job)})"
    return found.group(1)


def print_config(args: list[str], capsys) -> dict[str, Any]:
    with mock.patch.object(sys, "argv", ["p2r"]), pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def leaves(tree: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every scalar in a nested mapping (lists are replaced wholesale, so skipped)."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in leaves(value, (*prefix, key))]
    return [] if isinstance(tree, list) else [(prefix, tree)]


def lookup(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def test_the_glob_finds_the_known_configs():
    names = {rel(p) for p in ALL}
    assert {"configs/sft.yaml", "configs/sft_video_r1.yaml", "configs/tgrpo.yaml", "configs/tiny.yaml"} <= names
    assert {"configs/sft.yaml", "configs/sft_video_r1.yaml"} <= {rel(p) for p in JOBS} and "configs/tiny.yaml" in {rel(p) for p in OVERLAYS}


@pytest.mark.parametrize("job", JOBS, ids=rel)
def test_job_config_parses_alone(job, capsys):
    printed = print_config([subcommand(job), "--config", str(job)], capsys)
    raw = load(job)
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    for path, value in leaves(raw):
        assert lookup(printed, path) == value, (rel(job), path)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_overlay_opens_with_how_to_stack_it(overlay):
    assert f"--config {rel(overlay)}" in header(overlay), f"{rel(overlay)} must open with a launch command using it"


def launch_stacks(overlay: Path) -> list[tuple[str, list[Path]]]:
    """(subcommand, config files in order) of every launch line in the overlay's header that uses it."""
    stacks = []
    for line in header(overlay).splitlines():
        found = re.search(r"python -m p2r (fit|validate|test|predict) (.*)", line)
        if found and f"--config {rel(overlay)}" in found.group(2):
            stacks.append((found.group(1), [REPO / c for c in re.findall(r"--config (\S+)", found.group(2))]))
    return stacks


STACKS = [(sub, files) for o in OVERLAYS for sub, files in launch_stacks(o)]


def test_every_overlay_documents_the_jobs_it_stacks_on():
    assert all(launch_stacks(o) for o in OVERLAYS)
    assert {rel(f[0]) for _, f in STACKS if f[-1].name == "tiny.yaml"} >= {"configs/sft.yaml", "configs/pagrpo.yaml"}


@pytest.mark.parametrize(("sub", "files"), STACKS, ids=lambda v: "+".join(p.stem for p in v) if isinstance(v, list) else v)
def test_overlay_stacks_as_its_launch_lines_say(sub, files, capsys):
    """Each launch line in an overlay's header parses, and every value the stacked files set arrives."""
    args = [sub]
    for f in files:
        args += ["--config", str(f)]
    printed = print_config(args, capsys)
    job = next(f for f in files if is_job(f))
    assert printed["model"]["class_path"] == load(job)["model"]["class_path"]
    for overlay in files[files.index(job) + 1 :]:
        for path, value in leaves(load(overlay)):
            later = [o for o in files[files.index(overlay) + 1 :] if _has(load(o), path)]
            if not later:
                assert lookup(printed, path) == value, (rel(job), rel(overlay), path)


def _has(tree: dict, path: tuple) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def differences(a: Any, b: Any, prefix: tuple = ()) -> set[tuple]:
    """Paths (list entries by index) where two parsed YAML trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for key in a.keys() | b.keys() for d in differences(a.get(key), b.get(key), (*prefix, key))}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, (*prefix, i))}
    return set() if a == b else {prefix}


def _run_paths(config: dict) -> set[tuple]:
    """Where a run writes: the one path of two jobs' configs that may differ besides the method
    (logs and checkpoints follow it: their folders are left null)."""
    assert lookup(config, ("trainer", "logger", 0, "init_args")) == {"name": "logs"}
    assert [cb["init_args"]["dirpath"] for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")] == [None]
    return {("trainer", "default_root_dir")}


def _perception_rewards(config: dict) -> list[dict]:
    return [cb for cb in config["trainer"]["callbacks"] if ".Perception" in cb["class_path"]]


def test_joint_is_pagrpo_without_separate_assignment():
    """The paper's "without separate assignment" row: PA-GRPO's rewards (both processes), budget,
    model, precision and aggregation; only the advantage differs (one, from the summed reward)."""
    pagrpo, joint = load(CONFIG_DIR / "pagrpo.yaml"), load(CONFIG_DIR / "joint.yaml")
    assert differences(pagrpo, joint) == _run_paths(joint) | {("model", "init_args", "loss", "mode")}
    assert joint["model"]["init_args"]["loss"] == {**pagrpo["model"]["init_args"]["loss"], "mode": "grpo"}
    assert len(_perception_rewards(joint)) == 3
    assert {lookup(c, ("trainer", "default_root_dir")) for c in (pagrpo, joint)} == {"runs/pagrpo", "runs/joint"}


def test_grpo_is_pagrpo_with_the_reasoning_rewards_only_one_advantage_and_the_per_sequence_mean():
    """The paper's process-agnostic GRPO (= its "without R_P" row): PA-GRPO's budget, model and
    precision with the reasoning rewards only, one advantage and the per-sequence mean loss (TRL's
    loss_type grpo, Video-R1's trainer)."""
    pagrpo, grpo = load(CONFIG_DIR / "pagrpo.yaml"), load(CONFIG_DIR / "grpo.yaml")
    without_perception = {**pagrpo, "trainer": {**pagrpo["trainer"], "callbacks": [
        cb for cb in pagrpo["trainer"]["callbacks"] if cb not in _perception_rewards(pagrpo)]}}
    method = {("model", "init_args", "loss", "mode"), ("model", "init_args", "loss", "aggregation")}
    assert differences(without_perception, grpo) == _run_paths(grpo) | method
    assert grpo["model"]["init_args"]["loss"] == {**pagrpo["model"]["init_args"]["loss"], "mode": "grpo", "aggregation": "sequence_mean"}
    assert not _perception_rewards(grpo) and len(_perception_rewards(pagrpo)) == 3
    assert {lookup(c, ("trainer", "default_root_dir")) for c in (pagrpo, grpo)} == {"runs/pagrpo", "runs/grpo"}


def checkpoint_dir(config: dict) -> str:
    """Where the job's ModelCheckpoint writes, as the CLI places it (p2r.cli.follow_root_dir)."""
    config = copy.deepcopy(config)
    follow_root_dir(config)
    [dirpath] = [cb["init_args"]["dirpath"] for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    return dirpath


def test_tgrpo_starts_from_video_r1s_own_think_answer_sft_with_the_same_prompt():
    """Video-R1's recipe: think/answer SFT (configs/sft_video_r1.yaml), then T-GRPO from its last
    checkpoint, both on Video-R1's prompt; PA-GRPO keeps starting from the process-aware SFT."""
    sft, sft_r1, tgrpo, pagrpo = (load(CONFIG_DIR / f"{n}.yaml") for n in ("sft", "sft_video_r1", "tgrpo", "pagrpo"))
    start = ("model", "init_args", "backbone", "init_args", "weights_from")
    assert lookup(tgrpo, start) == "runs/sft_video_r1/checkpoints/last.ckpt" == f"{checkpoint_dir(sft_r1)}/last.ckpt"
    assert lookup(pagrpo, start) == f"{checkpoint_dir(sft)}/last.ckpt"
    prompt = ("model", "init_args", "prompt_template")
    assert lookup(sft_r1, prompt) == lookup(tgrpo, prompt) == "video_r1"
    assert lookup(sft_r1, ("model", "init_args", "target_template")) == "video_r1"
    assert "target_template" not in sft["model"]["init_args"]  # the process-aware default
    assert lookup(sft_r1, ("trainer", "default_root_dir")) == "runs/sft_video_r1"
    assert checkpoint_dir(sft_r1) == "runs/sft_video_r1/checkpoints"


def test_video_r1_sft_takes_video_r1s_hyperparameters():
    """src/scripts/run_sft_video.sh: 4 GPUs x batch 1 x accumulation 2, lr 1e-6 (TRL's default linear
    decay, no warmup, no weight decay), max grad norm 5, 1 epoch; frames as T-GRPO's (its qwen-vl-utils)."""
    sft_r1, tgrpo = load(CONFIG_DIR / "sft_video_r1.yaml"), load(CONFIG_DIR / "tgrpo.yaml")
    trainer, model = sft_r1["trainer"], sft_r1["model"]["init_args"]
    assert (trainer["devices"], sft_r1["data"]["batch_size"], trainer["accumulate_grad_batches"]) == (4, 1, 2)
    assert (trainer["max_epochs"], trainer["gradient_clip_val"]) == (1, 5.0)
    assert (model["lr"], model["schedule"], model["warmup_ratio"], model["weight_decay"]) == (1e-6, "linear", 0.0, 0.0)
    assert sft_r1["data"]["train_frames"] == tgrpo["data"]["train_frames"]
