"""What the benchmark tools print: every time as median (min-max, n), every headline and ratio from
medians, so one slow run (a loaded machine) cannot move it as it moves a mean. The reporting
functions get hand-made timings with one outlier; the slow tests run three tools at tiny sizes."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


@pytest.fixture
def tool(monkeypatch):
    """Import a tools/ script as a module (they import bench_common as a sibling)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return importlib.import_module


def test_bench_step_reports_medians_over_rounds_not_means(tool):
    bench_step = tool("bench_step")
    phases = ("rollout", "reference log-probs", "policy forward+backward")

    def p2r(*seconds):  # one round of a p2r path: rollout, reference, policy
        return {"times": dict(zip(phases, seconds)), "loss": 0.5, "grad_norm": 1.0,
                "memory": {"peak_mib": 100.0, "kind": "peak RSS of the process"}}

    def trl(step):
        return {"step_s": step, "generate_s": step / 4, "vision_tokens": [8], "memory": {"peak_mib": 300.0, "kind": "k"}}

    runs = {"shared": [p2r(0.5, 0.5, 1.0)] * 3,  # 2 s a step every round
            "per-sample": [p2r(1.0, 2.0, 5.0), p2r(1.0, 2.0, 5.0), p2r(1.0, 2.0, 17.0)],  # 8, 8, 20 s: mean 12
            "trl": [trl(10.0), trl(26.4), trl(10.4)]}  # median 10.4, mean 15.6
    lines = bench_step.report(runs)
    assert lines[-1] == "speedup: 4.00"  # 8 / 2; the means would give 6.00
    assert "vs TRL: 5.20x faster (shared prompt), 1.30x (per-sample); ratios of medians over 3 rounds" in lines  # means: 7.80x
    policy = next(ln for ln in lines if ln.startswith("policy forward+backward"))
    assert policy.split() == ["policy", "forward+backward", "5.000", "s", "(5.000-17.000,", "n=3)",
                              "1.000", "s", "(1.000-1.000,", "n=3)", "5.00x"]
    assert next(ln for ln in lines if ln.startswith("old-policy")).split()[2:] == ["not", "run", "not", "run"]
    assert next(ln for ln in lines if ln.startswith("whole step")).split()[2:] == [
        "8.000", "s", "(8.000-20.000,", "n=3)", "2.000", "s", "(2.000-2.000,", "n=3)", "4.00x"]
    row = next(ln for ln in lines if ln.startswith("TRL  "))
    assert "10.400 s (10.000-26.400, n=3)" in row and row.endswith("10.00, 26.40, 10.40 s")


def test_bench_rollout_speedup_is_a_ratio_of_medians(tool):
    bench_rollout = tool("bench_rollout")
    timing = tool("bench_common").Timing.of
    timings = {bench_rollout.EAGER: timing([2.0, 2.0, 2.0]), bench_rollout.COMPILED: timing([1.0, 1.0, 7.0]),
               bench_rollout.WAY_A: timing([6.0, 5.0, 30.0]), bench_rollout.WAY_B: timing([3.0, 3.0, 3.0])}
    lines = bench_rollout.report(timings, compiling_s=9.0, default="compiled")
    assert lines[-1] == "speedup: 6.00"  # 6 / 1; the means would give 13.67 / 3 = 4.56
    assert lines[-2] == "speedup over (b): 3.00"
    assert "compiled vs eager: 2.00x (ratio of medians over 3 runs)" in lines
    assert "then 1.000 s (1.000-7.000, n=3) per group" in lines[-4]
    row = next(ln for ln in lines if ln.startswith(bench_rollout.WAY_A))
    assert row.split()[-7:] == ["6.000", "s", "(5.000-30.000,", "n=3)", "6.00x", "ours", "(compiled)"]


def test_bench_sft_loss_time_ratio_is_of_medians(tool):
    bench_sft_loss = tool("bench_sft_loss")
    plain = {"peak_mib": 300.0, "seconds": [4.0, 4.0, 40.0]}  # mean 16
    chunked = {"peak_mib": 100.0, "seconds": [2.0, 1.0, 3.0]}
    lines = bench_sft_loss.table([(1024, plain, chunked)], chunk=512)
    assert "time ratio (medians)" in lines[0]
    assert lines[2] == "| 1,024 | 300 MiB | 100 MiB | 3.0x | 4.000 s (4.000-40.000, n=3) | 2.000 s (1.000-3.000, n=3) | 2.00x |"


def test_bench_logprobs_row_shows_each_pass_time_and_the_memory_ratio(tool):
    bench_logprobs = tool("bench_logprobs")
    line, ratio = bench_logprobs.row("shared", "policy", {"peak_mib": 900.0, "seconds": [3.0, 1.0, 2.0]},
                                     {"peak_mib": 300.0, "seconds": [1.5]})
    assert ratio == 3.0
    assert line.split() == ["shared", "policy", "900", "MiB", "2.000", "s", "(1.000-3.000,", "n=3)",
                            "300", "MiB", "1.500", "s", "(n=1)", "3.00x"]


