"""p2r records made from a benchmark's own dataset rows, so that ``p2r test`` can score them under
every protocol (``tools/native_records.py`` writes them).

A record carries the row whole under ``native`` (values JSON cannot hold, such as images, are
dropped) and its lmms-eval task under ``task``: that is all the ``lmms_eval`` protocol reads. It
also gets the Video-R1-layout fields the other protocols and the data pipeline read: ``id``
(``<task>/<row id or position>``), ``path`` (the video where lmms-eval's cache keeps it, relative to
``$HF_HOME``), ``problem``, ``options`` ("A. text"), ``solution`` (``<answer>X</answer>``),
``problem_type``, ``data_type``, and the benchmark's category field. That Video-R1 view is p2r's
reading of the row, not Video-R1's own file: VSI-Bench's numerical questions become ``regression``
(scored by MRA); VideoMMMU's open questions ``numerical`` when the answer is a number, else
``free-form``; MMVU's open questions, TempCompass's yes/no and captioning questions ``free-form``
(which Video-R1's script scores 0).
"""

from __future__ import annotations

import string
from typing import Any

from callbacks.evaluation.report import jsonable
from p2r.evaluation.lmms_eval import LmmsEvalRules, NativeRow, dataset_config, resolve_task
from p2r.evaluation.lmms_eval.videommmu import format_options


def _lettered(texts: list[str]) -> list[str]:
    return [f"{letter}. {text}" for letter, text in zip(string.ascii_uppercase, texts)]


def _view(benchmark: str, row: dict[str, Any], config: str) -> dict[str, Any]:
    """The Video-R1-layout fields of a row (problem, options, answer, problem_type, category)."""
    if benchmark == "vsibench":
        mc = bool(row.get("options"))
        return {"problem": row["question"], "options": list(row["options"]) if mc else [],
                "answer": row["ground_truth"], "problem_type": "multiple choice" if mc else "regression",
                "question_type": row["question_type"]}
    if benchmark == "videommmu":
        if row["question_type"] == "multiple-choice":
            return {"problem": row["question"], "options": format_options(row["options"]).split("\n"),
                    "answer": row["answer"], "problem_type": "multiple choice", "track": config}
        try:
            float(str(row["answer"]).replace(",", ""))
            kind = "numerical"
        except ValueError:
            kind = "free-form"
        return {"problem": row["question"], "options": [], "answer": row["answer"], "problem_type": kind, "track": config}
    if benchmark == "mmvu":
        discipline = str(row["video_path"]).split("/")[-2]
        if row["question_type"] == "multiple-choice":
            options = [f"{k}. {v}" for k, v in sorted(row["choices"].items()) if v]
            return {"problem": row["question"], "options": options, "answer": row["answer"],
                    "problem_type": "multiple choice", "discipline": discipline}
        return {"problem": row["question"], "options": [], "answer": row["answer"], "problem_type": "free-form",
                "discipline": discipline}
    if benchmark == "mvbench":
        letter = string.ascii_uppercase[row["candidates"].index(row["answer"])]
        return {"problem": row["question"], "options": _lettered(row["candidates"]), "answer": letter,
                "problem_type": "multiple choice", "task_type": config}
    if benchmark == "tempcompass":
        question, *lines = str(row["question"]).split("\n")
        if config == "multi-choice":
            return {"problem": question, "options": lines, "answer": str(row["answer"]).split(".")[0],
                    "problem_type": "multiple choice", "dim": row["dim"]}
        if config == "caption_matching":
            sentences = [line.split(": ", 1)[1] for line in lines]
            labels = [line.split(": ", 1)[0] for line in lines]
            letter = string.ascii_uppercase[labels.index(str(row["answer"]).split(": ")[0])]
            return {"problem": question, "options": _lettered(sentences), "answer": letter,
                    "problem_type": "multiple choice", "dim": row["dim"]}
        answer = row["mc_answer"] if config == "captioning" else row["answer"]
        return {"problem": row["question"], "options": [], "answer": answer, "problem_type": "free-form", "dim": row["dim"]}
    return {"problem": row["question"], "options": list(row["options"]), "answer": row["answer"],
            "problem_type": "multiple choice", "duration": row["duration"]}


def native_record(benchmark: str, row: dict[str, Any], task: str | None, position: int) -> dict[str, Any]:
    """The p2r record of one dataset row of ``benchmark`` (``task``: lmms-eval task or dataset config
    name; None for a single-task benchmark); ``position`` names rows without an id."""
    task = resolve_task(benchmark, task, f"{benchmark} row {position}")
    view = _view(benchmark, row, dataset_config(task))
    key = row.get("id", row.get("question_id", position))
    answer = view.pop("answer")
    return {
        "id": f"{task}/{key}",
        **view,
        "solution": f"<answer>{answer}</answer>",
        "data_type": "video",
        "path": LmmsEvalRules(benchmark).video_path(NativeRow(row, task)),
        "task": task,
        "native": jsonable(row),
    }

