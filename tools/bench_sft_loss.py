"""Peak memory and time of the SFT loss head: full logits (before) against answer chunks (after).

    python tools/bench_sft_loss.py                        # CPU: hidden 512, answers of 512, 1024, 2048 tokens (~3 min)
    python tools/bench_sft_loss.py --lengths 1024 2048 4096   # CPU, longer answers (~9 min on one core, ~8 GB)
    python tools/bench_sft_loss.py --device cuda          # GPU: hidden 3584, answers of 1024, 4096, 8192 tokens
    python tools/bench_sft_loss.py [--lengths 1024 4096] [--hidden 3584] [--vocab 151936] [--chunk 512] [--repeats 3]

One forward + backward of the loss on a batch of one answer of T tokens: final hidden states
(1, T+1, H) and an LM head Linear(H, V) in bfloat16, both trainable, every position after the first
labelled. Before: ``p2r.algorithms.sft.masked_lm_loss`` on the head's full (1, T+1, V) logits,
as SFTModule computed it; after: ``p2r.algorithms.sft.chunked_lm_loss``, what SFTModule computes
now (``loss_chunk_tokens`` = ``--chunk`` tokens at a time, each chunk's logits recomputed in the
backward). The decoder layers are left out: they are the same in both. The defaults are
Qwen2.5-VL-7B's vocabulary (151,936 words) and, on CUDA, its width (3584); on CPU the width is 512
so that a run takes a few minutes (the logits, whose size does not depend on the width, are what
differs between the two). Before counts the answer's logits only; in training it also computed
those of the prompt and video tokens.

Each setting runs in its own process, which reports the peak memory its pass adds to what it held
just before (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident memory, reset through
/proc/self/clear_refs, Linux only; the highest of ``--repeats`` passes after a warm-up), the time
of every pass, printed as "median s (min-max, n=passes)" with the time ratio a ratio of medians,
and the loss, which must agree between the two.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench_common import Timing, bench_parser, resident_mib, timed

from p2r.algorithms.rollout import LOGPROB_CHUNK_TOKENS
from p2r.algorithms.sft import IGNORE_INDEX, chunked_lm_loss, masked_lm_loss

METHODS = ("plain", "chunked")
# Sizes per device: (hidden width, answer lengths); the vocabulary is Qwen2.5-VL's in both.
SIZES = {"cuda": (3584, [1024, 4096, 8192]), "cpu": (512, [512, 1024, 2048])}


def loss_pass(method: str, head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> Callable[[], float]:
    """One forward + backward of ``method``'s loss (gradients accumulate into head and hidden); returns the loss."""

    def run() -> float:
        if method == "plain":
            loss = masked_lm_loss(head(hidden), labels)  # logits (1, T+1, V)
        else:
            loss = chunked_lm_loss(hidden, head, labels, chunk)
        loss.backward()
        return float(loss.detach())

    return run


def peak_of(run: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """(MiB that ``run`` adds at its peak to what this process holds before it, the loss)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, loss
    before = resident_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what is resident now
    loss = run()
    return resident_mib("VmHWM") - before, loss


def child(method: str, length: int, args: argparse.Namespace) -> dict:
    """Build the head and one answer of ``length`` tokens, warm up, then measure ``args.repeats`` passes."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(1, length + 1, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)  # (1, T+1, H)
    labels = torch.randint(0, args.vocab, (1, length + 1), device=device)  # (1, T+1)
    labels[:, 0] = IGNORE_INDEX  # nothing predicts the first position: T scored tokens
    run = loss_pass(method, head, hidden, labels, args.chunk)
    run()  # warm-up: the gradients exist and the allocator and kernels settle before the measured passes
    peaks, seconds, losses = [], [], []
    for _ in range(args.repeats):
        seconds.append(timed(lambda: peaks.append(peak_of(run, device)), device))
        losses.append(peaks[-1][1])
    return {"peak_mib": max(p for p, _ in peaks), "seconds": seconds, "loss": losses[-1]}


def measure(method: str, length: int, args: argparse.Namespace) -> dict:
    """:func:`child` in a fresh process (so no setting inherits another's peak or cached memory)."""
    cmd = [sys.executable, __file__, "--child", method, str(length), "--device", args.device, "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[tuple[int, dict, dict]], chunk: int) -> list[str]:
    """The Markdown table of (answer tokens, plain result, chunked result) rows, ratios plain / chunked;
    times as median (min-max, n) of every pass's seconds, the time ratio one of medians."""
    lines = [f"| answer tokens | peak, full logits | peak, chunks of {chunk} | memory ratio | time, full logits "
             f"| time, chunks of {chunk} | time ratio (medians) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length, a, b in rows:
        ta, tb = Timing.of(a["seconds"]), Timing.of(b["seconds"])
        lines.append(f"| {length:,} | {a['peak_mib']:,.0f} MiB | {b['peak_mib']:,.0f} MiB | {a['peak_mib'] / b['peak_mib']:.1f}x "
                     f"| {ta} | {tb} | {ta.median / tb.median:.2f}x |")
    return lines


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(SIZES),
                        help="where the head runs (default: cuda if there is one)")
    parser.add_argument("--lengths", type=int, nargs="+", help="answer lengths in tokens (default: per device, see above)")
    parser.add_argument("--hidden", type=int, help="hidden width H (default: 3584 on cuda, 512 on cpu)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen2.5-VL-7B's: 151,936)")
    parser.add_argument("--chunk", type=int, default=LOGPROB_CHUNK_TOKENS, help="answer tokens per chunk (SFTModule's default)")
    parser.add_argument("--repeats", type=int, default=3, help="measured passes per setting (median and range of time, highest peak)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, lengths = SIZES[args.device]
    args.hidden, args.lengths = args.hidden or hidden, args.lengths or lengths
    if args.child:
        method, length = args.child
        print(json.dumps(child(method, int(length), args)))
        return

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"SFT loss head: Linear({args.hidden}, {args.vocab}) in bfloat16, batch 1, forward + backward; {where}; "
          f"{args.repeats} measured passes per setting: time median (min-max, n), highest peak")
    rows = []
    for length in args.lengths:
        plain, chunked = (measure(method, length, args) for method in METHODS)
        gap = abs(plain["loss"] - chunked["loss"])
        if gap > 1e-4 * abs(plain["loss"]):
            raise SystemExit(f"the two losses differ at {length} tokens: {plain['loss']} vs {chunked['loss']}")
        rows.append((length, plain, chunked))
    print("\n".join(table(rows, args.chunk)))


if __name__ == "__main__":
    main()