def test_bench_decode_cells_and_ratios_use_medians(tool):
    pytest.importorskip("av")
    bench_decode = tool("bench_decode")
    timing = tool("bench_common").Timing.of
    timings = {"ours": timing([1.0, 1.0, 9.0]), "qwen decord": timing([3.0, 2.0, 3.0]), "qwen torchcodec": timing([4.0, 0.1, 5.0])}
    assert bench_decode.faster_theirs(timings, ["qwen decord", "qwen torchcodec"]) == 3.0  # means: 8/3 / (11/3)
    assert bench_decode.cell(timings["ours"]) == "1.000 (1.000-9.000)"


def test_bench_gpu_rows_show_median_range_and_count(tool):
    bench_gpu = tool("bench_gpu")
    decode = {"ok": True, "architecture": "tiny", "prompt_tokens": 100, "vision_tokens": 64, "group": 8, "new_tokens": 16,
              "weight_bytes": 1e6, "bandwidth": 1e9, "kv_bytes_per_step": 1e3,
              "engines": {"eager": {"prefill_runs": [0.2, 0.1, 0.9], "total_runs": [1.0, 1.1, 1.2], "step_ms": 60.0,
                                    "tokens_per_s": 128.0, "floor_ratio": 60.0}}}
    sft = {"ok": True, "architecture": "tiny", "tokens": 100, "step_runs": [0.5, 2.5], "tokens_per_s": 66.7, "mfu": 0.01,
           "peak_flops": 1e12, "peak_kind": "k", "loss": 1.0, "moved": 1.0, "memory": [2**20, "peak RSS"]}
    lines, ok = bench_gpu.render({"decode": decode, "sft": sft}, "header")
    assert ok
    eager = next(ln for ln in lines if ln.split()[:1] == ["eager"])
    assert eager.split() == ["eager", "0.200", "s", "(0.100-0.900,", "n=3)", "1.100", "s", "(1.000-1.200,", "n=3)",
                             "60.00", "128.0", "60.00"]
    assert "1.500 s (0.500-2.500, n=2) per step" in next(ln for ln in lines if ln.startswith("sft"))


@pytest.mark.slow
def test_bench_rollout_runs_small_and_ends_with_its_speedup():
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_rollout.py"), "--group-size", "2", "--new-tokens", "2",
                           "--frames", "2", "--side", "28", "--hidden", "32", "--layers", "1", "--repeats", "2",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert float(lines[-1].removeprefix("speedup: ")) > 0
    assert any(ln.startswith("compiled vs eager: ") and ln.endswith("x (ratio of medians over 2 runs)") for ln in lines)
    assert sum(", n=2)" in ln for ln in lines) == 5  # four methods and the compiled engine's line


@pytest.mark.slow
def test_bench_logprobs_and_sft_loss_run_small():
    """Logits of a few MiB: a peak must register above zero (the memory ratios divide by it)."""
    logprobs = subprocess.run([sys.executable, str(TOOLS / "bench_logprobs.py"), "--vocab", "16384", "--group-size", "2",
                               "--new-tokens", "16", "--chunk", "4", "--repeats", "2"], capture_output=True, text=True, timeout=600)
    assert logprobs.returncode == 0, logprobs.stdout + logprobs.stderr[-3000:]
    assert sum(", n=2)" in ln for ln in logprobs.stdout.splitlines()) == 4, logprobs.stdout  # 2 paths x 2 passes
    assert logprobs.stdout.strip().splitlines()[-1].startswith("peak memory, one chunk / chunked: ")
    sft = subprocess.run([sys.executable, str(TOOLS / "bench_sft_loss.py"), "--device", "cpu", "--lengths", "32",
                          "--hidden", "16", "--vocab", "16384", "--chunk", "4", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600)
    assert sft.returncode == 0, sft.stdout + sft.stderr[-3000:]
    assert sft.stdout.strip().splitlines()[-1].count(", n=2)") == 2, sft.stdout


@pytest.mark.slow
def test_bench_decode_speed_table_on_one_small_clip(tool, tmp_path, capsys, monkeypatch):
    pytest.importorskip("qwen_vl_utils")
    pytest.importorskip("decord")
    bench_decode = tool("bench_decode")
    clip = bench_decode.write_clip(tmp_path / "small.mp4", 20, 112, 112)
    monkeypatch.setattr(bench_decode, "bench_clips", lambda folder: {"small": clip})
    monkeypatch.setattr(bench_decode, "BUDGETS", {"4 @ 16*28*28": (4, 16 * 28 * 28)})
    bench_decode.bench_speed(argparse.Namespace(threads=1, ablations=False, repeats=2))
    lines = capsys.readouterr().out.strip().splitlines()
    row = next(ln for ln in lines if ln.startswith("small"))
    assert row.split()[-1] == "2" and row.count("(") >= 2  # ours and at least one qwen-vl-utils back-end
    assert lines[-2] == "geometric mean over 1 cells of (faster qwen-vl-utils median) / our median, 2 runs each:"
    assert float(lines[-1].removeprefix("speedup: ")) > 0
