"""The README's main command: synthetic data -> process-aware SFT of the tiny backbone -> test.

    python tools/demo.py [--out runs/sft] [--epochs 3]

Makes data/synthetic if it is absent, runs
``python -m p2r fit --config configs/sft.yaml --config configs/tiny.yaml`` on the CPU, then
``python -m p2r test`` on the synthetic test split from the last checkpoint, and prints held-out
accuracy per problem type next to chance. Everything is in-process; nothing is downloaded.

Its run goes to ``--out`` (``runs/sft``, where ``configs/pagrpo.yaml`` with the tiny overlay looks
for the SFT checkpoint). A rerun replaces what an earlier demo left there (the folder holds a
``.made-by-demo`` marker); a folder an ordinary run wrote is never touched: fit refuses it.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path

from p2r.cli import main as p2r_main
from p2r.data.synthetic import make_synthetic

CONFIGS = ["--config", "configs/sft.yaml", "--config", "configs/tiny.yaml"]
# What guessing scores on the synthetic test split: 4 options; counts are 1-4 (see p2r.data.synthetic).
CHANCE = {"multiple choice": 0.25, "numerical": 0.25}
MARKER = ".made-by-demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data", default="data/synthetic", help="synthetic data folder (made if absent)")
    parser.add_argument("--epochs", type=int, default=None, help="SFT epochs (default: configs/tiny.yaml's)")
    parser.add_argument("--out", type=Path, default=Path("runs/sft"),
                        help="the run's folder (checkpoints, logs); an earlier demo's is replaced")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # its lines reach a log file as they are printed
    marker = args.out / MARKER
    if marker.is_file():
        print(f"replacing the earlier demo run in {args.out}")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    if not any(args.out.iterdir()):
        marker.write_text("written by tools/demo.py: a rerun of the demo replaces this folder\n")

    if not glob.glob(f"{args.data}/shards/train-*.tar"):
        print(f"making the synthetic data set in {args.data} ...")
        make_synthetic(Path(args.data), n_train=6000, n_val=200, n_test=200, seed=0)
    test_sets = json.dumps({"synthetic": f"{args.data}/shards/test-*.tar"})
    extra = [f"--data.train_shards={args.data}/shards/train-*.tar", f"--data.val_shards={args.data}/shards/val-*.tar",
             f"--data.test_sets={test_sets}", f"--trainer.default_root_dir={args.out}"]
    if args.epochs is not None:
        extra.append(f"--trainer.max_epochs={args.epochs}")

    start = time.perf_counter()
    fit = p2r_main(["fit", *CONFIGS, *extra])
    fit_minutes = (time.perf_counter() - start) / 60
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    test = p2r_main(["test", *CONFIGS, *extra, f"--ckpt_path={ckpt}"])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}

    print(f"\nSFT of the tiny backbone: {fit_minutes:.1f} min on CPU; checkpoint {ckpt}")
    print(f"{'held-out (synthetic test split)':<34} {'score':>7} {'chance':>7}")
    print(f"{'format compliance':<34} {metrics.get('test/format', float('nan')):>7.3f}")
    print(f"{'observation sufficient (rule judge)':<34} {metrics.get('test/perception', float('nan')):>7.3f}")
    print(f"{'answer accuracy (all types)':<34} {metrics.get('test/accuracy', float('nan')):>7.3f}")
    for key in sorted(k for k in metrics if k.startswith("test/accuracy/")):
        kind = key.split("/", 2)[2]
        chance = f"{CHANCE[kind]:>7.2f}" if kind in CHANCE else f"{'':>7}"
        print(f"{'  ' + kind:<34} {metrics[key]:>7.3f} {chance}")


if __name__ == "__main__":
    main()
