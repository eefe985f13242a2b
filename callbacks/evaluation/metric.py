"""Benchmark scores as a torchmetrics Metric, right across DDP ranks with categories unknown in advance.

A fixed-size state cannot hold keys nobody has seen yet (MVBench tasks, VSI question types,
whatever a new benchmark brings), and hashing keys into buckets loses their names and can
collide. So the state is one cat-reduced list of self-delimiting rows, one per scored sample::

    [score, n, c_1, ..., c_n]      c = Unicode code points of the key, as float64

where the key is the JSON text of ``[benchmark, category, metric family]``. Gathering concatenates
every rank's rows, in rank order, and each rank's block is a whole number of rows, so decoding
the gathered vector row by row gives every (key, score) exactly once. Code points and scores are
exact in float64; a test checks the totals of two DDP ranks against one process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

Key = tuple[str, str, str]  # (benchmark, category, metric family)


def encode_rows(keys: Sequence[Key], scores: Sequence[float]) -> list[float]:
    """The flat self-delimiting rows of some scored samples (see module doc).

    >>> encode_rows([("b", "c", "m")], [0.5])[:2]
    [0.5, 15.0]
    """
    flat: list[float] = []
    for key, score in zip(keys, scores, strict=True):
        text = json.dumps(list(key), ensure_ascii=False)
        flat += [float(score), float(len(text)), *(float(ord(c)) for c in text)]
    return flat


def decode_rows(flat: Sequence[float]) -> list[tuple[Key, float]]:
    """Inverse of :func:`encode_rows`; raises ``ValueError`` on a truncated vector.

    >>> decode_rows(encode_rows([("vsibench", "room_size_estimation", "mra")], [0.3]))
    [(('vsibench', 'room_size_estimation', 'mra'), 0.3)]
    """
    rows, i = [], 0
    while i < len(flat):
        if i + 2 > len(flat):
            raise ValueError("benchmark score rows are truncated")
        score, n = flat[i], int(flat[i + 1])
        codes = flat[i + 2 : i + 2 + n]
        if len(codes) != n:
            raise ValueError("benchmark score rows are truncated")
        benchmark, category, metric = json.loads("".join(chr(int(c)) for c in codes))
        rows.append(((benchmark, category, metric), score))
        i += 2 + n
    return rows


class BenchmarkScores(Metric):
    """Every scored sample's (benchmark, category, metric family) and score, gathered over ranks.

    ``compute()`` returns the list of ``((benchmark, category, metric), score)`` of all ranks;
    aggregation (means per family, category and benchmark) is done by
    :func:`callbacks.evaluation.report.summarize`, on plain Python floats.

    Call :meth:`on_device` rather than ``.to``: the rows are float64, and torchmetrics fills the
    state of a rank that saw no sample with an empty tensor of the metric's dtype, which ``.to``
    resets to float32; gathering float32 next to float64 would fail.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def on_device(self, device: torch.device | str) -> "BenchmarkScores":
        """Move to ``device`` with a float64 dtype (see class doc); returns self."""
        return self.to(device).set_dtype(torch.float64)

    def update(self, keys: Sequence[Key], scores: Sequence[float]) -> None:
        """Add scored samples: one key and one score each."""
        if keys:
            self.rows.append(torch.tensor(encode_rows(keys, scores), dtype=self.dtype, device=self.device))

    def compute(self) -> list[tuple[Key, float]]:
        # A list of per-update tensors locally; one tensor once synced across ranks.
        if isinstance(self.rows, list) and not self.rows:
            return []
        return decode_rows(dim_zero_cat(self.rows).tolist())
