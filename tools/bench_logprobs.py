"""Peak memory of the log-prob passes: the LM head a chunk of tokens at a time against all at once.

    python tools/bench_logprobs.py [--vocab 152064] [--group-size 8] [--new-tokens 128] [--chunk 512] [--repeats 1]

A Qwen2.5-VL built from config, its vocabulary widened to ``--vocab`` words (Qwen2.5-VL's is
152,064; the logits, not the model, are what this measures), one video prompt and G completions
of ``--new-tokens`` random tokens. For both paths (per-sample rows:
``p2r.algorithms.rollout.completion_logprobs``; one shared-prompt row:
``p2r.algorithms.shared_prompt.shared_prompt_logprobs``) and both passes (reference: no
gradients; policy: forward and backward), the head runs on ``--chunk`` tokens at a time (p2r's
default) and on every token in one chunk, which holds the whole (tokens x vocabulary) logits as
computing them in the model's forward does. Each setting runs in its own process, which after a
warm-up pass runs ``--repeats`` measured passes and reports the highest peak resident memory above
what it held just before a pass (Linux: the high-water mark is reset through /proc/self/clear_refs)
and the pass time as "median s (min-max, n=passes)"; side by side in one run. The memory ratios are
of those peaks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench_common import Timing, add_step_shape, bench_parser, resident_mib, timed

from p2r.algorithms.rollout import GroupRollout, build_train_batch, completion_logprobs, prepare_prompts
from p2r.algorithms.shared_prompt import shared_prompt_logprobs
from p2r.backbones import TinyQwen25VL
from p2r.data.video import Clip

PATHS = ("per-sample", "shared")
PASSES = ("reference", "policy")


def make_rollout(backbone: TinyQwen25VL, group_size: int, new_tokens: int) -> GroupRollout:
    """One 16-frame video prompt and G completions of random ordinary tokens."""
    rng = np.random.default_rng(0)
    clip = Clip(rng.integers(0, 255, (16, 112, 112, 3), dtype=np.uint8), fps=2.0, frame_indices=list(range(16)),
                total_frames=16)
    prompt = backbone.render_prompt("Describe what happens in the video, then answer: which way does it move?", "video")
    prompts = prepare_prompts(backbone, [prompt], [clip])
    special = set(backbone.tokenizer.all_special_ids)
    words = np.array([i for i in range(len(backbone.tokenizer)) if i not in special])
    completions = [rng.choice(words, new_tokens).tolist() for _ in range(group_size)]
    return GroupRollout(prompts, group_size, completions, [True] * group_size)


def child(path: str, phase: str, chunk: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    backbone = TinyQwen25VL(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, vision_hidden_size=128,
                            vision_depth=2, seed=0)
    backbone.build()
    backbone.model.resize_token_embeddings(args.vocab)
    backbone.eval()
    rollout = make_rollout(backbone, args.group_size, args.new_tokens)
    rows = list(range(args.group_size))

    def run() -> None:
        with torch.set_grad_enabled(phase == "policy"):
            if path == "shared":
                logp, mask = shared_prompt_logprobs(backbone, rollout, [0], chunk_tokens=chunk)
            else:
                batch = build_train_batch(backbone, rollout, rows)
                logp, mask = completion_logprobs(backbone, batch, chunk_tokens=chunk), batch.completion_mask
            if phase == "policy":
                (logp * mask).sum().backward()

    run()  # warm-up: allocator and kernels settle, gradients exist, before the measured passes
    peaks, seconds = [], []
    for _ in range(args.repeats):
        before = resident_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
        seconds.append(timed(run))
        peaks.append(resident_mib("VmHWM") - before)
    return {"peak_mib": max(peaks), "seconds": seconds}


def row(path: str, phase: str, whole: dict, chunked: dict) -> tuple[str, float]:
    """One printed row from the two settings' child results (every pass's seconds), and its memory ratio."""
    ratio = whole["peak_mib"] / chunked["peak_mib"]
    cells = [f"{r['peak_mib']:8.0f} MiB {Timing.of(r['seconds'])!s:<27}" for r in (whole, chunked)]
    return f"{path:<11} {phase:<10} {cells[0]} {cells[1]} {ratio:12.2f}x", ratio


def main() -> None:
    parser = bench_parser(__doc__)
    add_step_shape(parser, new_tokens=128, video_and_model=False)
    parser.add_argument("--vocab", type=int, default=152064, help="vocabulary size of the LM head")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per LM-head chunk (p2r's default)")
    parser.add_argument("--repeats", type=int, default=1, help="measured passes per setting (median time, highest peak)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "PASS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        path, phase, chunk = args.child
        print(json.dumps(child(path, phase, int(chunk), args)))
        return

    tokens = args.group_size * args.new_tokens
    whole = 10 * tokens  # one chunk holds every token
    print(f"model: Qwen2.5-VL from config (hidden 256, 4 layers), vocabulary {args.vocab}, cpu, {args.threads} threads")
    print(f"G = {args.group_size} completions x {args.new_tokens} tokens = {tokens} log-probs; "
          f"all logits in fp32: {tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"peak: highest of {args.repeats} pass(es); time: median (min-max, n)")
    print(f"{'path':<11} {'pass':<10} {'one chunk':<40} {f'chunks of {args.chunk}':<40} {'memory ratio':>13}")
    ratios = []
    for path in PATHS:
        for phase in PASSES:
            result = {}
            for chunk in (whole, args.chunk):
                cmd = [sys.executable, __file__, "--child", path, phase, str(chunk), "--vocab", str(args.vocab),
                       "--group-size", str(args.group_size), "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                result[chunk] = json.loads(out.strip().splitlines()[-1])
            line, ratio = row(path, phase, result[whole], result[args.chunk])
            ratios.append(ratio)
            print(line)
    print(f"peak memory, one chunk / chunked: {min(ratios):.2f}x to {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
