"""The RL testbed: does each RL method improve its own SFT start, and how do the methods compare?

    python tools/compare_rl.py --seeds 1,2,3 --methods grpo,joint,pagrpo,tgrpo --out runs/compare_rl

Runs the whole recipe on a CPU, in-process, each stage once (a rerun into the same --out reuses
every finished stage, so an interrupted experiment resumes where it stopped):

1. data (``--data``, made if absent): the synthetic clips in the testbed's form
   (:data:`TESTBED`): counting shapes that appear one after another (the one synthetic task whose
   perception the tiny model learns within a CPU budget: after 1,500 SFT steps on five tasks,
   motion, colour change, first appearance and disappearance were still at chance, 0.25), terse
   traces (33 tokens, so a CPU samples thousands a minute), and a noisy teacher: a quarter
   of the SFT traces observe a wrong count and answer from it (the ``solution`` stays right), so
   the SFT model samples wrong observations and perception is what limits accuracy. 1,000
   held-out clips.
2. SFT, one per recipe the methods need, fixed seed: process-aware (configs/sft.yaml) for grpo,
   joint and pagrpo; Video-R1's think/answer SFT (configs/sft_video_r1.yaml) for tgrpo.
3. held-out scores of each SFT start: greedy accuracy per clip, and pass@1 / pass@G sampled as
   the RL rollouts sample (G = 8, temperature 1.0, top_p 0.95).
4. RL, per method and seed, with the same budget (configs/tiny_rl.yaml, --steps, --lr,
   --batch-size): configs/{grpo,joint,pagrpo,tgrpo}.yaml on the tiny overlays, starting from
   that method's SFT, with the length-reward windows scaled to the recipe's own traces (the
   paper's windows are token counts of 7B traces; :func:`length_windows`).
5. held-out scores of every RL run's last checkpoint, on the same clips.

Writes OUT/results.json, OUT/curves.png and prints the table: held-out accuracy (mean +- SE
over seeds), the paired difference to the method's own SFT start (per clip, same clips; SE over
clips, then over seeds), and last ``pagrpo-grpo: <diff> +- <se>`` (the larger of the two SEs).
Statistics: p2r.evaluation.statistics. Every run's config, logs and checkpoint are under
OUT/runs/<method>/seed<k>/ and OUT/sft/<recipe>/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from callbacks.evaluation.report import write_json
from p2r.algorithms.rollout import generate_groups
from p2r.cli import main as p2r_main
from p2r.data.records import SFT_TARGETS, parse_record
from p2r.data.synthetic import make_synthetic
from p2r.evaluation.answer_check import clip_scores
from p2r.evaluation.statistics import mean_se, paired_difference, pass_at, seed_difference

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs/tiny.yaml")]
TINY_RL = [*TINY, "--config", str(REPO / "configs/tiny_rl.yaml")]

TESTBED: dict[str, Any] = {
    "tasks": ("count",),
    "style": "terse",
    "observation_noise": 0.25,
    "n_train": 4000,
    "n_val": 64,
    "n_test": 1000,
    "seed": 0,
    "max_completion_length": 64,  # rollouts and held-out answers (the traces have 33 tokens)
}
SAMPLED_CLIPS = 250  # pass@G of RL runs on the first 250 held-out clips (the SFT starts: all of them)
SFT_RECIPES = {"videop2r": "configs/sft.yaml", "video_r1": "configs/sft_video_r1.yaml"}  # keys: SFT_TARGETS
METHODS = {  # name -> (RL config, the SFT recipe it starts from)
    "grpo": ("configs/grpo.yaml", "videop2r"),
    "joint": ("configs/joint.yaml", "videop2r"),
    "pagrpo": ("configs/pagrpo.yaml", "videop2r"),
    "tgrpo": ("configs/tgrpo.yaml", "video_r1"),
}
LENGTH_REWARDS = {  # class name -> the segment whose length it reads
    "PerceptionLengthReward": "perception",
    "ReasoningLengthReward": "reasoning",
    "CompletionLengthReward": "completion",
}


def log(message: str) -> None:
    print(f"[compare_rl {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- data and configs ----------------------------------------------------------------------------


def make_data(root: Path) -> None:
    if not (root / "shards").is_dir():
        log(f"making the testbed data in {root}")
        t = TESTBED
        make_synthetic(root, t["n_train"], t["n_val"], t["n_test"], seed=t["seed"], tasks=t["tasks"],
                       style=t["style"], observation_noise=t["observation_noise"])


def data_args(root: Path) -> list[str]:
    return [f"--data.train_shards={root}/shards/train-*.tar", f"--data.val_shards={root}/shards/val-*.tar",
            "--data.test_sets=" + json.dumps({"testbed": f"{root}/shards/test-*.tar"})]


def length_windows(root: Path, recipe: str) -> dict[str, list[int]]:
    """Length-reward windows for the testbed: the 5th to 95th percentile of the token lengths of the
    recipe's own SFT targets (``SFT_TARGETS[recipe]``: the process-aware trace, or Video-R1's
    think/answer trace), per segment; the paper's P [128, 320] and R [320, 512] bracket its 7B
    traces the same way. The end token counts in reasoning and in the whole completion."""
    from p2r.backbones.tokenizer import train_tokenizer  # the tiny backbone's tokenizer

    tok = train_tokenizer()
    target = SFT_TARGETS[recipe]
    lengths: dict[str, list[int]] = {"perception": [], "reasoning": [], "completion": []}
    for raw in json.loads((root / "train.json").read_text()):
        record = parse_record(raw)
        completion = len(tok(target(record)).input_ids) + 1
        perception = len(tok(record.observation).input_ids) if recipe == "videop2r" else 0
        lengths["perception"].append(perception)
        lengths["completion"].append(completion)
        lengths["reasoning"].append(completion - perception)
    windows = {}
    for name, values in lengths.items():
        values.sort()
        windows[name] = [values[int(0.05 * (len(values) - 1))], values[int(0.95 * (len(values) - 1))]]
    return windows


def job_config(source: Path, run_dir: Path, windows: dict[str, list[int]] | None) -> Path:
    """``source`` with every output under ``run_dir`` and the length windows replaced; written to run_dir/job.yaml."""
    config = yaml.safe_load(source.read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    loggers = trainer.get("logger") or []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        logger.setdefault("init_args", {})["save_dir"] = str(run_dir)
    for callback in trainer.get("callbacks", []):
        name = callback["class_path"].rsplit(".", 1)[-1]
        args = callback.setdefault("init_args", {})
        if name == "ModelCheckpoint":
            args.update(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=None, save_top_k=0)
        if name == "RolloutTableWriter":
            args["every_n_steps"] = 1_000_000  # the testbed logs curves, not rollout tables
        if windows is not None and name in LENGTH_REWARDS:
            args["lmin"], args["lmax"] = windows[LENGTH_REWARDS[name]]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- held-out scores -----------------------------------------------------------------------------


def held_out(job: Path, ckpt: Path, data: list[str], group_size: int, max_new_tokens: int, sampled_clips: int) -> dict[str, Any]:
    """Per-clip greedy scores of the checkpoint on the test split, and pass@1 / pass@G of G samples
    per clip at the RL sampling settings (temperature 1.0, top_p 0.95) on its first ``sampled_clips``."""
    cli = p2r_main(["--config", str(job), *TINY, *data, f"--model.init_args.backbone.init_args.weights_from={ckpt}",
                    "--trainer.logger=false"], run=False)
    module, dm = cli.model, cli.datamodule
    module.configure_model()
    module.eval()
    dm.setup("test")
    ids, scores, samples = [], {"accuracy": [], "format": [], "perception": []}, []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            prompts, clips, records = module.prompts_of(batch), [s.clip for s in batch], [s.record for s in batch]
            greedy = generate_groups(module.backbone, prompts, clips, 1, max_new_tokens, temperature=0.0)
            texts = module.backbone.tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
            for key, values in clip_scores(texts, records).items():
                scores[key] += values
            ids += [r.id for r in records]
            if len(samples) < sampled_clips:
                gen = torch.Generator().manual_seed(len(ids))
                rollout = generate_groups(module.backbone, prompts, clips, group_size, max_new_tokens, 1.0, 0.95, gen)
                texts = module.backbone.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
                acc = clip_scores(texts, [r for r in records for _ in range(group_size)])["accuracy"]
                samples += [acc[i : i + group_size] for i in range(0, len(acc), group_size)]
    out: dict[str, Any] = {"ids": ids, "clips": scores}
    out.update({k: sum(v) / len(v) for k, v in scores.items() if all(x is not None for x in v)})
    if samples:
        out["pass_at_1"], out["pass_at_g"], out["all_equal_groups"] = pass_at(samples)
        out["sampled_clips"] = len(samples)
    return out


# ---- runs ----------------------------------------------------------------------------------------


def cached(path: Path, make) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    write_json(path, value)
    return value


def train_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-step training columns of the run's CSV log (the diagnostics the module logs every step)."""
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        return {}
    rows = [r for r in csv.DictReader(found[-1].open()) if r.get("train/reward/total")]
    keys = [k for k in rows[0] if k.startswith("train/")] if rows else []
    return {k: [float(r[k]) if r[k] else math.nan for r in rows] for k in keys}


