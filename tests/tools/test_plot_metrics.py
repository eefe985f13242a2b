"""tools/plot_metrics.py on a CSVLogger-shaped metrics.csv."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"
spec = importlib.util.spec_from_file_location("plot_metrics_tool", TOOL)
plot_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_metrics)

CSV = """epoch,step,reward/reasoning/accuracy,reward/perception/accuracy,train/loss,train/kl,lr-AdamW
0,0,0.25,0.5,1.5,,0.001
0,1,,,,0.01,
0,1,0.5,0.75,1.2,0.02,0.001
0,2,0.75,nan,1.0,0.03,0.001
"""


def test_reads_the_right_columns(tmp_path):
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(CSV)
    assert plot_metrics.find_metrics_csv(tmp_path) == path
    curves = plot_metrics.read_curves(path)
    assert sorted(curves) == ["reward/perception/accuracy", "reward/reasoning/accuracy", "train/kl", "train/loss"]
    assert curves["reward/reasoning/accuracy"] == ([0.0, 1.0, 2.0], [0.25, 0.5, 0.75])
    assert curves["reward/perception/accuracy"] == ([0.0, 1.0], [0.5, 0.75])  # empty and nan skipped
    assert curves["train/kl"] == ([1.0, 1.0, 2.0], [0.01, 0.02, 0.03])


def test_main_writes_a_png(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text(CSV)
    out = tmp_path / "curves.png"
    assert plot_metrics.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotted 4 curves" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "no metrics.csv under" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("epoch,step,lr\n0,0,0.1\n")
    assert plot_metrics.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no reward/*, train/reward*, loss or kl values" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("epoch,value\n0,0.1\n")
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "no 'step' column" in capsys.readouterr().err


@pytest.mark.parametrize("column, expected", [
    ("reward/perception/format", True), ("train/reward_total", True), ("train/loss", True),
    ("train/kl", True), ("val/loss_epoch", True), ("lr-AdamW", False), ("epoch", False), ("train/kl_coef", True),
    ("skill/rank", False),
])
def test_wanted(column, expected):
    assert plot_metrics.wanted(column) is expected


def test_trailing_mean_hand_worked():
    assert plot_metrics.trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot_metrics.trailing_mean([2.0, 4.0, 6.0], 5) == [2.0, 3.0, 4.0]
    assert plot_metrics.trailing_mean([4.0, 8.0], 1) == [4.0, 8.0]
