"""Turn scored samples into the reports: per-benchmark summaries, results.json, the Markdown table.

Pure functions on plain Python values, so they are tested on hand-made rows and reused on the
rows of a resumed run read back from ``predictions.jsonl``.

Two aggregations. ``summarize`` gives, per benchmark, the unweighted mean over its metric
families of each family's mean over samples, with counts (what validation logs, and the figure
of an adapter without ``aggregate``). A benchmark's published figure is its adapter's
``aggregate`` (the protocol's arithmetic, in the reference's units); :func:`table_values` puts
those in percent for the table. Sums use ``math.fsum``, so totals do not depend on the order in
which ranks delivered their rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from callbacks.evaluation.metric import Key

log = logging.getLogger(__name__)

# The columns of VideoP2R's Table 1, in order (METHOD.md, "Evaluation").
PAPER_COLUMNS = ("VSI", "VideoMMMU", "MMVU", "VCR", "MVBench", "TempCompass", "VideoMME")
# The metric family of a sample that its adapter left out of the benchmark (counted, not scored).
EXCLUDED = ""


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON so that ``path`` is always the old or the new whole file.

    A run killed while writing would otherwise leave a truncated ``run.json`` that stops every
    resume with a JSON error. (p2r.checkpoints.atomic_write does the same for checkpoints;
    ``callbacks/`` never imports ``p2r``, hence this small twin.)
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def family_mean(by_family: dict[str, list[float]]) -> float:
    """Mean over families of each family's mean (families without samples are ignored).

    >>> family_mean({"accuracy": [1.0, 0.0, 1.0, 1.0], "mra": [0.2, 0.4]})
    0.525
    """
    means = [math.fsum(v) / len(v) for v in by_family.values() if v]
    return math.fsum(means) / len(means) if means else math.nan


def _block(by_family: dict[str, list[float]]) -> dict[str, Any]:
    n = sum(len(v) for v in by_family.values())
    return {
        "score": family_mean(by_family) if n else None,  # None, not NaN: results.json stays valid JSON
        "n": n,
        "metrics": {f: {"score": math.fsum(v) / len(v), "n": len(v)} for f, v in sorted(by_family.items())},
    }


def summarize(rows: Iterable[tuple[Key, float]]) -> dict[str, dict[str, Any]]:
    """Per benchmark: ``score``, ``n``, ``excluded``, ``metrics`` (per family) and ``categories``.

    >>> s = summarize([(("vsi", "count", "mra"), 0.5), (("vsi", "order", "accuracy"), 1.0), (("mmvu", "x", ""), 0.0)])
    >>> s["vsi"]["score"], s["vsi"]["categories"]["count"]["score"], s["mmvu"]["n"], s["mmvu"]["excluded"]
    (0.75, 0.5, 0, 1)
    """
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_category: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    excluded: dict[str, int] = defaultdict(int)
    for (benchmark, category, family), score in rows:
        if family == EXCLUDED:
            excluded[benchmark] += 1
            continue
        scores[benchmark][family].append(score)
        by_category[benchmark][category][family].append(score)
    out = {}
    for benchmark in sorted(set(scores) | set(excluded)):
        block = _block(scores[benchmark])
        block["excluded"] = excluded[benchmark]
        block["categories"] = {c: _block(f) for c, f in sorted(by_category[benchmark].items())}
        out[benchmark] = block
    return out


def as_percent(figure: dict[str, Any]) -> float:
    """An aggregate's ``figure`` in percent, whatever its ``units`` (``fraction`` or ``percent``).

    >>> as_percent({"figure": 0.25, "units": "fraction"}), as_percent({"figure": 25.0, "units": "percent"})
    (25.0, 25.0)
    """
    value = float(figure["figure"])
    return value if figure["units"] == "percent" else 100.0 * value


def table_values(figures: dict[str, dict[str, Any]], columns: dict[str, str]) -> dict[str, float]:
    """Percent figure per table column; ``columns`` maps a benchmark to its column header.

    Two benchmarks with the same header (a synthetic val and test set): the first by name gets the
    header, the other keeps its own name.
    """
    values: dict[str, float] = {}
    for benchmark, figure in sorted(figures.items()):
        header = columns.get(benchmark) or benchmark
        values[benchmark if header in values else header] = as_percent(figure)
    return values


def markdown_table(model: str, values: dict[str, float], table_columns: Sequence[str] = PAPER_COLUMNS) -> str:
    """The paper's Table 1 layout: its columns (missing ones "-"), any other benchmark after them,
    then ``avg`` over the table columns, shown only when all of them are present (as in the paper).

    >>> print(markdown_table("m", {"VSI": 36.84, "synthetic": 50.0}, ["VSI", "MMVU"]))
    | model | VSI | MMVU | synthetic | avg |
    |---|---|---|---|---|
    | m | 36.8 | - | 50.0 | - |
    """
    extra = [c for c in values if c not in table_columns]
    headers = [*table_columns, *extra]
    present = [values[c] for c in table_columns if c in values]
    avg = math.fsum(present) / len(present) if present and len(present) == len(table_columns) else None
    cells = [f"{values[c]:.1f}" if c in values else "-" for c in headers] + [f"{avg:.1f}" if avg is not None else "-"]
    return "\n".join([
        "| model | " + " | ".join([*headers, "avg"]) + " |",
        "|" + "---|" * (len(headers) + 2),
        f"| {model} | " + " | ".join(cells) + " |",
    ])


def results_document(summary: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]],
                     table: dict[str, float], model: str, config: dict[str, Any]) -> dict[str, Any]:
    """results.json, laid out like lmms-eval's: ``results`` per benchmark (the protocol's figure,
    units and categories, with the counts and per-family means of ``summary``), ``n-samples``,
    the table row, ``model`` and ``config``."""
    results = {b: {**figures.get(b, {}), "n": s["n"], "excluded": s["excluded"], "metrics": s["metrics"]}
               for b, s in summary.items()}
    return {
        "results": results,
        "n-samples": {b: {"scored": s["n"], "excluded": s["excluded"]} for b, s in summary.items()},
        "table": table,
        "model": model,
        "config": config,
    }


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that JSON can hold as they are (settings for results.json)."""
    out = {}
    for key, value in values.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value
    return out


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines and flush, so a crash loses at most the batch being written."""
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def read_predictions(paths: Iterable[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Predictions already made, by (benchmark, id); the first line of an id wins.

    A line that is not JSON (a crash in the middle of a write) is skipped with a warning: its
    sample is generated again.
    """
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (str(row["benchmark"]), str(row["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: unreadable prediction line skipped; that sample is generated again", path, number)
                continue
            done.setdefault(key, row)
    return done
