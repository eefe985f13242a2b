"""Every YAML file under configs/ parses through the real CLI: job configs alone, overlays stacked
on every job config. New files are picked up by the glob, no list to update."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from p2r.cli import main

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
    assert {"configs/sft.yaml", "configs/tiny.yaml"} <= names
    assert "configs/sft.yaml" in {rel(p) for p in JOBS} and "configs/tiny.yaml" in {rel(p) for p in OVERLAYS}


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


@pytest.mark.parametrize(("job", "overlay"), [(j, o) for j in JOBS for o in OVERLAYS], ids=lambda p: p.stem)
def test_overlay_stacks_on_every_job_config(job, overlay, capsys):
    printed = print_config([subcommand(job), "--config", str(job), "--config", str(overlay)], capsys)
    assert printed["model"]["class_path"] == load(job)["model"]["class_path"]
    for path, value in leaves(load(overlay)):
        assert lookup(printed, path) == value, (rel(job), rel(overlay), path)
