"""Time one whole PA-GRPO step: shared-prompt training passes against the per-sample path.

    python tools/bench_step.py                       # CPU default (a 3.9M Qwen2.5-VL), about 1 minute
    python tools/bench_step.py --hidden 3584 --layers 4 --heads 28 --kv-heads 4 \\
        --vision-hidden 1280 --vision-depth 8 --dtype bfloat16 --attn sdpa   # real width, on a GPU

The step, as PAGRPOModule runs it (p2r/algorithms/pagrpo.py):
  rollout                   p2r.algorithms.rollout.generate_groups (the same for both paths);
  old-policy log-probs      no-grad pass (the module needs it when num_iterations > 1);
  reference log-probs       no-grad pass under the reference (LoRA off, or a frozen copy);
  policy forward+backward   log-probs with grad, pagrpo_loss (segment_mean), backward;
  optimizer step            grad-norm clip 5, AdamW.
The per-sample path runs each (prompt, completion) as its own row (build_train_batch +
completion_logprobs, micro-batches of --micro-batch rows); the shared path runs one row per
prompt (p2r.algorithms.shared_prompt, --micro-batch // G prompts per forward).

Same model (built from config, random weights, seeded), same video prompts, same seed for both.
Every completion is exactly --new-tokens long (no token ends a sample), so both do the same
work. Rewards are not part of the step (the same for both paths): advantages are seeded random
numbers. Each path runs in its own process, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` over the timed step; on CPU the peak resident set size of
the process (``resource.getrusage``, ru_maxrss: Python, torch and the model included, so the
figure before the step is printed too). The loss and gradient norm of both paths are printed as
a check that they computed the same step. The last line is ``speedup: <x>``, per-sample time /
shared time for the whole step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from p2r.algorithms.pagrpo import micro_batches, micro_weight
from p2r.algorithms.policy_loss import pagrpo_loss
from p2r.algorithms.rollout import build_train_batch, completion_logprobs, generate_groups, perception_masks
from p2r.algorithms.shared_prompt import shared_prompt_logprobs, supports_shared_prompt
from p2r.backbones import LoraOptions, TinyQwen25VL
from p2r.data.video import Clip

PHASES = ("rollout", "old-policy log-probs", "reference log-probs", "policy forward+backward", "optimizer step")
PATHS = ("per-sample", "shared")


class FixedLengthQwen25VL(TinyQwen25VL):
    """No token ends a completion: every sample is exactly max_new_tokens long."""

    @property
    def eos_token_ids(self) -> list[int]:
        return []


class PhaseTimer:
    """Wall time of consecutive phases (the device synchronised at each boundary)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}
        self._sync()
        self._last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, phase: str | None) -> None:
        """Charge the time since the last lap to ``phase`` (None: to nothing)."""
        self._sync()
        now = time.perf_counter()
        if phase is not None:
            self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now


def make_prompts(backbone, args) -> tuple[list[str], list[Clip]]:
    """--prompts video prompts (seeded frames) with questions of different lengths."""
    rng = np.random.default_rng(args.seed)
    questions = ["Describe what happens in the video, then answer: which way does the square move?",
                 "How many objects cross the frame from left to right before the end of the clip?"]
    prompts, clips = [], []
    for i in range(args.prompts):
        frames = rng.integers(0, 255, (args.frames, args.side, args.side, 3), dtype=np.uint8)
        clips.append(Clip(frames, fps=2.0, frame_indices=list(range(args.frames)), total_frames=args.frames))
        prompts.append(backbone.render_prompt(questions[i % len(questions)], "video"))
    return prompts, clips


