"""Make p2r evaluation records from a benchmark's own dataset rows (the rows lmms-eval reads).

Each output record keeps its row whole (``native``) with its lmms-eval task (``task``), for the
``lmms_eval`` protocol, and gets p2r's Video-R1-layout fields (problem, options, solution,
problem_type, path) for the ``video_r1`` and ``p2r`` protocols; ``path`` is where lmms-eval's cache
keeps the video, relative to ``$HF_HOME`` (so ``data.media_root: $HF_HOME`` reuses lmms-eval's
downloads). See docs/evaluation.md.

    # rows exported from the Hugging Face dataset, e.g.
    #   datasets.load_dataset("nyu-visionx/VSI-Bench", split="test").to_json("rows/vsibench.jsonl")
    python tools/native_records.py --benchmark vsibench --rows rows/vsibench.jsonl --out data/eval/lmms/vsibench.jsonl
    # a benchmark of several lmms-eval tasks: one --rows per task (dataset config or task name)
    python tools/native_records.py --benchmark mvbench --rows action_count=rows/action_count.jsonl \\
        --rows object_shuffle=rows/object_shuffle.jsonl --out data/eval/lmms/mvbench.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2r.data.shards import load_raw_records
from p2r.evaluation.lmms_eval import TASKS
from p2r.evaluation.lmms_eval.records import native_record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--benchmark", required=True, choices=sorted(TASKS), help="benchmark the rows belong to")
    parser.add_argument("--rows", required=True, action="append",
                        help="a JSON list or JSON Lines file of dataset rows, as TASK=FILE for a benchmark of several "
                             "lmms-eval tasks (TASK: the dataset config or lmms-eval task name); repeatable")
    parser.add_argument("--out", required=True, type=Path, help="records file to write (JSON Lines)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = []
    for spec in args.rows:
        task, _, path = spec.rpartition("=")
        for position, row in enumerate(load_raw_records(path)):
            records.append(native_record(args.benchmark, row, task or None, position))
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            print(f"error: record id {record['id']!r} twice: give each task's rows once", file=sys.stderr)
            return 1
        seen.add(record["id"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(f"{len(records)} {args.benchmark} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
