"""tools/bench_step.py --trl: TRL's GRPOTrainer gets the same shape as p2r's step (TRL is optional: the bench extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--new-tokens", "6", "--frames", "4", "--side", "56", "--hidden", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
         "--vision-hidden", "32", "--vision-depth", "1", "--warmup", "0"]


def run(path: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), "--trl", *SMALL, "--path", path],
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_trl_step_sees_the_same_vision_tokens_and_completion_lengths_as_p2r():
    pytest.importorskip("trl")
    trl, ours = run("trl"), run("shared")
    assert trl["vision_tokens"] == ours["vision_tokens"] == [8]  # 4 frames at 56 px: 2 x 2 x 2 merged patches
    assert trl["completion_lengths"] == ours["completion_lengths"] == [6] * 8  # forced equal, G = 8
    assert trl["step_s"] > 0 and trl["generate_s"] > 0 and trl["memory"]["peak_mib"] > 0


def test_both_paths_compute_the_same_step_with_the_compiled_engine():
    """The whole tool (no TRL): both paths decode with the compiled engine and report the same loss."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), *SMALL, "--engine", "compiled"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "compiled decoding, warm-up steps 0" in out
    losses = {ln.split()[0]: ln.split()[2] for ln in out.splitlines() if ln.startswith(("per-sample ", "shared "))}
    assert set(losses) == {"per-sample", "shared"} and losses["per-sample"] == losses["shared"], out
    assert float(out.strip().splitlines()[-1].removeprefix("speedup: ")) > 0