def fit_once(run_dir: Path, source: str, windows: dict[str, list[int]] | None, args: list[str]) -> Path:
    """``python -m p2r fit`` of config ``source`` (outputs under ``run_dir``) with ``args``, unless its
    last.ckpt exists (a rerun into the same --out resumes); the checkpoint's path."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        p2r_main(["fit", "--config", str(job_config(REPO / source, run_dir, windows)), *args])
    return ckpt


def run_sft(out: Path, recipe: str, data: list[str], sft_steps: int) -> Path:
    return fit_once(out / "sft" / recipe, SFT_RECIPES[recipe], None,
                    [*TINY, *data, f"--trainer.max_steps={sft_steps}", "--trainer.max_epochs=-1",
                     "--trainer.limit_val_batches=0", "--seed_everything=0"])


def run_rl(out: Path, method: str, seed: int, start: Path, data: list[str], windows, overrides: list[str]) -> Path:
    return fit_once(out / "runs" / method / f"seed{seed}", METHODS[method][0], windows,
                    # No val set: the RL configs' benchmark watch would evaluate it every 100 steps; the
                    # testbed scores its held-out clips itself.
                    [*TINY_RL, *data, "--data.val_shards=null", f"--model.init_args.backbone.init_args.weights_from={start}",
                     f"--seed_everything={seed}", f"--model.init_args.rollout.seed={seed}", *overrides])


# ---- report --------------------------------------------------------------------------------------


def summarise(results: dict[str, Any]) -> list[str]:
    """The printed table; also fills results['summary']."""
    lines = [f"{'held-out accuracy (greedy)':<28}{'mean +- SE(seeds)':>20}{'vs own SFT: SE(clips)':>28}{'SE(seeds)':>12}"
             f"{'perception':>12}{'pass@G':>8}"]
    summary = results.setdefault("summary", {})
    for recipe, sft in results["sft"].items():
        lines.append(f"{'SFT ' + recipe:<28}{sft['accuracy']:>20.4f}{'':>28}{'':>12}{sft.get('perception', math.nan):>12.3f}"
                     f"{sft['pass_at_g']:>8.3f}   (pass@1 {sft['pass_at_1']:.3f}, all-equal groups {sft['all_equal_groups']:.3f})")
    for method, entry in results["methods"].items():
        seeds = list(entry["seeds"].values())
        if not seeds:
            continue
        sft = results["sft"][METHODS[method][1]]
        acc = mean_se([s["accuracy"] for s in seeds])
        clip_diff = paired_difference([s["clips"]["accuracy"] for s in seeds], [sft["clips"]["accuracy"]])
        seed_diff = seed_difference([s["accuracy"] for s in seeds], [sft["accuracy"]])
        perception = mean_se([s.get("perception", math.nan) for s in seeds]).mean
        summary[method] = {"accuracy": acc._asdict(), "vs_sft_clips": clip_diff._asdict(), "vs_sft_seeds": seed_diff._asdict()}
        lines.append(f"{method:<28}{acc.mean:>11.4f} +- {acc.se:.4f}{str(clip_diff):>28}{seed_diff.se:>12.4f}"
                     f"{perception:>12.3f}{mean_se([s['pass_at_g'] for s in seeds]).mean:>8.3f}")
    pairs = [(a, b) for a, b in (("pagrpo", "joint"), ("joint", "grpo"), ("tgrpo", "grpo"), ("pagrpo", "grpo"))
             if results["methods"].get(a, {}).get("seeds") and results["methods"].get(b, {}).get("seeds")]
    for a, b in pairs:
        sa, sb = list(results["methods"][a]["seeds"].values()), list(results["methods"][b]["seeds"].values())
        clip_diff = paired_difference([s["clips"]["accuracy"] for s in sa], [s["clips"]["accuracy"] for s in sb])
        seed_diff = seed_difference([s["accuracy"] for s in sa], [s["accuracy"] for s in sb])
        se = max(clip_diff.se, seed_diff.se)
        summary[f"{a}-{b}"] = {"diff": clip_diff.mean, "se": se, "se_clips": clip_diff.se, "se_seeds": seed_diff.se}
        lines.append(f"{a}-{b}: {clip_diff.mean:+.4f} +- {se:.4f}   (SE over clips {clip_diff.se:.4f}, over seeds {seed_diff.se:.4f})")
    return lines


DIAGNOSTICS = {  # logged column -> short name in the printed table
    "train/reward/reasoning": "R_reason",
    "train/reward/perception": "R_percep",
    "train/kl": "KL",
    "train/entropy": "entropy",
    "train/zero_advantage_groups/reasoning": "zero-adv groups",
    "train/no_perception_rows": "no-obs rows",
}


def diagnostics(results: dict[str, Any], window: int = 10) -> list[str]:
    """Per method, the mean over seeds of each diagnostic over the first and the last ``window`` steps:
    why a run moved or stayed flat, read from its own log."""
    lines = [f"training diagnostics, mean over seeds (first {window} -> last {window} steps):"]
    for method, entry in results["methods"].items():
        parts = []
        for key, label in DIAGNOSTICS.items():
            runs = [s["curves"][key] for s in entry["seeds"].values() if s.get("curves", {}).get(key)]
            if runs:
                first = sum(sum(r[:window]) / len(r[:window]) for r in runs) / len(runs)
                last = sum(sum(r[-window:]) / len(r[-window:]) for r in runs) / len(runs)
                parts.append(f"{label} {first:.3f}->{last:.3f}")
        lines.append(f"  {method:<7} " + ", ".join(parts))
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train/reward/reasoning", "reasoning reward"), ("train/reward/perception", "perception reward"),
              ("train/kl", "KL to the SFT model"), ("train/entropy", "entropy (sampled tokens)")]
    colour = {method: f"C{i}" for i, method in enumerate(results["methods"])}  # the same in every panel
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for method, entry in results["methods"].items():
            runs = [s["curves"].get(key) for s in entry["seeds"].values() if s.get("curves", {}).get(key)]
            if runs:
                n = min(len(r) for r in runs)
                mean = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
                k = max(1, n // 20)  # a moving average over ~5 % of the run
                smooth = [sum(mean[max(0, i - k + 1) : i + 1]) / len(mean[max(0, i - k + 1) : i + 1]) for i in range(n)]
                ax.plot(range(1, n + 1), smooth, label=method, color=colour[method])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[-1]
    for method, entry in results["methods"].items():
        seeds = list(entry["seeds"].values())
        if not seeds:
            continue
        start = results["sft"][METHODS[method][1]]["accuracy"]
        end = mean_se([s["accuracy"] for s in seeds])
        steps = results["settings"]["steps"]
        ax.errorbar([0, steps], [start, end.mean], yerr=[0, end.se], marker="o", capsize=3, label=method, color=colour[method])
    ax.set_title("held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--seeds", default="1,2,3", help="RL seeds, comma-separated (each: seed_everything and rollout.seed)")
    parser.add_argument("--methods", default="grpo,joint,pagrpo,tgrpo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_rl"), help="folder of every run and the results")
    parser.add_argument("--data", type=Path, default=Path("data/rl_testbed"), help="testbed data folder (made if absent)")
    parser.add_argument("--sft-steps", type=int, default=1200, help="SFT optimizer steps per recipe (batch 8)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: configs/tiny_rl.yaml's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per RL step (default: configs/tiny_rl.yaml's)")
    parser.add_argument("--lr", type=float, default=None, help="RL peak learning rate (default: configs/tiny_rl.yaml's)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # its lines reach a log file as they are printed
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    started = time.perf_counter()
    tiny_rl = yaml.safe_load((REPO / "configs/tiny_rl.yaml").read_text())
    steps = args.steps or tiny_rl["trainer"]["max_steps"]
    group_size, max_new = 8, TESTBED["max_completion_length"]
    overrides = [f"--trainer.max_steps={steps}", f"--model.init_args.rollout.max_completion_length={max_new}"]
    overrides += [f"--data.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"--model.init_args.lr={args.lr}"] if args.lr else []

    make_data(args.data)
    data = data_args(args.data.resolve())
    recipes = sorted({METHODS[m][1] for m in methods})
    windows = {recipe: length_windows(args.data, recipe) for recipe in recipes}
    total = len(recipes) + len(methods) * len(seeds)
    done = 0
    results: dict[str, Any] = {
        "settings": {"testbed": TESTBED, "seeds": seeds, "methods": methods, "steps": steps, "sft_steps": args.sft_steps,
                     "batch_size": args.batch_size, "lr": args.lr, "length_windows": windows, "group_size": group_size,
                     "command": " ".join(["python", "tools/compare_rl.py", *(argv if argv is not None else sys.argv[1:])])},
        "sft": {}, "methods": {m: {"seeds": {}} for m in methods},
    }
    starts = {}
    for recipe in recipes:
        done += 1
        log(f"[{done}/{total}] SFT {recipe} ({args.sft_steps} steps) and its held-out scores")
        starts[recipe] = run_sft(args.out, recipe, data, args.sft_steps)
        job = args.out / "sft" / recipe / "job.yaml"
        results["sft"][recipe] = cached(args.out / "sft" / recipe / "held_out.json",
                                        lambda: held_out(job, starts[recipe], data, group_size, max_new, TESTBED["n_test"]))
    for method in methods:
        for seed in seeds:
            done += 1
            log(f"[{done}/{total}] RL {method} seed {seed} ({steps} steps) and its held-out scores")
            recipe = METHODS[method][1]
            ckpt = run_rl(args.out, method, seed, starts[recipe], data, windows[recipe], overrides)
            run_dir = args.out / "runs" / method / f"seed{seed}"
            scores = cached(run_dir / "held_out.json",
                            lambda: held_out(run_dir / "job.yaml", ckpt, data, group_size, max_new, SAMPLED_CLIPS))
            results["methods"][method]["seeds"][str(seed)] = {**scores, "curves": train_curves(run_dir)}
    lines = diagnostics(results) + [""] + summarise(results)
    results["minutes"] = (time.perf_counter() - started) / 60
    write_json(args.out / "results.json", results)
    plot(results, args.out / "curves.png")
    print("\n".join(["", f"{results['minutes']:.1f} min; {args.out}/results.json, {args.out}/curves.png", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
