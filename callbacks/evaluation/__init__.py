"""Benchmark evaluation as a Lightning callback (never imports p2r).

- ``adapter``: the duck-typed ``BenchmarkAdapter`` protocol, the ``Scored`` result and ``Generation`` settings;
- ``metric``: ``BenchmarkScores``, a torchmetrics Metric right across DDP ranks;
- ``report``: summaries, results.json and the Markdown table, as pure functions;
- ``callback``: ``BenchmarkEvaluation``, the callback for test, validate and fit;
- ``analysis``: what the callback's ``analyses`` are asked; the two p2r ships:
  ``text_only`` (observation-only / question-only answering, VideoP2R's Table 5) and
  ``think_answer`` (think-answer mismatch, Table 6).
"""

from callbacks.evaluation.adapter import BenchmarkAdapter, Generation, Scored
from callbacks.evaluation.callback import BenchmarkEvaluation
from callbacks.evaluation.metric import BenchmarkScores
from callbacks.evaluation.text_only import ModuleTextAnswerer, OpenAIChatAnswerer, TextOnlyAnswering
from callbacks.evaluation.think_answer import OpenAIMismatchJudge, RuleMismatchJudge, ThinkAnswerMismatch

__all__ = [
    "BenchmarkAdapter", "BenchmarkEvaluation", "BenchmarkScores", "Generation", "ModuleTextAnswerer",
    "OpenAIChatAnswerer", "OpenAIMismatchJudge", "RuleMismatchJudge", "Scored", "TextOnlyAnswering",
    "ThinkAnswerMismatch",
]
