"""One command for one GPU: decode, SFT, PA-GRPO and FSDP checks on the real Qwen2.5-VL architectures.

    cd p2r && PYTHONPATH=$PWD python tools/bench_gpu.py              # one H200 / H100: at most ~8 minutes
    PYTHONPATH=$PWD python tools/bench_gpu.py --cpu --tiny           # the same code paths on a CPU (CI, ~1-2 min)
    PYTHONPATH=$PWD python tools/bench_gpu.py --only decode,pagrpo   # a subset of the sections

What the machine needs: torch, torchvision, transformers, lightning, peft, torchmetrics (and what
they depend on: tokenizers, pillow, numpy, pyyaml). No network and no weights: the models are the
real architectures built from their stored config.json values (p2r/backbones/architectures/) with
random weights, and the tokenizer is trained in-process. It never imports decord, webdataset,
jsonargparse, av or bitsandbytes (tests/tools/test_bench_gpu.py runs it with those hidden). p2r is
not installed: run from the clone with PYTHONPATH=$PWD (``pip install -e .`` would try to fetch
the data-path dependencies). To bring a missing package to an offline machine, on one with
network: ``pip download --no-deps <pkg>==<version> -d wheels/ --only-binary=:all:
--python-version 3.11 --platform manylinux2014_x86_64`` (match the target's Python), copy
``wheels/`` over, then ``pip install --no-index --find-links wheels/ <pkg>``.

Sections, each in its own process (its peak memory is its own; a failure stops only its row):
  decode  Qwen2.5-VL-7B in bf16: one video prompt of 16 frames at 448x448 (2,048 vision tokens,
          ~2,080 tokens in all), G = 8 sequences x 768 new tokens, no end token. Per decode engine
          of ``generate_groups`` (eager; compiled where this build has it): prefill seconds, ms per
          decode step ((rollout - prefill) / 767), tokens/s (8 x 768 / rollout) and the ratio to
          the bandwidth floor = bytes of the weights one decode step reads (decoder layers, final
          norm, lm_head; not the vision tower, not the embedding table) / the device's measured
          copy bandwidth (2 x buffer bytes / time of a device-to-device copy). The KV cache a step
          also reads is printed beside it. Prefill = a rollout of 1 token (no decode step), 3 runs;
          the rollout 1 run (3 on the tiny model); both printed as median (min-max, n), the other
          figures computed from those medians.
          On the tiny model a decode step is as short as the timing noise (the figures can even
          come out negative): there the row shows that the path runs, not its speed.
  sft     Qwen2.5-VL-3B, float32 master weights, bf16 autocast, gradient checkpointing, AdamW: one
          sample of 16 frames at 448x224 (the paper's 128x28x28 pixels: 1,024 vision tokens) and a
          ~512-token target, loss as SFTModule computes it. Step time: median (min-max, n) of
          ``--steps`` steps after a warm-up. Tokens/s and MFU = model FLOPs / median step
          time / peak. Model FLOPs = 6 x (language matmul weights x tokens + vision matmul weights x
          patches) + 6 x layers x tokens^2 x hidden (causal attention, forward + backward);
          checkpointing's recompute is not counted (the usual MFU convention). Peak: the dense
          bf16 spec where known (H100 SXM/H200 989, H100 PCIe 756, A100 312 TFLOP/s), else the measured bf16 matmul rate.
  pagrpo  one PA-GRPO step at the paper's shape: Qwen2.5-VL-3B, 1 prompt (16 frames at 448x224) x
          G = 8 x 768 tokens, shared prompt, beta 0.04, process_mean, one update (no old-policy pass),
          float32 master weights + bf16 autocast, gradient checkpointing, a float32 frozen reference
          copy as PAGRPOModule makes it, the fastest engine this build has: phase split and peak GPU
          memory, beside p2r.memory_plan's estimate for the same shape on one GPU; one timed step
          after a warm-up step.
  fsdp1   configs/strategy/fsdp.yaml (FSDPStrategy, bf16-mixed) on one GPU through the Lightning
          Trainer and SFTModule (3B): two steps run, the loss is finite, the weights moved; the time
          printed is the last step's (the first holds the set-up). CUDA only.
  fsdp2   configs/strategy/fsdp2.yaml (FSDP2Strategy, bf16 param_dtype) likewise (gloo on a CPU).
The training sections use 3B: 7B full fine-tuning with float32 master weights and Adam takes 16
bytes per parameter (133 GB) before activations, more than one GPU; sharded it fits (the plan).
``--tiny`` swaps in the tiny Qwen2.5-VL and small shapes; ``--cpu`` runs on the CPU.

Exit status 0 when every section ran and passed its checks, 1 otherwise; the last line says which.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_common import Timing, bench_parser, peak_rss_mib, synchronize, timed
from bench_step import StepSettings, fixed_length, one_step, rollout_engines

from p2r.algorithms.rollout import generate_groups
from p2r.algorithms.sft import answer_loss, sft_batch
from p2r.backbones import TinyQwen25VL
from p2r.backbones.batching import move_to
from p2r.backbones.random_init import RandomInitQwen25VL

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("decode", "sft", "pagrpo", "fsdp1", "fsdp2")
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}
QUESTION = "Describe what happens in the video, then answer: which way does the square move?"
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vision_hidden_size=32, vision_depth=2)


# --- shapes and models ---------------------------------------------------------------------------
def shapes(args) -> dict:
    """Frames, sides and lengths of each section: the paper-scale ones, or small ones with --tiny."""
    if args.tiny:
        return dict(decode_frames=8, decode_side=(112, 112), train_frames=8, train_side=(56, 112), target_tokens=32,
                    group=args.group_size or 8, new_tokens=args.new_tokens or 16)
    return dict(decode_frames=16, decode_side=(448, 448), train_frames=16, train_side=(224, 448), target_tokens=512,
                group=args.group_size or 8, new_tokens=args.new_tokens or 768)


def build(args, architecture: str, fixed: bool = False, num_layers: int | None = None, **options):
    """A built backbone: the architecture with random weights on the device, or the tiny preset."""
    device = device_of(args)
    if args.tiny:
        cls = fixed_length(TinyQwen25VL) if fixed else TinyQwen25VL
        backbone = cls(**TINY, **options)
    else:
        cls = fixed_length(RandomInitQwen25VL) if fixed else RandomInitQwen25VL
        backbone = cls(architecture, num_layers=num_layers, init_device=str(device), **options)
    backbone.build()
    backbone.model.to(device)
    return backbone


def device_of(args) -> torch.device:
    return torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")


def clip_of(frames: int, side: tuple[int, int], seed: int = 0):
    from p2r.data.video import Clip

    pixels = np.random.default_rng(seed).integers(0, 255, (frames, side[0], side[1], 3), dtype=np.uint8)
    return Clip(pixels, fps=2.0, frame_indices=list(range(frames)), total_frames=frames)


def peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    return int(peak_rss_mib() * 2**20), "peak RSS of the process"


def repeated(device: torch.device, fn, times: int = 10, rounds: int = 3) -> float:
    """Seconds per call of ``fn``: ``times`` calls per timing (launch and sync costs spread thin), best of ``rounds``:
    this measures what the device can do (bandwidth, matmul rate), which noise only ever lowers."""
    fn()  # warm-up
    return min(timed(lambda: [fn() for _ in range(times)], device) for _ in range(rounds)) / times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (64 MiB on a CPU), counting the read and the write."""
    n = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / repeated(device, lambda: dst.copy_(src))


