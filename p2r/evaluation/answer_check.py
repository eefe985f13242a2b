"""The plain held-out check that ``p2r validate`` / ``p2r test`` (and fit's validation) log when no
evaluation callback is configured: greedy answers scored by the training rewards.

The metrics, each averaged over the samples it applies to: ``accuracy`` (the reasoning-accuracy
reward, Video-R1's reader), ``format`` (both format rewards), ``accuracy/<problem type>`` and, for
records with structured facts (the synthetic set), ``perception``: the share of generated
observations from which the rule judge can deduce the answer (does the model look at the video?).
The full benchmark evaluation is ``callbacks.evaluation.BenchmarkEvaluation``.
"""

from __future__ import annotations

from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.format import perception_format, reasoning_format
from callbacks.rewards.judges import JudgeRequest, RuleBasedJudge
from callbacks.segments import split_segments
from p2r.data.records import VideoRecord

# Shown in the progress bar; the others are logged only.
PROGRESS_BAR_METRICS = ("accuracy", "format")


def clip_scores(texts: list[str], records: list[VideoRecord]) -> dict[str, list[float | None]]:
    """Per clip: ``accuracy`` (the reasoning-accuracy reward), ``format`` (both format rewards) and
    ``perception`` (the rule judge on the observation; None for records without evidence)."""
    judged = [i for i, r in enumerate(records) if r.facts and r.facts.get("evidence")]
    requests = [JudgeRequest(records[i].problem, records[i].answer, split_segments(texts[i]).observation, records[i].facts)
                for i in judged]
    verdicts = [v.score or 0.0 for v in RuleBasedJudge(cache_size=0).judge(requests)] if requests else []
    perception: list[float | None] = [None] * len(records)
    for i, v in zip(judged, verdicts):
        perception[i] = v
    return {
        "accuracy": [reasoning_accuracy(t, r.solution, r.problem_type, r.options) for t, r in zip(texts, records)],
        "format": [perception_format(t) * reasoning_format(t) for t in texts],
        "perception": perception,
    }


def answer_check(texts: list[str], records: list[VideoRecord]) -> dict[str, tuple[float, int]]:
    """Metric name -> (mean, number of samples averaged) for generated ``texts`` answering ``records``."""
    n = len(records)
    scores = clip_scores(texts, records)
    acc = scores["accuracy"]
    metrics = {"accuracy": (sum(acc) / n, n), "format": (sum(scores["format"]) / n, n)}
    for kind in sorted({r.problem_type for r in records}):
        values = [a for a, r in zip(acc, records) if r.problem_type == kind]
        metrics[f"accuracy/{kind}"] = (sum(values) / len(values), len(values))
    verdicts = [v for v in scores["perception"] if v is not None]
    if verdicts:
        metrics["perception"] = (sum(verdicts) / len(verdicts), len(verdicts))
    return metrics
