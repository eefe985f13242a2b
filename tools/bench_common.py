"""What the benchmark tools share: their parser and the arguments that size a timed step, wall time
with the device synchronised, the summary of repeated timings (median, range, count), and the
process's memory.

Imported by ``tools/bench_*.py``, which run as scripts (so ``tools/`` is on ``sys.path``). It needs
torch and the standard library only, like ``tools/bench_gpu.py`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's parser: its module docstring as the description, flags matched exactly (no prefixes)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)


def add_step_shape(parser: argparse.ArgumentParser, new_tokens: int, video_and_model: bool = True) -> None:
    """The arguments that size a group of rollouts: G, the completion length and, with
    ``video_and_model``, the video prompt and the language model built from config."""
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens generated per completion (exactly)")
    if video_and_model:
        parser.add_argument("--frames", type=int, default=16, help="video frames per prompt")
        parser.add_argument("--side", type=int, default=308,
                            help="frame side in pixels (multiple of 28; 308: 968 vision tokens at 16 frames)")
        parser.add_argument("--hidden", type=int, default=256, help="language model width")
        parser.add_argument("--layers", type=int, default=4, help="language model layers")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds ``fn()`` takes, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class Timing(NamedTuple):
    """Repeated timings of one thing: their median, range and count.

    Headlines and ratios use the median: one slow run (a busy machine, a one-off set-up) drags a
    mean of a few runs far off (a 26 s round once turned 4.65x into 5.14x), a median barely moves.
    The range and the count say how much the figure can be trusted.

    >>> t = Timing.of([1.3, 1.1, 9.0, 1.2])  # one outlier: the mean would be 3.15
    >>> t.median, t.low, t.high, t.n
    (1.25, 1.1, 9.0, 4)
    >>> print(t)
    1.250 s (1.100-9.000, n=4)
    >>> print(Timing.of([0.5]))
    0.500 s (n=1)
    """

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Timing:
        """The summary of the seconds of every run (at least one)."""
        runs = list(seconds)
        return cls(statistics.median(runs), min(runs), max(runs), len(runs))

    def __str__(self) -> str:
        spread = f"{self.low:.3f}-{self.high:.3f}, " if self.n > 1 else ""
        return f"{self.median:.3f} s ({spread}n={self.n})"


def interleaved_timings(methods: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device | str | None = None) -> tuple[dict[str, float], dict[str, Timing]]:
    """Warm-up seconds and the :class:`Timing` of ``repeats`` runs of each method, the methods
    alternating run by run so that a load on the machine slows each alike."""
    warmup = {name: timed(fn, device) for name, fn in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn, device))
    return warmup, {name: Timing.of(t) for name, t in times.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset through /proc/self/clear_refs) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
