"""PA-GRPO against plain GRPO from the same tiny SFT checkpoint, same budget and seed, on a CPU.

    python tools/compare_rl.py [--steps 200] [--batch-size 16] [--lr 1e-4]

Needs the tiny SFT checkpoint (``python tools/demo.py`` writes runs/sft/checkpoints/last.ckpt).
Runs, in-process and in this order:
    python -m p2r fit --config configs/pagrpo.yaml --config configs/tiny.yaml --config configs/tiny_rl.yaml
    python -m p2r fit --config configs/grpo.yaml   --config configs/tiny.yaml --config configs/tiny_rl.yaml
(``--steps``, ``--batch-size`` and ``--lr`` override configs/tiny_rl.yaml's max_steps, prompts per
step and learning rate for both runs alike), then ``p2r test`` on the synthetic test split (greedy
answers) for the SFT start and the last checkpoint each run wrote, and writes reward curves with
tools/plot_metrics.py (runs/<job>/curves.png). Prints one table: held-out accuracy, format and
observation sufficiency, and the mean perception / reasoning reward of the sampled rollouts in
the first and last 10 steps of each run.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

from p2r.cli import main as p2r_main

TINY = ["--config", "configs/tiny.yaml"]
RL = [*TINY, "--config", "configs/tiny_rl.yaml"]
SFT_CKPT = "runs/sft/checkpoints/last.ckpt"


def held_out(ckpt: str) -> dict[str, float]:
    cli = p2r_main(["test", "--config", "configs/sft.yaml", *TINY, f"--ckpt_path={ckpt}", "--trainer.logger=false"])
    return {k.split("/", 1)[1]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def reward_trend(metrics_csv: Path) -> dict[str, tuple[float, float]]:
    """Mean per-process reward over the first and the last 10 logged steps."""
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("train/reward/perception")]
    out = {}
    for process in ("perception", "reasoning"):
        values = [float(r[f"train/reward/{process}"]) for r in rows]
        out[process] = (sum(values[:10]) / len(values[:10]), sum(values[-10:]) / len(values[-10:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: configs/tiny_rl.yaml's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step, G completions each "
                        "(default: configs/tiny_rl.yaml's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: configs/tiny_rl.yaml's)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # its lines reach a log file as they are printed
    if not Path(SFT_CKPT).is_file():
        sys.exit(f"no tiny SFT checkpoint at {SFT_CKPT}: run `python tools/demo.py` first")
    overrides = [f"--trainer.max_steps={args.steps}"] if args.steps else []
    overrides += [f"--data.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"--model.init_args.lr={args.lr}"] if args.lr else []

    # Say which checkpoint this is: any other `fit` into runs/sft replaces last.ckpt.
    step = torch.load(SFT_CKPT, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    print(f"starting from {SFT_CKPT}: SFT global step {step} (the demo's is 2250)")
    scores = {"SFT start": held_out(SFT_CKPT)}
    trends = {}
    for job, name in (("pagrpo", "PA-GRPO"), ("grpo", "GRPO")):
        trainer = p2r_main(["fit", "--config", f"configs/{job}.yaml", *RL, *overrides]).trainer
        # This run's own files: an earlier run's last.ckpt makes Lightning name this one last-v1.ckpt,
        # and the logger counts versions up (version_10 sorts before version_9 by name).
        scores[name] = held_out(trainer.checkpoint_callback.last_model_path)
        metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
        trends[name] = reward_trend(metrics_csv)
        subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics_csv), "--out", f"runs/{job}/curves.png"],
                       check=False)

    print(f"\n{'held-out (synthetic test split)':<32}" + "".join(f"{n:>12}" for n in scores))
    for key, label in (("accuracy", "answer accuracy"), ("format", "format"), ("perception", "observation sufficient")):
        print(f"{label:<32}" + "".join(f"{s.get(key, float('nan')):>12.3f}" for s in scores.values()))
    for name, trend in trends.items():
        for process, (first, last) in trend.items():
            print(f"{name} {process} reward: first 10 steps {first:.3f} -> last 10 steps {last:.3f}")


if __name__ == "__main__":
    main()
