"""Score stored model outputs again under any protocol, without generating anything.

    python tools/rescore.py --protocol video_r1 --benchmark mvbench outputs.jsonl --out runs/rescored
    python tools/rescore.py --protocol lmms_eval --benchmark mvbench_action_count rows.jsonl --out runs/rescored
    python tools/rescore.py --protocol lmms_eval --benchmark mvbench runs/eval/predictions.jsonl --out runs/lmms

Each input line is one record plus ``"output"``, the model's text: for ``video_r1`` and ``p2r`` a
record of Video-R1's ``eval_<name>.json``; for ``lmms_eval`` a row of the benchmark's dataset as
lmms-eval reads it (with ``"task"``, the lmms-eval task or dataset config, for VideoMMMU, MVBench and
TempCompass, unless ``--benchmark`` names the task). Lines of a ``p2r test`` predictions file work
too: their ``"record"`` is used (for ``lmms_eval`` the row it carries under ``native``), and lines of
other benchmarks (or other lmms-eval tasks, when ``--benchmark`` names one) are skipped. ``--benchmark`` is p2r's name (vsibench, videommmu, mmvu, vcrbench,
mvbench, tempcompass, videomme) or an lmms-eval task name (``mmvu_val``, ``video_mmmu_perception``,
``mvbench_action_count``, ``tempcompass_yes_no``, ...).

Writes ``OUT/predictions.jsonl`` (every input line in order, with ``parsed``, ``score``, ``metric``,
``category`` and ``details``; a question the protocol leaves out has ``score`` null; the text-only
answers of a line's ``analyses`` scored again the same way) and
``OUT/results.json`` (``figure`` exactly as the reference prints it, in its ``units``,
``categories``, counts); the last line printed is ``figure: <x>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from p2r.data.records import RecordError, parse_record
from p2r.data.shards import load_raw_records
from p2r.evaluation.benchmarks import BENCHMARKS
from p2r.evaluation.categories import OTHER
from p2r.evaluation.judge import EvalJudge
from p2r.evaluation.lmms_eval import NativeRow, benchmark_of_task, resolve_task
from p2r.evaluation.protocol import PROTOCOLS, make_rules


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("input", type=Path, help="JSON Lines (or a JSON list): one record or dataset row + 'output' each")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    parser.add_argument("--benchmark", required=True, help="p2r benchmark name or lmms-eval task name")
    parser.add_argument("--out", required=True, type=Path, help="folder for predictions.jsonl and results.json")
    parser.add_argument("--mra-convention", default="video_r1", choices=("video_r1", "lmms_eval"),
                        help="p2r protocol: MRA convention")
    parser.add_argument("--judge-base-url", default=None,
                        help="lmms_eval: OpenAI-compatible server for MMVU open questions and TempCompass (none: not judged)")
    parser.add_argument("--judge-model", default="gpt-4o-2024-11-20", help="lmms_eval: the judge's model name")
    parser.add_argument("--judge-api-key-env", default="P2R_JUDGE_API_KEY", help="environment variable with the judge's key")
    return parser.parse_args(argv)


def resolve_benchmark(name: str) -> tuple[str, str | None]:
    """(p2r benchmark, lmms-eval task or None) for a p2r name or an lmms-eval task name."""
    if name in BENCHMARKS and name != "synthetic":
        return name, None
    benchmark = benchmark_of_task(name)
    if benchmark is None:
        known = ", ".join(b for b in BENCHMARKS if b != "synthetic")
        raise SystemExit(f"error: unknown benchmark {name!r}; use one of {known} or an lmms-eval task name")
    return benchmark, name


def document(line: dict[str, Any], protocol: str, benchmark: str, task: str | None, where: str) -> Any:
    """The record as the protocol reads it, from a bare input line or a p2r predictions line."""
    record = line.get("record") if isinstance(line.get("record"), dict) else None
    if protocol == "lmms_eval":
        row = record.get("native") if record is not None else line
        if not isinstance(row, dict):
            raise ValueError(f"{where}: its record carries no dataset row ('native'); protocol lmms_eval needs one "
                             "(records made by tools/native_records.py carry it)")
        given = line.get("task", record.get("task") if record is not None else None) if task is None else task
        return NativeRow(row, resolve_task(benchmark, given, where))
    source = record if record is not None else {k: v for k, v in line.items() if k != "output"}
    try:
        return parse_record(source, where=where)
    except RecordError as err:
        raise ValueError(f"{err} (protocol {protocol} reads Video-R1's record layout)") from err


def rescore_analyses(analyses: dict[str, Any], rules: Any, doc: Any) -> dict[str, Any]:
    """A predictions line's analyses with the text-only answers scored again under ``rules`` (the
    think-answer readings do not depend on the protocol and are kept as they are)."""
    text_only = analyses.get("text_only")
    if not isinstance(text_only, dict):
        return analyses
    again = dict(text_only)
    for condition in ("observation_only", "question_only"):
        answer = text_only.get(condition)
        if isinstance(answer, dict) and isinstance(answer.get("output"), str):
            scored = rules.score(doc, answer["output"])
            again[condition] = {**answer, "parsed": scored.parsed, "score": scored.score, "metric": scored.metric,
                                "details": scored.details}
    return {**analyses, "text_only": again}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchmark, task = resolve_benchmark(args.benchmark)
    options: dict[str, Any] = {}
    if args.protocol == "lmms_eval":
        options["ask"] = EvalJudge(args.judge_base_url, args.judge_model, args.judge_api_key_env) if args.judge_base_url else None
    elif args.protocol == "p2r":
        options["mra_convention"] = args.mra_convention
    try:
        rules = make_rules(args.protocol, benchmark, **options)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    lines = load_raw_records(args.input)
    out_rows, scored_rows, excluded, skipped = [], [], 0, 0
    for number, line in enumerate(lines, start=1):
        where = f"{args.input}:{number}"
        if not isinstance(line, dict) or not isinstance(line.get("output"), str):
            raise SystemExit(f"error: {where}: each line must be a JSON object with a string 'output'")
        record = line.get("record") if isinstance(line.get("record"), dict) else {}
        if record and (line.get("benchmark") != benchmark or (task and record.get("task", task) != task)):
            skipped += 1  # a line of another benchmark or task in a p2r predictions file
            continue
        try:
            doc = document(line, args.protocol, benchmark, task, where)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if not rules.includes(doc):
            excluded += 1
            out_rows.append({**line, "parsed": None, "score": None, "excluded": True})
            continue
        scored = rules.score(doc, line["output"])
        category = rules.category(doc) or OTHER
        row = {**line, "parsed": scored.parsed, "score": scored.score, "metric": scored.metric, "category": category,
               "details": scored.details}
        if isinstance(line.get("analyses"), dict):
            row["analyses"] = rescore_analyses(line["analyses"], rules, doc)
        out_rows.append(row)
        scored_rows.append(row)  # also a line the aggregation drops (score None): it counts those itself
    dropped = sum(1 for row in scored_rows if row["score"] is None)
    n_scored, excluded = len(scored_rows) - dropped, excluded + dropped
    results = {"benchmark": args.benchmark, "protocol": args.protocol, **rules.aggregate(scored_rows),
               "n": n_scored, "excluded": excluded, "skipped_other_benchmarks": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out_rows)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"{args.benchmark} under {args.protocol}: {n_scored} scored, {excluded} left out by the protocol"
          + (f", {skipped} lines of other benchmarks skipped" if skipped else ""))
    for name, value in results["categories"].items():
        print(f"  {name}: {value}")
    for count in ("not_judged", "n_api_error", "left_out"):
        if results.get(count):
            print(f"  {count}: {results[count]}")
    print(f"{results['metric']} ({results['units']})")
    print(f"figure: {results['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
