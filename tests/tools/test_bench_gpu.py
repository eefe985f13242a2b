"""tools/bench_gpu.py: the --cpu --tiny run prints its table and exit code, with none of the
packages the GPU machine lacks (decord, webdataset, jsonargparse, av, bitsandbytes) importable."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench_gpu.py"
ABSENT_ON_GPU_MACHINE = ("decord", "webdataset", "jsonargparse", "av", "bitsandbytes")
ON_GPU_MACHINE = ("torch", "torchvision", "transformers", "lightning", "peft", "torchmetrics")
OWN = ("p2r", "callbacks", "bench_common", "bench_step", "bench_gpu", "__main__")

# Installed as sitecustomize in every process of the run: the packages above cannot be found
# (neither their modules nor their metadata), and every import made by the repository's own code
# is written to $P2R_IMPORTS_DIR/<pid>.json at exit.
SITECUSTOMIZE = f'''
import atexit, builtins, importlib.machinery, importlib.metadata, json, os, sys

HIDDEN = {set(ABSENT_ON_GPU_MACHINE)!r}
OWN = {OWN!r}


class _Hidden:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, context=importlib.metadata.DistributionFinder.Context()):
        for dist in importlib.machinery.PathFinder.find_distributions(context):
            if (dist.metadata["Name"] or "").lower() not in HIDDEN:
                yield dist

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
_import, _seen = builtins.__import__, set()


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__") or ""
    if level == 0 and importer.partition(".")[0] in OWN:
        _seen.add((importer, name.partition(".")[0]))
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _recording_import


@atexit.register
def _write():
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
    with open(os.path.join(os.environ["P2R_IMPORTS_DIR"], f"{{os.getpid()}}.json"), "w") as f:
        json.dump({{"argv": sys.argv, "imports": sorted(_seen), "hidden_loaded": loaded}}, f)
'''


def hidden_env(tmp: Path) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    records = tmp / "imports"
    records.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), P2R_IMPORTS_DIR=str(records))
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `bench_gpu.py --cpu --tiny` run with the five packages hidden (each section in its own process)."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu", "--tiny"], cwd=tmp, env=hidden_env(tmp),
                          capture_output=True, text=True, timeout=900)
    return proc, [json.loads(p.read_text()) for p in (tmp / "imports").glob("*.json")]


def test_cpu_tiny_run_prints_every_section_and_exits_zero(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("bench_gpu: CPU") and lines[-1] == "all 5 sections passed"
    # decode: the eager row has prefill and rollout times as median (min-max, n=3), then ms/step,
    # tokens/s and the ratio to the bandwidth floor from the medians (on the tiny model a decode
    # step is within the timing noise: ms/step may even come out negative)
    timing = r"[\d.]+ s \([\d.]+-[\d.]+, n=3\)"
    assert re.search(rf"^\s+eager\s+{timing}\s+{timing}\s+-?[\d.]+\s+[\d.]+\s+-?[\d.]+$", out, re.M), out
    assert "8 sequences x 16 new tokens; floor" in out, out
    compiled = re.search(r"^\s+compiled\s+(.*)$", out, re.M).group(1)
    assert re.fullmatch(rf"{timing}\s+{timing}\s+-?[\d.]+\s+[\d.]+\s+-?[\d.]+", compiled), out
    assert re.search(r"^sft .*: [\d.]+ s \([\d.]+-[\d.]+, n=2\) per step, [\d,]+ tokens/s, MFU [\d.e+-]+ % "
                     r".*(9\d|100) % of sampled weights moved", out, re.M), out
    assert re.search(r"^pagrpo .*G 8 x 16, shared prompt", out, re.M), out
    assert re.search(r"one timed step \(n=1\): rollout [\d.]+ s \| reference log-probs [\d.]+ s \| "
                     r"policy forward\+backward [\d.]+ s \| optimizer step [\d.]+ s \| whole step", out), out
    assert re.search(r"memory plan [\d.]+ [MG]iB \(estimate", out), out
    assert "fsdp1    skipped: configs/strategy/fsdp.yaml needs CUDA" in out, out
    assert re.search(r"^fsdp2 .*FSDP2Strategy.*: 2 steps ran, loss [\d.]+, last step [\d.]+ s \(n=1\), "
                     r"(9\d|100) % of sampled weights moved", out, re.M), out


def _closure(roots) -> set[str]:
    """Distributions ``roots`` need, transitively (extras left out), by canonical name."""
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_its_imports_reach_only_what_the_gpu_machine_has(tiny_run):
    proc, records = tiny_run
    assert proc.returncode == 0
    sections = {r["argv"][r["argv"].index("--section") + 1] for r in records if "--section" in r["argv"]}
    assert sections == {"decode", "sft", "pagrpo", "fsdp1", "fsdp2"}  # every process was recorded
    allowed_dists = _closure(ON_GPU_MACHINE)
    allowed = {module for module, dists in metadata.packages_distributions().items()
               if any(d.lower().replace("_", "-") in allowed_dists for d in dists)}
    allowed |= set(sys.stdlib_module_names) | set(OWN)
    for record in records:
        assert record["hidden_loaded"] == []
        outside = sorted({(importer, module) for importer, module in record["imports"] if module not in allowed})
        assert outside == [], f"{record['argv']}: repository code imports packages the GPU machine lacks: {outside}"


def test_the_hidden_packages_are_really_unimportable(tmp_path):
    env = hidden_env(tmp_path)
    probe = "import importlib.util as u, sys; print([u.find_spec(n) is None for n in sys.argv[1:]])"
    proc = subprocess.run([sys.executable, "-c", probe, *ABSENT_ON_GPU_MACHINE], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == str([True] * 5), proc.stderr
    # p2r's synthetic-data writer needs PyAV: under the hiding it cannot import.
    proc = subprocess.run([sys.executable, "-c", "import p2r.data.synthetic"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'av'" in proc.stderr


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


def test_a_failed_or_unstarted_section_makes_the_exit_status_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu", "--tiny", "--budget", "1", "--only", "decode,sft"],
                          env=hidden_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "decode   FAILED: not started" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "FAILED: decode, sft"
    lines, ok = _load("bench_gpu").render({"fsdp1": {"ok": True, "skipped": "needs CUDA"},
                                           "sft": {"ok": False, "problems": ["loss not finite"]}}, "header")
    assert not ok and lines[-2:] == ["sft      FAILED: loss not finite", "FAILED: sft"]
