"""What ``BenchmarkEvaluation(analyses=[...])`` asks of an analysis, and the small helpers they share.

An analysis reads each answer of a ``test`` run as it is scored, stores a per-sample reading in that
answer's ``predictions.jsonl`` line (under ``analyses.<name>``, so a user can audit every reading,
a resumed run keeps them, and several ranks' readings merge like the answers do), and at the end
turns the readings into a block of ``results.json`` (under ``analyses.<name>``). p2r ships two,
each in its own file: :class:`~callbacks.evaluation.text_only.TextOnlyAnswering` (VideoP2R's
Table 5) and :class:`~callbacks.evaluation.think_answer.ThinkAnswerMismatch` (Table 6). The
protocol, duck-typed like the benchmark adapters':

- ``name``: the key of its readings and of its results block;
- ``analyse(items, pl_module) -> list[dict]``: one JSON reading per :class:`Item` (one scored answer);
- ``summarize(rows, figure) -> dict``: the results block from the predictions lines that hold a
  reading, per benchmark (``rows[benchmark]``); ``figure(benchmark, rows)`` is the benchmark's
  figure under the run's protocol for any list of predictions-like lines (its adapter's
  ``aggregate``), so an analysis can score other answers exactly as the run scores its own;
- ``scalars(block) -> dict[str, float]``: what is logged, as ``test/analysis/<name>/<key>``;
- ``markdown(block) -> str``: the table printed after the benchmark table.

Analyses run in ``test`` only: validation has no predictions file to hold the readings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from callbacks.evaluation.adapter import BenchmarkAdapter, Scored

Figure = Callable[[str, list[dict[str, Any]]], dict[str, Any]]
"""``figure(benchmark, rows)``: the protocol's figure of predictions-like lines (``figure``, ``units``, ...)."""


class Item(NamedTuple):
    """One scored answer of a test batch, as an analysis sees it."""

    sample: Any  # the evaluation sample (``sample.record``, ``sample.benchmark``)
    adapter: BenchmarkAdapter  # its benchmark's adapter: prompt, generation settings, scoring
    prompt: str  # the user text the model answered
    output: str  # the model's whole output
    scored: Scored  # the output scored under the run's protocol


class Analysis(Protocol):
    """An analysis as :class:`~callbacks.evaluation.callback.BenchmarkEvaluation` uses it (see module doc)."""

    name: str

    def analyse(self, items: list[Item], pl_module: Any) -> list[dict[str, Any]]: ...

    def summarize(self, rows: dict[str, list[dict[str, Any]]], figure: Figure) -> dict[str, Any]: ...

    def scalars(self, block: dict[str, Any]) -> dict[str, float]: ...

    def markdown(self, block: dict[str, Any]) -> str: ...


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard error of the mean (sample standard deviation / sqrt(n); None below two
    values) and n, for results.json.

    >>> mean_se([1.0, 0.0, 1.0, 0.0])
    {'mean': 0.5, 'se': 0.288675, 'n': 4}
    """
    n = len(values)
    if not n:
        return {"mean": None, "se": None, "n": 0}
    mean = math.fsum(values) / n
    se = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": round(mean, 6), "se": None if se is None else round(se, 6), "n": n}


def reading_of(row: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The reading analysis ``name`` stored in a predictions line, or None."""
    return (row.get("analyses") or {}).get(name)