def one_step(backbone, reference, optimizer, prompts, clips, args, shared: bool) -> tuple[dict, dict]:
    """One PA-GRPO step; returns the time per phase and {loss, grad_norm, prompt/vision tokens}."""
    device, g = backbone.model.device, args.group_size
    timer = PhaseTimer(device)
    backbone.eval()
    gen = torch.Generator(device).manual_seed(args.seed)
    rollout = generate_groups(backbone, prompts, clips, g, args.new_tokens, 1.0, 0.95, gen)
    timer.lap("rollout")

    backbone.train()
    n = len(rollout.completion_ids)
    if shared:
        chunks = micro_batches(len(prompts), max(1, args.micro_batch // g))

        def logprobs(chunk, model=None):
            return shared_prompt_logprobs(backbone, rollout, chunk, model=model)
    else:
        chunks = micro_batches(n, args.micro_batch)

        def logprobs(chunk, model=None):
            batch = build_train_batch(backbone, rollout, chunk)
            return completion_logprobs(backbone, batch, model=model), batch.completion_mask

    with torch.no_grad():
        old = [logprobs(chunk)[0] for chunk in chunks]
    timer.lap("old-policy log-probs")
    with torch.no_grad(), reference_policy(backbone, reference) as ref_model:
        ref = [logprobs(chunk, ref_model)[0] for chunk in chunks]
    timer.lap("reference log-probs")

    # Not timed: the same numbers for both paths (seeded advantages, perception spans).
    _, perception = perception_masks(backbone.tokenizer, rollout.completion_ids)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(args.seed + 1))  # (N,)
    masks = torch.zeros(n, args.new_tokens, dtype=torch.bool)  # (N, T) all completion tokens
    for i, ids in enumerate(rollout.completion_ids):
        masks[i, : len(ids)] = True
    timer.lap(None)

    total = 0.0
    start = 0
    for chunk, old_logp, ref_logp in zip(chunks, old, ref):
        logp, mask = logprobs(chunk)  # (n, T), (n, T)
        rows = list(range(start, start + logp.shape[0]))
        start += logp.shape[0]
        t = logp.shape[1]
        perception_mask = torch.zeros(len(rows), t, dtype=torch.bool)  # (n, T)
        for r, i in enumerate(rows):
            perception_mask[r, : len(perception[i])] = torch.tensor(perception[i], dtype=torch.bool)
        loss, _ = pagrpo_loss(
            logp, old_logp, ref_logp, adv[rows].to(device)[:, None].expand(-1, t), mask,
            beta=0.04, eps_low=0.2, mode="segment_mean", perception_mask=perception_mask.to(device),
        )
        weight = micro_weight("segment_mean", masks[rows], masks)
        (loss * weight).backward()
        total += float(loss.detach()) * weight
    timer.lap("policy forward+backward")
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 5.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.lap("optimizer step")
    info = {"loss": total, "grad_norm": grad_norm, "prompt_tokens": [int(it["input_ids"].shape[1]) for it in rollout.prompts.items],
            "vision_tokens": [int((it["input_ids"] == backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
                              for it in rollout.prompts.items]}
    return timer.times, info


@contextlib.contextmanager
def reference_policy(backbone, reference):
    """The reference model to pass to the log-prob functions: the policy with its LoRA adapters off,
    or the frozen copy (as PAGRPOModule does)."""
    if reference is None:
        with backbone.adapters_disabled():
            yield backbone.model
        return
    yield reference


def run_path(args, path: str) -> dict:
    """Build everything, run the warm-up steps, time one step of ``path``; all in this process."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora = LoraOptions(r=args.lora, alpha=2 * args.lora, dropout=0.0) if args.lora else None
    backbone = FixedLengthQwen25VL(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        vision_hidden_size=args.vision_hidden, vision_depth=args.vision_depth, seed=args.seed,
        dtype=args.dtype, attn_implementation=args.attn, lora=lora, freeze_vision=args.freeze_vision,
    )
    backbone.build()
    backbone.model.to(device)
    if path == "shared":
        ok, reason = supports_shared_prompt(backbone)
        if not ok:
            raise SystemExit(f"shared prompt refused: {reason}")
    reference = None if lora else backbone.frozen_copy(next(backbone.model.parameters()).dtype)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
    prompts, clips = make_prompts(backbone, args)
    for _ in range(args.warmup):
        one_step(backbone, reference, optimizer, prompts, clips, args, path == "shared")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, info = one_step(backbone, reference, optimizer, prompts, clips, args, path == "shared")
    if device.type == "cuda":
        memory = {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda max_memory_allocated"}
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = {"peak_mib": after, "before_mib": before, "kind": "peak RSS of the process"}
    info.update(times=times, memory=memory, device=str(device), threads=torch.get_num_threads(),
                params_m=sum(p.numel() for p in backbone.model.parameters()) / 1e6)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompts", type=int, default=1, help="video prompts per step")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per completion (exactly)")
    parser.add_argument("--frames", type=int, default=16, help="video frames per prompt")
    parser.add_argument("--side", type=int, default=308, help="frame side in pixels (multiple of 28; 308: 968 vision tokens at 16 frames)")
    parser.add_argument("--hidden", type=int, default=256, help="language model width")
    parser.add_argument("--layers", type=int, default=4, help="language model layers")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--vision-hidden", type=int, default=128, help="vision tower width")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision tower blocks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning, reference = frozen copy)")
    parser.add_argument("--freeze-vision", action="store_true", help="keep the vision tower frozen")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward in the per-sample path (shared: this // G prompts)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, threads waiting for a busy core slow small ops 10-60x)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, frames, sampling and advantages")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: run one path, print JSON
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 1 if torch.cuda.is_available() else 0
    if args.path:
        print("RESULT " + json.dumps(run_path(args, args.path)))
        return

    results = {}
    for path in PATHS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"the {path} run failed (exit {proc.returncode})")
        results[path] = json.loads(line[len("RESULT "):])
    first = results["shared"]
    print(f"model: Qwen2.5-VL from config, {first['params_m']:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), "
          f"{first['device']} {args.dtype} {args.attn}, {first['threads']} threads, "
          f"{'LoRA r=' + str(args.lora) if args.lora else 'full fine-tuning'}")
    print(f"step: {args.prompts} prompt(s) of {first['prompt_tokens']} tokens ({first['vision_tokens']} vision) x G = "
          f"{args.group_size}, {args.new_tokens} new tokens each, micro-batch {args.micro_batch} rows, warm-up steps {args.warmup}")
    print(f"{'phase':<26}{'per-sample':>12}{'shared':>12}{'ratio':>9}")
    totals = {p: sum(results[p]["times"].values()) for p in PATHS}
    for phase in PHASES:
        a, b = (results[p]["times"][phase] for p in PATHS)
        print(f"{phase:<26}{a:>10.3f} s{b:>10.3f} s{a / b:>8.2f}x")
    print(f"{'whole step':<26}{totals['per-sample']:>10.3f} s{totals['shared']:>10.3f} s{totals['per-sample'] / totals['shared']:>8.2f}x")
    for p in PATHS:
        r = results[p]
        mem = r["memory"]
        extra = f" (before the step {mem['before_mib']:.0f} MiB)" if "before_mib" in mem else ""
        print(f"{p:<11} loss {r['loss']:.6f}  grad norm {r['grad_norm']:.6f}  peak memory {mem['peak_mib']:.0f} MiB{extra} [{mem['kind']}]")
    print(f"speedup: {totals['per-sample'] / totals['shared']:.2f}")


if __name__ == "__main__":
    main()