def matmul_rate(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (n x n times n x n)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / repeated(device, lambda: a @ b)


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value, f"{key} dense bf16 spec"
    return matmul_rate(device), "measured bf16 matmul"


def vision_parameter_ids(model: nn.Module) -> set[int]:
    from p2r.backbones.base import VideoBackbone

    return {id(p) for p in VideoBackbone.vision_tower(model).parameters()}


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: everything but the vision tower and the
    embedding table (a lookup reads 8 rows); a tied lm_head is the embedding table and is read."""
    vision = vision_parameter_ids(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p for p in model.parameters() if id(p) not in vision}
    if embed is not head:
        params.pop(id(embed), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def model_flops(model: nn.Module, tokens: int, patches: int) -> float:
    """Training FLOPs of one forward + backward (see the module docstring)."""
    vision = vision_parameter_ids(model)
    lm = vit = merger = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            n = m.weight.numel()
            if id(m.weight) not in vision:
                lm += n
            elif "merger" in name:
                merger += n
            else:
                vit += n
    text = model.config.get_text_config()
    attention = 6 * text.num_hidden_layers * tokens**2 * text.hidden_size
    return 6 * (lm * tokens + vit * patches + merger * patches / 4) + attention


# --- sections ------------------------------------------------------------------------------------
def section_decode(args) -> dict:
    device, s = device_of(args), shapes(args)
    backbone = build(args, args.decode_arch, fixed=True, dtype="bfloat16", num_layers=args.layers)
    backbone.eval()
    prompts, clips = [backbone.render_prompt(QUESTION, "video")], [clip_of(s["decode_frames"], s["decode_side"])]
    g, t = s["group"], s["new_tokens"]
    bandwidth = copy_bandwidth(device)
    weights = decode_weight_bytes(backbone.model)

    def rollout(engine: str, tokens: int):
        gen = torch.Generator(device).manual_seed(args.seed)
        return generate_groups(backbone, prompts, clips, g, tokens, 1.0, 0.95, gen, engine=engine)

    first = rollout("eager", 2)
    prompt_tokens = int(first.prompts.tensors["attention_mask"].sum())
    text = backbone.model.config.get_text_config()
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    result = dict(ok=True, architecture="tiny" if args.tiny else args.decode_arch, prompt_tokens=prompt_tokens,
                  vision_tokens=int((first.prompts.tensors["input_ids"] == backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()),
                  group=g, new_tokens=t, bandwidth=bandwidth, weight_bytes=weights,
                  kv_bytes_per_step=g * (prompt_tokens + t / 2) * kv_per_token, engines={})
    for engine in rollout_engines():
        rollout(engine, t)  # warm-up: compilation, CUDA graph capture, allocator
        # Medians of 3 (of 3 full rollouts too on the tiny model, where noise is as large as the decode):
        # a 1-token rollout is the prompt's prefill and the first token, no decode step.
        prefill_runs = [timed(lambda: rollout(engine, 1), device) for _ in range(3)]
        out = []
        total_runs = [timed(lambda: out.append(rollout(engine, t)), device) for _ in range(3 if args.tiny else 1)]
        prefill, total = Timing.of(prefill_runs).median, Timing.of(total_runs).median
        lengths = {len(ids) for ids in out[0].completion_ids}
        if lengths != {t}:
            result["ok"] = False
            result.setdefault("problems", []).append(f"{engine}: completion lengths {sorted(lengths)}, expected {t}")
        step_ms = 1000 * (total - prefill) / max(1, t - 1)
        ratio = step_ms / (1000 * weights / bandwidth)
        if ratio < 0.9 and not args.tiny:  # faster than reading the weights once per step: timing or floor is wrong
            result["ok"] = False
            result.setdefault("problems", []).append(f"{engine}: {ratio:.2f}x the bandwidth floor is not physical")
        result["engines"][engine] = dict(prefill_runs=prefill_runs, total_runs=total_runs, step_ms=step_ms,
                                         tokens_per_s=g * t / total, floor_ratio=ratio)
    return result


def sft_inputs(backbone, s: dict):
    clip = clip_of(s["train_frames"], s["train_side"])
    words = "the red square moves left then the blue circle appears at the top and stays there until the end".split()
    target, n = "<observation>", 0
    while n < s["target_tokens"]:
        target += " " + words[n % len(words)]
        n = len(backbone.tokenizer(target, add_special_tokens=False)["input_ids"])
    target += "</observation>\n<think>Left.</think>\n<answer>A</answer>"
    batch, labels = sft_batch(backbone, [backbone.render_prompt(QUESTION, "video")], [clip], [target])
    return batch, labels, clip


def weight_sample(model: nn.Module, limit: int = 50_000_000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to 4 trainable tensors (below ``limit`` elements) and a copy, to see whether a step moved them."""
    picked = [p for p in model.parameters() if p.requires_grad and p.numel() < limit][:4]
    return [(p, p.detach().clone()) for p in picked]


def moved_fraction(sample) -> float:
    changed = sum(int((p.detach() != before).sum()) for p, before in sample)
    return changed / max(1, sum(before.numel() for _, before in sample))


def section_sft(args) -> dict:
    device, s = device_of(args), shapes(args)
    backbone = build(args, args.train_arch, dtype="float32", gradient_checkpointing=True, num_layers=args.layers)
    backbone.train()
    batch, labels, clip = sft_inputs(backbone, s)
    batch, labels = move_to(batch, device, torch.float32), labels.to(device)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = answer_loss(backbone, batch, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    step()  # warm-up
    sample = weight_sample(backbone.model)
    step_runs = [timed(step, device) for _ in range(args.steps)]
    seconds = Timing.of(step_runs).median
    tokens = int(batch["attention_mask"].sum())
    patches = int(batch["video_grid_thw"].prod(-1).sum())
    peak, kind = peak_flops(device)
    flops = model_flops(backbone.model, tokens, patches)
    moved = moved_fraction(sample)
    problems = [m for m, bad in (("loss not finite", not all(math.isfinite(x) for x in losses)),
                                 (f"only {moved:.1%} of the sampled float32 weights moved", moved < 0.5)) if bad]
    return dict(ok=not problems, problems=problems, architecture="tiny" if args.tiny else args.train_arch, tokens=tokens,
                step_runs=step_runs, tokens_per_s=tokens / seconds, mfu=flops / seconds / peak, peak_kind=kind, peak_flops=peak,
                loss=losses[-1], moved=moved, memory=peak_bytes(device))


def section_pagrpo(args) -> dict:
    from p2r.memory_plan import Setup, count, plan

    device, s = device_of(args), shapes(args)
    backbone = build(args, args.train_arch, fixed=True, dtype="float32", gradient_checkpointing=True, num_layers=args.layers)
    reference = copy.deepcopy(backbone.model).eval().requires_grad_(False)  # float32, as PAGRPOModule copies it
    optimizer = torch.optim.AdamW([p for p in backbone.model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01)
    side = s["train_side"]
    prompts, clips = [backbone.render_prompt(QUESTION, "video")], [clip_of(s["train_frames"], side)]
    engine = "compiled"
    settings = StepSettings(group_size=s["group"], new_tokens=s["new_tokens"], micro_batch=s["group"], seed=args.seed,
                            old_policy=False, engine=engine, autocast="bfloat16", token_segments=False)
    one_step(backbone, reference, optimizer, prompts, clips, settings, shared=True)  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, info = one_step(backbone, reference, optimizer, prompts, clips, settings, shared=True)
    memory = peak_bytes(device)
    setup = Setup(job="pagrpo", strategy="single", world=1, shard=1, shard_weights=True, stored="float32", compute="bfloat16",
                  autocast=True, precision="bf16-mixed", checkpointing=True, group_size=s["group"],
                  completion_tokens=s["new_tokens"], beta=0.04, micro_batch_size=s["group"], shared_prompt=True, rollout_engine=engine,
                  prompts_per_rank=1, vision_tokens=info["vision_tokens"][0],
                  text_tokens=info["prompt_tokens"][0] - info["vision_tokens"][0])
    estimate = plan(setup, count(backbone.model, setup))
    problems = [] if math.isfinite(info["loss"]) and math.isfinite(info["grad_norm"]) else ["loss or gradient norm not finite"]
    return dict(ok=not problems, problems=problems, architecture="tiny" if args.tiny else args.train_arch, engine=engine,
                times=times, loss=info["loss"], prompt_tokens=info["prompt_tokens"][0], group=s["group"],
                new_tokens=s["new_tokens"], memory=memory, plan_peak=estimate.peak, plan_persistent=estimate.persistent_total)


def section_fsdp(args, kind: str) -> dict:
    import importlib

    import lightning as L
    import yaml
    from torch.utils.data import DataLoader

    from p2r.algorithms.sft import SFTModule
    from p2r.data.datamodule import Sample
    from p2r.data.records import VideoRecord

    device = device_of(args)
    overlay = ROOT / "configs" / "strategy" / ("fsdp.yaml" if kind == "fsdp1" else "fsdp2.yaml")
    if kind == "fsdp1" and device.type != "cuda":
        return dict(ok=True, skipped=f"{overlay.relative_to(ROOT)} needs CUDA (torch's FSDP1 has no CPU support)")
    cfg = yaml.safe_load(overlay.read_text())
    node = cfg["trainer"]["strategy"]
    module_name, _, cls_name = node["class_path"].rpartition(".")
    strategy = getattr(importlib.import_module(module_name), cls_name)(**node.get("init_args", {}))
    options = cfg["model"]["init_args"]["backbone"]["init_args"]
    if args.tiny:
        backbone = TinyQwen25VL(**TINY, **options)
    else:
        backbone = RandomInitQwen25VL(args.train_arch, num_layers=args.layers, init_device=str(device), **options)
    module = SFTModule(backbone=backbone, lr=1e-5)
    record = VideoRecord(id="bench", problem=QUESTION, problem_type="multiple choice", data_type="video", path="bench.mp4",
                         solution="<answer>A</answer>", options=["left", "right"], observation="The square moves left.",
                         process="It moves left, so A.")
    s = shapes(args)
    batch = [Sample(record, clip_of(s["train_frames"], s["train_side"]))]

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.sample, self.moved, self.step_s, self._start = [], 0.0, 0.0, 0.0

        def on_train_start(self, trainer, pl_module):
            local = [(p, p.to_local() if hasattr(p, "to_local") else p) for p in pl_module.parameters() if p.requires_grad]
            self.sample = [(t, t.detach().clone()) for _, t in local if 0 < t.numel() < 50_000_000][:4]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            self.step_s = time.perf_counter() - self._start

        def on_train_end(self, trainer, pl_module):
            self.moved = moved_fraction(self.sample)

    watch = Watch()
    trainer = L.Trainer(accelerator=device.type if device.type == "cpu" else "gpu", devices=1, strategy=strategy,
                        precision=cfg["trainer"]["precision"], max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[watch])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None, collate_fn=lambda b: b))
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    problems = [m for m, bad in ((f"{trainer.global_step} steps, expected {args.steps}", trainer.global_step != args.steps),
                                 ("loss not finite", not math.isfinite(loss)),
                                 (f"only {watch.moved:.1%} of the sampled weights moved", watch.moved < 0.5)) if bad]
    compute = node.get("init_args", {}).get("param_dtype") or cfg["trainer"]["precision"]
    return dict(ok=not problems, problems=problems, overlay=str(overlay.relative_to(ROOT)), strategy=cls_name,
                precision=f"{cfg['trainer']['precision']}, compute {compute}", steps=trainer.global_step, loss=loss, step_s=watch.step_s,
                moved=watch.moved, memory=peak_bytes(device), architecture="tiny" if args.tiny else args.train_arch)


def run_section(args, name: str) -> dict:
    torch.manual_seed(args.seed)
    if name == "decode":
        return section_decode(args)
    if name == "sft":
        return section_sft(args)
    if name == "pagrpo":
        return section_pagrpo(args)
    return section_fsdp(args, name)


# --- the parent: one process per section, then the table -----------------------------------------
def launch(name: str, timeout: float) -> dict:
    """Run one section in a child process; its RESULT line, or a failure with the cause."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--section", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(ok=False, problems=[f"stopped after {timeout:.0f} s: the --budget ran out"])
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return dict(ok=False, problems=[f"exit {proc.returncode}: {tail[0][:300]}"], log=(proc.stdout + proc.stderr)[-4000:])
    return json.loads(line[len("RESULT "):])


def _gb(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def render(results: dict[str, dict], header: str) -> tuple[list[str], bool]:
    """The table lines and whether every section passed."""
    lines = [header]
    for name, r in results.items():
        if not r.get("ok"):
            lines.append(f"{name:<8} FAILED: {'; '.join(r.get('problems', ['unknown']))}")
            continue
        if r.get("skipped"):
            lines.append(f"{name:<8} skipped: {r['skipped']}")
            continue
        if name == "decode":
            floor_ms = 1000 * r["weight_bytes"] / r["bandwidth"]
            lines.append(f"{name:<8} {r['architecture']} bf16: 1 prompt of {r['prompt_tokens']:,} tokens ({r['vision_tokens']:,} vision), "
                         f"{r['group']} sequences x {r['new_tokens']} new tokens; floor {floor_ms:.2f} ms/step = "
                         f"{_gb(r['weight_bytes'])} of weights per step / {_gb(r['bandwidth'])}/s measured copy "
                         f"bandwidth (+ {_gb(r['kv_bytes_per_step'])} of KV cache per step on average)")
            lines.append(f"{'':<9}{'engine':<10}{'prefill':>28}{'rollout':>28}{'ms/step':>10}{'tokens/s':>11}{'x floor':>9}"
                         "   (times: median (min-max, n); the rest from the medians)")
            for engine, e in r["engines"].items():
                prefill, total = Timing.of(e["prefill_runs"]), Timing.of(e["total_runs"])
                lines.append(f"{'':<9}{engine:<10}{prefill!s:>28}{total!s:>28}{e['step_ms']:>10.2f}{e['tokens_per_s']:>11.1f}"
                             f"{e['floor_ratio']:>9.2f}")
        elif name == "sft":
            lines.append(f"{name:<8} {r['architecture']}, float32 master + bf16 autocast, checkpointing: 1 x {r['tokens']:,} tokens: "
                         f"{Timing.of(r['step_runs'])} per step, {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.3g} % "
                         f"(of {r['peak_flops'] / 1e12:.0f} TFLOP/s, {r['peak_kind']}); loss {r['loss']:.3f}, "
                         f"{100 * r['moved']:.0f} % of sampled weights moved; peak {_gib(r['memory'][0])} ({r['memory'][1]})")
        elif name == "pagrpo":
            phases = " | ".join(f"{k} {v:.3f} s" for k, v in r["times"].items())
            lines.append(f"{name:<8} {r['architecture']}, 1 prompt of {r['prompt_tokens']:,} tokens x G {r['group']} x {r['new_tokens']}, "
                         f"shared prompt, {r['engine']} rollout, float32 master + bf16 autocast, checkpointing:")
            lines.append(f"{'':<9}one timed step (n=1): {phases} | whole step {sum(r['times'].values()):.3f} s")
            lines.append(f"{'':<9}peak {_gib(r['memory'][0])} ({r['memory'][1]}); memory plan {_gib(r['plan_peak'])} "
                         f"(estimate; its exact part {_gib(r['plan_persistent'])}); loss {r['loss']:.5f}")
        else:
            lines.append(f"{name:<8} {r['overlay']} ({r['strategy']}, {r['precision']}), {r['architecture']}: {r['steps']} steps ran, "
                         f"loss {r['loss']:.3f}, last step {r['step_s']:.3f} s (n=1), {100 * r['moved']:.0f} % of sampled weights moved, "
                         f"peak {_gib(r['memory'][0])} ({r['memory'][1]})")
    failed = [name for name, r in results.items() if not r.get("ok")]
    lines.append(f"FAILED: {', '.join(failed)}" if failed else f"all {len(results)} sections passed")
    return lines, not failed


def machine_line(args) -> str:
    import transformers

    device = device_of(args)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return (f"bench_gpu: {where}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{'tiny models and shapes' if args.tiny else 'Qwen2.5-VL architectures, random weights'}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen2.5-VL and small shapes (seconds on a CPU)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--decode-arch", default="qwen2_5_vl_7b", help="architecture of the decode section")
    parser.add_argument("--train-arch", default="qwen2_5_vl_3b", help="architecture of the training sections")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of every real-architecture model (default: all; e.g. 18 fits the training sections in 80 GB)")
    parser.add_argument("--group-size", type=int, default=None, help="sequences per prompt (default 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per sequence (default 768; 16 with --tiny)")
    parser.add_argument("--steps", type=int, default=2, help="timed SFT steps and FSDP steps")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all sections; a section past it counts as failed")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, frames and sampling")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section, print JSON
    args = parser.parse_args()
    if args.section:
        try:
            result = run_section(args, args.section)
        except Exception:
            traceback.print_exc()
            raise SystemExit(1)
        print("RESULT " + json.dumps(result))
        return
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    results = {}
    deadline = time.monotonic() + args.budget
    for name in chosen:
        left = deadline - time.monotonic()
        results[name] = launch(name, left) if left > 5 else dict(ok=False, problems=[f"not started: the {args.budget:.0f} s budget is spent"])
        if "log" in results[name]:
            sys.stderr.write(f"--- {name} output (tail) ---\n{results[name]['log']}\n")
    lines, ok = render(results, machine_line(args))
    print("\n".join(lines))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
