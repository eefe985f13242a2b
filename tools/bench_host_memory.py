"""Host memory at start-up under FSDP2: the sum of the ranks' peak RSS, weights built on rank 0 only
(``FSDP2Strategy(weights_from_rank0=True)``, the default) against every rank building the whole model.

Each configuration is one Lightning run in a subprocess: N gloo ranks on this CPU build the backbone
(the real Qwen2.5-VL width from p2r/backbones/architectures, cut to a few layers so that N whole
copies fit in this machine's memory), shard it and stop before the first step; each rank reports
its peak resident memory (``ru_maxrss``, which includes the ~0.6 GiB every Python process with
torch, transformers and Lightning holds before building anything: the "bare" column). A node's
peak is bounded by that sum. The same number of ranks on one node as on the GPU machines: the
model memory per rank does not depend on the device, only the CUDA context is missing here.

    python tools/bench_host_memory.py                                     # 3B width, 2 layers, 2 and 4 ranks, SFT
    python tools/bench_host_memory.py --architecture qwen2_5_vl_7b --num-layers 1 --ranks 2 --job pagrpo

Prints a Markdown table (GiB) and writes it with the raw figures to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

WORKER = r'''
import json, resource, sys
import lightning as L
import torch

from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings
from p2r.algorithms.sft import SFTModule
from p2r.backbones.random_init import RandomInitQwen25VL
from p2r.strategies import FSDP2Strategy

out, architecture, layers, ranks, mode, job = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
bare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes; before any model exists


class Report(L.Callback):
    def on_fit_start(self, trainer, module):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        numbers = trainer.strategy.all_gather(torch.tensor([float(peak), float(bare)], dtype=torch.float64))
        if trainer.global_rank == 0:
            local = [getattr(p, "to_local", lambda: p)() for p in module.backbone.model.parameters()]  # this rank's shards
            weights = sum(t.numel() * t.element_size() for t in local)
            with open(out, "w") as f:
                json.dump({"peak": numbers[:, 0].tolist(), "bare": numbers[:, 1].tolist(), "shard_bytes_rank0": weights}, f)


backbone = RandomInitQwen25VL(architecture, num_layers=layers, vision_depth=2, dtype="float32")
module = SFTModule(backbone) if job == "sft" else PAGRPOModule(backbone, loss=LossSettings(beta=0.04))
strategy = FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32", weights_from_rank0=mode == "rank0")
trainer = L.Trainer(accelerator="cpu", devices=ranks, strategy=strategy, max_steps=0, logger=False, callbacks=[Report()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([[0]], batch_size=None))
'''


def weights_gib(architecture: str, layers: int) -> float:
    """Bytes of the whole float32 model (built on the meta device), in GiB."""
    import torch

    from p2r.backbones.random_init import RandomInitQwen25VL

    model = RandomInitQwen25VL(architecture, num_layers=layers, vision_depth=2)._make_empty_model(torch.float32)
    return sum(p.numel() * 4 for p in model.parameters()) / GIB


def measure(script: Path, result: Path, args: argparse.Namespace, ranks: int, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", JSONARGPARSE_DEPRECATION_WARNINGS="off")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), str(result), args.architecture, str(args.num_layers), str(ranks), mode,
                           args.job], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} ranks, {mode}: the run failed\n{done.stderr[-4000:]}")
    figures = json.loads(result.read_text())
    figures["seconds"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--architecture", default="qwen2_5_vl_3b", choices=["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
    parser.add_argument("--num-layers", type=int, default=2, help="decoder layers kept (the vision tower keeps 2 blocks)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="gloo ranks per run")
    parser.add_argument("--modes", nargs="+", default=["every_rank", "rank0"], choices=["every_rank", "rank0"],
                        help="every_rank: each rank builds the whole model (weights_from_rank0=False); rank0: the default")
    parser.add_argument("--job", default="sft", choices=["sft", "pagrpo"], help="pagrpo adds the bfloat16 reference copy")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_host_memory.json")
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    script = args.out.parent / "bench_host_memory_worker.py"
    script.write_text(WORKER)
    copy = weights_gib(args.architecture, args.num_layers)
    rows = []
    for ranks in args.ranks:
        figures = {mode: measure(script, args.out.with_suffix(f".{ranks}.{mode}.json"), args, ranks, mode) for mode in args.modes}
        rows.append({"ranks": ranks, **figures})
        line = "  ".join(f"{m}: sum of peaks {sum(f['peak']) / GIB:.2f} GiB ({f['seconds']:.0f} s)" for m, f in figures.items())
        print(f"{ranks} ranks  {line}", flush=True)
    header = f"| ranks | whole model (float32) | bare processes | " + " | ".join(f"sum of peak RSS, {m}" for m in args.modes)
    header += " | ratio |" if len(args.modes) == 2 else " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        peaks = [sum(row[m]["peak"]) / GIB for m in args.modes]
        bare = sum(row[args.modes[0]]["bare"]) / GIB
        ratio = f" {peaks[1] / peaks[0]:.2f} |" if len(peaks) == 2 else ""
        lines.append(f"| {row['ranks']} | {copy:.2f} | {bare:.2f} | " + " | ".join(f"{p:.2f}" for p in peaks) + " |" + ratio)
    table = "\n".join(lines)
    print(f"\n{args.architecture} cut to {args.num_layers} decoder layers + 2 vision blocks, {args.job}, GiB:\n\n{table}")
    args.out.write_text(json.dumps({"architecture": args.architecture, "num_layers": args.num_layers, "job": args.job,
                                    "whole_model_gib": copy, "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
