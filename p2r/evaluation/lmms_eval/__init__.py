"""The ``lmms_eval`` protocol: lmms-eval 0.7.3's task definitions for the six video benchmarks it
shares with VideoP2R's Table 1, re-implemented from its rules (lmms-eval is never imported).

One module per benchmark (``vsibench``, ``videommmu``, ``mmvu``, ``mvbench``, ``tempcompass``,
``videomme``) holds the prompt, the per-question reading and scoring, the aggregation to the
figure lmms-eval prints, in its units, and where lmms-eval looks for the video. This file puts them
behind one interface, :class:`LmmsEvalRules`, which the adapters and ``tools/rescore.py`` use.

Every output first goes through :func:`~p2r.evaluation.lmms_eval.common.strip_reasoning_tags`, as
lmms-eval's evaluator does by default. A row is the benchmark's Hugging Face dataset row as
lmms-eval's ``doc_to_*`` functions read it. VideoMMMU, MVBench and TempCompass are several
lmms-eval tasks (tracks / tasks / answer formats) whose rows do not say which one they belong
to: each row comes with its task (:class:`NativeRow`), named as lmms-eval names the task
(``video_mmmu_perception``, ``mvbench_action_count``, ``tempcompass_yes_no``) or as the dataset
config (``Perception``, ``action_count``, ``yes_no``). lmms-eval prints one figure per such task
and none for the group; over several tasks p2r's figure is the unweighted mean of the per-task
figures (each exactly lmms-eval's) and the per-task figures are in the categories.

lmms-eval has no VCR-Bench of the paper: its ``vcrbench`` is VCRBench (Sarkar et al.), a
different benchmark (ordering shuffled clips of a procedure), so ``vcrbench`` has no
``lmms_eval`` protocol here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from callbacks.evaluation import Generation, Scored
from p2r.evaluation.lmms_eval import mmvu, mvbench, tempcompass, videomme, videommmu, vsibench
from p2r.evaluation.lmms_eval.common import Ask, strip_reasoning_tags


NOT_IN_LMMS_EVAL = (
    "lmms-eval 0.7.3 has no VCR-Bench of the paper: its 'vcrbench' task is VCRBench (Sarkar et al.), "
    "another benchmark (putting shuffled clips of a procedure back in order). Score the paper's VCR-Bench "
    "with protocol video_r1 or p2r."
)


@dataclass(frozen=True)
class NativeRow:
    """A dataset row as lmms-eval reads it, with the lmms-eval task it belongs to."""

    row: dict[str, Any]
    task: str  # lmms-eval's task name, e.g. "mvbench_action_count"


# benchmark -> {dataset config: lmms-eval task}; one entry when the benchmark is a single task.
TASKS: dict[str, dict[str, str]] = {
    "vsibench": {"full": "vsibench"},
    "videommmu": dict(videommmu.TRACKS),
    "mmvu": {"validation": "mmvu_val"},
    "mvbench": {name: f"mvbench_{name}" for name in mvbench.TASK_FOLDERS},
    "tempcompass": dict(tempcompass.FORMATS),
    "videomme": {"test": "videomme"},
}
_TASK_CONFIG = {task: config for tasks in TASKS.values() for config, task in tasks.items()}
_TASK_BENCHMARK = {task: name for name, tasks in TASKS.items() for task in tasks.values()}


def dataset_config(task: str) -> str:
    """The dataset config of an lmms-eval task (``mvbench_action_count`` -> ``action_count``)."""
    return _TASK_CONFIG[task]


def benchmark_of_task(name: str) -> str | None:
    """The benchmark an lmms-eval task name belongs to (``mvbench_action_count`` -> ``mvbench``)."""
    return _TASK_BENCHMARK.get(name)


def resolve_task(benchmark: str, given: str | None, where: str = "row") -> str:
    """The lmms-eval task name for ``given`` (a task name, a dataset config name, or None when the
    benchmark is a single task); raises naming the choices otherwise."""
    tasks = TASKS[benchmark]
    if given in tasks.values():
        return str(given)
    if given in tasks:
        return tasks[given]
    if given is None and len(tasks) == 1:
        return next(iter(tasks.values()))
    raise ValueError(
        f"{where}: {benchmark} under protocol lmms_eval needs the lmms-eval task of each row ('task' field, or "
        f"--benchmark <task>); got {given!r}, expected one of: {', '.join(tasks.values())}"
    )


class LmmsEvalRules:
    """One benchmark under the ``lmms_eval`` protocol: prompt, generation, score and figures.

    ``ask`` is the judge for the questions where lmms-eval calls GPT (MMVU open questions,
    TempCompass outputs its rules cannot read, TempCompass captioning); None leaves them not judged.
    """

    protocol = "lmms_eval"

    def __init__(self, benchmark: str, ask: Ask | None = None) -> None:
        if benchmark == "vcrbench":
            raise ValueError(NOT_IN_LMMS_EVAL)
        if benchmark not in TASKS:
            raise ValueError(f"protocol lmms_eval has no benchmark {benchmark!r}; it has {', '.join(TASKS)}")
        self.benchmark = benchmark
        self.ask = ask

    def includes(self, doc: NativeRow) -> bool:
        return True

    def prompt(self, doc: NativeRow) -> str:
        row, config = doc.row, _TASK_CONFIG[doc.task]
        if self.benchmark == "vsibench":
            return vsibench.prompt(row)
        if self.benchmark == "videommmu":
            return videommmu.prompt(row, config)
        if self.benchmark == "mmvu":
            return mmvu.prompt(row)
        if self.benchmark == "mvbench":
            return mvbench.prompt(row)
        if self.benchmark == "tempcompass":
            return tempcompass.prompt(row, config)
        return videomme.prompt(row)

    def generation(self, doc: NativeRow) -> Generation:
        """The task YAML's decoding settings as lmms-eval's Qwen2.5-VL chat model (what
        ``--model qwen2_5_vl`` runs) applies them: greedy unless the temperature is above 0, 128 new
        tokens when the task sets none, no stop strings."""
        tokens = {"vsibench": vsibench.MAX_NEW_TOKENS, "videommmu": videommmu.MAX_NEW_TOKENS,
                  "mmvu": mmvu.MAX_NEW_TOKENS, "mvbench": mvbench.MAX_NEW_TOKENS,
                  "tempcompass": tempcompass.MAX_NEW_TOKENS, "videomme": videomme.MAX_NEW_TOKENS}[self.benchmark]
        return Generation(tokens, mmvu.TEMPERATURE if self.benchmark == "mmvu" else 0.0, 1.0)

    def category(self, doc: NativeRow) -> str:
        row, config = doc.row, _TASK_CONFIG[doc.task]
        if self.benchmark == "vsibench":
            return str(row["question_type"])
        if self.benchmark == "videommmu":
            return config
        if self.benchmark == "mmvu":
            return mmvu.category(row)
        if self.benchmark == "mvbench":
            return config
        if self.benchmark == "tempcompass":
            return f"{config}/{row['dim']}"
        return str(row["duration"])

    def score(self, doc: NativeRow, output: str) -> Scored:
        row, config, text = doc.row, _TASK_CONFIG[doc.task], strip_reasoning_tags(output)
        if self.benchmark == "vsibench":
            return vsibench.score(row, text)
        if self.benchmark == "videommmu":
            return videommmu.score(row, text, config)
        if self.benchmark == "mmvu":
            return mmvu.score(row, text, self.ask)
        if self.benchmark == "mvbench":
            return mvbench.score(row, text, config)
        if self.benchmark == "tempcompass":
            return tempcompass.score(row, text, config, self.ask)
        return videomme.score(row, text)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The figure lmms-eval prints, in its units, with its breakdown (see the module doc for
        benchmarks made of several tasks)."""
        if self.benchmark == "vsibench":
            return vsibench.aggregate(rows)
        if self.benchmark == "mmvu":
            return mmvu.aggregate(rows)
        if self.benchmark == "videomme":
            return videomme.aggregate(rows)
        key = {"videommmu": "track", "mvbench": "task", "tempcompass": "format"}[self.benchmark]
        per_task: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            per_task.setdefault(row["details"][key], []).append(row)
        figures = {name: self._task_figures(group) for name, group in per_task.items()}
        categories: dict[str, Any] = {}
        for name, figure in sorted(figures.items()):
            categories[TASKS[self.benchmark][name]] = figure["figure"]
            for sub, value in figure.get("categories", {}).items():
                categories[f"{name}/{sub}"] = value
        result = {
            "figure": sum(f["figure"] for f in figures.values()) / len(figures) if figures else 0,
            "units": "fraction" if self.benchmark == "videommmu" else "percent",
            "metric": {"videommmu": "mmmu_acc", "mvbench": "mvbench_accuracy", "tempcompass": "avg_accuracy"}[self.benchmark],
            "categories": categories,
            "tasks": {TASKS[self.benchmark][name]: f["figure"] for name, f in sorted(figures.items())},
        }
        for count in ("not_judged", "n_api_error"):
            if any(count in f for f in figures.values()):
                result[count] = sum(f.get(count, 0) for f in figures.values())
        return result

    def _task_figures(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.benchmark == "videommmu":
            return videommmu.track_figures(rows)
        if self.benchmark == "mvbench":
            return {"figure": mvbench.task_figure(rows)}
        return tempcompass.format_figures(rows)

    def video_path(self, doc: NativeRow) -> str:
        """Where lmms-eval finds the row's video, relative to its cache root (``$HF_HOME``)."""
        if self.benchmark == "mvbench":
            return mvbench.video_path(doc.row, _TASK_CONFIG[doc.task])
        module = {"vsibench": vsibench, "videommmu": videommmu, "mmvu": mmvu, "tempcompass": tempcompass,
                  "videomme": videomme}[self.benchmark]
        return module.video_path(doc.row)
