"""Plot reward, loss and KL curves from a Lightning CSVLogger run.

    python tools/plot_metrics.py runs/pagrpo --out curves.png

LOGDIR may be the metrics.csv itself, a version folder, or any folder above it; with several
metrics.csv files below LOGDIR the most recently written one is plotted (its path is printed).
Plotted columns: every ``reward/*`` and ``train/reward*`` column, plus any column whose name holds
"loss" or "kl", each against ``step``. Needs matplotlib (the ``plot`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def find_metrics_csv(logdir: Path) -> Path:
    """The metrics.csv at or below ``logdir`` (the newest when there are several)."""
    if logdir.is_file():
        return logdir
    found = sorted(logdir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime) if logdir.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {logdir} (is this a CSVLogger run directory?)")
    return found[-1]


def wanted(column: str) -> bool:
    """Reward curves, and the loss and KL curves when logged."""
    name = column.lower()
    last = name.rsplit("/", 1)[-1]
    return (name.startswith("reward/") or name.startswith("train/reward") or "loss" in name
            or last == "kl" or last.startswith("kl_") or last.endswith("_kl"))


def read_curves(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Column -> (steps, values) for every wanted column, skipping the rows where it is empty."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column")
        columns = [c for c in reader.fieldnames if wanted(c)]
        for row in reader:
            if not row.get("step"):
                continue
            step = float(row["step"])
            for column in columns:
                text = row.get(column) or ""
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    steps, values = curves.setdefault(column, ([], []))
                    steps.append(step)
                    values.append(value)
    return curves


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start).

    >>> trailing_mean([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(curves: dict[str, tuple[list[float], list[float]]], out: Path, title: str, smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(curves)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        noisy = smooth > 1 and len(values) > 2 * smooth
        # RL rewards swing with which prompts a step drew: a trailing mean shows the trend.
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, alpha=0.35 if noisy else 1.0)
        if noisy:
            ax.plot(steps, trailing_mean(values, smooth), color="C3", label=f"mean of {smooth}")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("logdir", type=Path, help="run directory (or metrics.csv) written by CSVLogger")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="output image (png, pdf, svg)")
    parser.add_argument("--smooth", type=int, default=20,
                        help="also draw the trailing mean over this many steps on long curves (0 or 1: off)")
    args = parser.parse_args(argv)
    try:
        path = find_metrics_csv(args.logdir)
        curves = read_curves(path)
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_metrics: {err}", file=sys.stderr)
        return 2
    if not curves:
        print(f"plot_metrics: {path} has no reward/*, train/reward*, loss or kl values to plot", file=sys.stderr)
        return 2
    plot(curves, args.out, str(path), args.smooth)
    print(f"plotted {len(curves)} curves from {path} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
