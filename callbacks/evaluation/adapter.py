"""What the evaluation callback asks of a benchmark: the small duck-typed adapter protocol.

The callback knows nothing about any benchmark. For each sample of a test or validation batch it
asks the adapter registered under the sample's benchmark name four things, and the adapter
answers from the sample it is handed (``p2r.evaluation`` implements them for the seven video
benchmarks and the synthetic set; another project writes its own):

- ``includes(sample)``: whether the sample belongs to the benchmark as reported (MMVU and
  VCR-Bench count their multiple-choice questions only); excluded samples are never generated;
- ``prompt(sample)``: the user text of the chat turn (the media placeholder is the module's job);
- ``category(sample)``: the breakdown key (VSI question type, MVBench task, VideoMME duration ...);
- ``score(sample, output)``: a :class:`Scored` (parsed answer, score in [0, 1], metric family,
  and any per-question details the aggregation needs).

and it reads one attribute, ``column``: the header of the benchmark in the summary table. Optional:

- ``generation(sample)``: a :class:`Generation` (the decoding settings the benchmark's protocol
  prescribes for this question), or None for the module's own evaluation settings;
- ``aggregate(rows)``: the benchmark's figure from its predictions lines (``score``, ``metric``,
  ``category``, ``parsed``, ``details``), a dict with ``figure`` (in the reference's units),
  ``units`` (``fraction`` or ``percent``) and ``categories``; without it the figure is the
  unweighted mean over metric families of each family's mean (a fraction);
- ``protocol``: the name of the scoring protocol; an adapter whose ``protocol`` is None takes the
  callback's ``protocol`` setting (the callback never interprets the name).

The only thing the callback reads from a sample itself is ``sample.benchmark`` (the evaluation
set it came from) and ``sample.record.id`` (unique within that set), to route and to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class Generation(NamedTuple):
    """Decoding settings for one question (what ``pl_module.generate_answers`` is asked to use)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def generate_by_setting(settings: list[Generation | None], generate: Callable[[list[int], dict[str, Any]], list[str]]) -> list[str]:
    """Outputs in input order, where inputs asking for different decoding settings are generated in
    separate calls: ``generate(indexes, kwargs)`` answers the inputs at ``indexes``, with ``kwargs``
    ``{}`` for None (the module's own settings) or ``{"generation": setting}``. One call per
    setting, in first-seen order.

    >>> calls = []
    >>> generate_by_setting([None, Generation(8), None], lambda i, kw: calls.append((i, kw)) or [f"out{j}" for j in i])
    ['out0', 'out1', 'out2']
    >>> calls
    [([0, 2], {}), ([1], {'generation': Generation(max_new_tokens=8, temperature=0.0, top_p=1.0)})]
    """
    outputs = [""] * len(settings)
    for setting in dict.fromkeys(settings):
        index = [i for i, x in enumerate(settings) if x == setting]
        for i, text in zip(index, generate(index, {} if setting is None else {"generation": setting})):
            outputs[i] = text
    return outputs


class Scored(NamedTuple):
    """One model output, scored.

    ``metric`` names the family the score belongs to ("accuracy", "mra", ...): a benchmark's
    figure is the unweighted mean over its families of each family's mean, which for VSI-Bench is
    the paper's mean of multiple-choice accuracy and MRA, and for a one-family benchmark is the
    plain mean over samples.
    """

    parsed: str | float | None  # what the scorer read from the output (None: nothing readable)
    score: float | None  # in [0, 1]; None: the protocol's aggregation leaves this answer out (counted as excluded)
    metric: str = "accuracy"  # the family this score is averaged in
    truth: Any = None  # the ground truth as the scorer read it, for the predictions file
    details: dict[str, Any] | None = None  # what the benchmark's aggregation needs besides the score (JSON values)


class BenchmarkAdapter(Protocol):
    """A benchmark as :class:`~callbacks.evaluation.callback.BenchmarkEvaluation` uses it (see module doc)."""

    column: str

    def includes(self, sample: Any) -> bool: ...

    def prompt(self, sample: Any) -> str: ...

    def category(self, sample: Any) -> str: ...

    def score(self, sample: Any, output: str) -> Scored: ...
