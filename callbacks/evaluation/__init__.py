"""Benchmark evaluation as a Lightning callback (never imports p2r).

- ``adapter``: the duck-typed ``BenchmarkAdapter`` protocol, the ``Scored`` result and ``Generation`` settings;
- ``metric``: ``BenchmarkScores``, a torchmetrics Metric right across DDP ranks;
- ``report``: summaries, results.json and the Markdown table, as pure functions;
- ``callback``: ``BenchmarkEvaluation``, the callback for test, validate and fit.
"""

from callbacks.evaluation.adapter import BenchmarkAdapter, Generation, Scored
from callbacks.evaluation.callback import BenchmarkEvaluation
from callbacks.evaluation.metric import BenchmarkScores

__all__ = ["BenchmarkAdapter", "BenchmarkEvaluation", "BenchmarkScores", "Generation", "Scored"]
