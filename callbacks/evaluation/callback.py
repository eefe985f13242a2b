"""``BenchmarkEvaluation``: generate, score and report benchmark answers in test, validation and fit.

The callback owns the evaluation loop's bookkeeping; everything benchmark-specific comes from the
injected adapters (``callbacks.evaluation.adapter``), and generation from the module's documented
hook ``pl_module.generate_answers(batch, prompts, generation=None)`` (``generation``: the decoding
settings the adapter's protocol prescribes, if any). Because the callback has
``generates_answers = True``, p2r's modules skip their own answer check in validation and test.
``protocol`` is handed to every adapter that leaves its own at None; the callback never reads it.

- ``test``: for each batch, the samples not already in ``predictions.jsonl`` get their adapter's
  prompt, are generated, scored and appended to the file at once (with the protocol, the
  adapter's per-question ``details`` and the record itself, so that a run can be rescored); a
  progress bar (rank 0) counts the answers and shows each benchmark's running mean score
  (Lightning's own bars show no metrics in test, so configs turn them off:
  ``trainer.enable_progress_bar: false``). At the end rank 0 computes each benchmark's figure with
  its adapter's ``aggregate`` from the merged predictions file, ``test/<benchmark>/accuracy`` (the
  figure as a fraction; and, for benchmarks with several metric families,
  ``test/<benchmark>/metric/<family>``) are logged, ``results.json`` is written and the paper's
  Table 1 is printed as Markdown.
- ``validate`` and fit's validation loop: the same scoring, logged under ``val/`` as the mean over
  metric families (there is no predictions file to aggregate from), no files.
- ``fit`` with ``every_n_train_steps``: every N optimizer steps the callback itself runs over the
  datamodule's ``val_dataloader()`` (at most ``max_samples``) and logs under ``eval/``.

Analyses (``analyses``, test only; ``callbacks.evaluation.analysis``) read each answer as it is
scored: their per-answer readings go into its predictions line, their summaries into results.json
under ``analyses``, their tables after the benchmark table.

Totals are right across DDP ranks: scores go through a torchmetrics Metric (``metric.py``), and
every rank appends to its own ``predictions.rank<r>.jsonl``, which rank 0 merges into
``predictions.jsonl`` at the end. Resuming: a rerun into the same ``output_dir`` skips every
(benchmark, id) already in the predictions files and counts their stored scores in the totals;
``run.json`` records the model and checkpoint so that a different model never resumes another's
predictions, and predictions made under another protocol are refused. Periodic evaluation during fit splits ``max_samples`` evenly over ranks; it
runs inside the module's ``evaluating()`` context when the module has one (p2r's holds a sharded
model whole there, so ranks may run different numbers of batches), else in plain eval mode.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from tqdm import tqdm

from callbacks.evaluation.adapter import BenchmarkAdapter, generate_by_setting
from callbacks.evaluation.analysis import Analysis, Item, reading_of
from callbacks.evaluation.metric import BenchmarkScores, Key
from callbacks.evaluation.report import (
    EXCLUDED,
    PAPER_COLUMNS,
    append_jsonl,
    as_percent,
    jsonable,
    markdown_table,
    read_predictions,
    results_document,
    summarize,
    table_values,
    write_json,
)

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"


@dataclass
class _Pass:
    """One pass over an evaluation stream (a test run, a validation epoch, a periodic evaluation)."""

    stage: str
    metric: BenchmarkScores
    part: Path | None = None  # this rank's predictions file (test only)
    done: set[tuple[str, str]] = field(default_factory=set)  # (benchmark, id) already predicted
    bar: tqdm | None = None  # test only
    running: dict[str, list[float]] = field(default_factory=dict)  # benchmark -> [score sum, count], this rank


def model_name(pl_module: L.LightningModule) -> str:
    """What was evaluated: the backbone's hub id or folder when it has one, else its class name."""
    backbone = getattr(pl_module, "backbone", None)
    name = getattr(backbone, "model_name_or_path", None)
    return str(name) if name else type(backbone if backbone is not None else pl_module).__name__


def _key(benchmark: str, category: str, metric: str, score: float | None) -> Key:
    """The metric key of one answer; an answer the protocol leaves out (score None) counts as excluded."""
    return (benchmark, "", EXCLUDED) if score is None else (benchmark, category, metric)


@contextlib.contextmanager
def _evaluating(pl_module: L.LightningModule) -> Iterator[None]:
    """The module's ``evaluating()`` context where it has one (p2r's: eval mode, a sharded model held
    whole so that ranks may run different numbers of batches), else plain eval mode."""
    hook = getattr(pl_module, "evaluating", None)
    if hook is not None:
        with hook():
            yield
        return
    was_training = pl_module.training
    pl_module.eval()
    try:
        yield
    finally:
        pl_module.train(was_training)


class BenchmarkEvaluation(L.Callback):
    """Benchmark evaluation for ``test``, ``validate`` and periodic validation during ``fit``."""

    generates_answers = True  # p2r modules skip their own answer check when this callback is present

    def __init__(
        self,
        benchmarks: dict[str, BenchmarkAdapter],
        output_dir: str | None = None,
        every_n_train_steps: int | None = None,
        max_samples: int | None = None,
        table_columns: list[str] | None = None,
        progress_bar: bool = True,
        protocol: str | None = None,
        analyses: list[Analysis] | None = None,
    ) -> None:
        """
        Args:
            benchmarks: Adapter per benchmark name, the name each sample carries (``data.test_sets``
                keys; ``val`` / ``test`` for plain val/test shards), e.g.
                ``{vsibench: {class_path: p2r.evaluation.VSIBench}}``.
            output_dir: Folder of predictions.jsonl, results.json and run.json in ``test``
                (default: the trainer's default_root_dir). A rerun into it resumes.
            every_n_train_steps: During fit, evaluate the val dataloader every N optimizer steps
                (None: only Lightning's own validation loop, if any; nothing while the datamodule has
                no validation data).
            max_samples: Samples per periodic evaluation over all ranks (None: the whole val set).
            table_columns: Columns of the printed table (default: the paper's Table 1 columns).
            progress_bar: Show a bar of answers with each benchmark's running score in test (rank 0).
            protocol: Scoring protocol of every adapter that does not set its own (an adapter's
                ``protocol`` left at None), e.g. video_r1, lmms_eval or p2r for p2r's adapters.
            analyses: Analyses of every answer in ``test`` (``callbacks.evaluation.analysis``), e.g.
                ``[{class_path: callbacks.evaluation.ThinkAnswerMismatch}]``: per-answer readings go to
                predictions.jsonl, their summaries to results.json under ``analyses``.
        """
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError("every_n_train_steps must be at least 1 (or None)")
        self.benchmarks = benchmarks
        self.output_dir = output_dir
        self.every_n_train_steps = every_n_train_steps
        self.max_samples = max_samples
        self.table_columns = list(table_columns) if table_columns is not None else list(PAPER_COLUMNS)
        self.progress_bar = progress_bar
        self.protocol = protocol
        self.analyses = list(analyses or [])
        names = [a.name for a in self.analyses]
        if len(set(names)) != len(names):
            raise ValueError(f"BenchmarkEvaluation.analyses: two analyses share a name ({names}); each needs its own")
        if protocol is not None:
            for adapter in benchmarks.values():
                if hasattr(adapter, "protocol") and adapter.protocol is None:
                    adapter.protocol = protocol
        self.results: dict[str, Any] | None = None  # the last test's results.json content
        self._passes: dict[str, _Pass] = {}
        self._last_periodic_step = -1

    # --- Lightning hooks ---------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._passes["test"] = self._begin("test", trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_batch(self._passes["test"], batch, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(self._passes.pop("test"), trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._passes["val"] = self._begin("val", trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_batch(self._passes["val"], batch, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(self._passes.pop("val"), trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, every = trainer.global_step, self.every_n_train_steps
        # With gradient accumulation several batches end at the same optimizer step: evaluate once.
        if not every or step == 0 or step % every or step == self._last_periodic_step:
            return
        self._last_periodic_step = step
        if trainer.datamodule is None:
            raise RuntimeError("BenchmarkEvaluation.every_n_train_steps needs a LightningDataModule with val_dataloader()")
        loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)) and not loader:
            return  # no validation data configured (a config may carry this callback switched off this way)
        run = self._begin("eval", trainer, pl_module)
        limit = math.ceil(self.max_samples / trainer.world_size) if self.max_samples else None
        with _evaluating(pl_module):
            seen = 0
            for batch in loader:
                batch = batch if limit is None else batch[: limit - seen]
                self._score_batch(run, batch, pl_module)
                seen += len(batch)
                if limit is not None and seen >= limit:
                    break
        self._end(run, trainer, pl_module)

    # --- one pass ------------------------------------------------------------------------------
    def _adapter(self, benchmark: str) -> BenchmarkAdapter:
        if benchmark not in self.benchmarks:
            raise KeyError(
                f"BenchmarkEvaluation: no adapter for benchmark {benchmark!r} (configured: {sorted(self.benchmarks)}). "
                f"Add it to the callback's benchmarks, e.g. {benchmark}: {{class_path: p2r.evaluation.Synthetic}}"
            )
        return self.benchmarks[benchmark]

    def _directory(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def _begin(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> _Pass:
        run = _Pass(stage, BenchmarkScores().on_device(pl_module.device))
        run.metric.update([], [])  # a pass may score nothing on a rank; that is no "compute before update"
        if stage != "test":
            return run
        out = self._directory(trainer)
        out.mkdir(parents=True, exist_ok=True)
        identity = {"model": model_name(pl_module), "ckpt_path": trainer.ckpt_path}
        recorded = json.loads((out / RUN).read_text()) if (out / RUN).is_file() else identity
        if {k: recorded.get(k) for k in identity} != identity:
            raise RuntimeError(
                f"{out} holds predictions of {recorded} but this run evaluates {identity}; "
                "choose another output_dir (or delete that folder) so predictions are never mixed"
            )
        trainer.strategy.barrier()  # every rank has read run.json before rank 0 may write it
        if trainer.is_global_zero:
            write_json(out / RUN, identity)
        done = read_predictions([out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))])
        for row in done.values():
            adapter = self.benchmarks.get(row["benchmark"])
            made, now = row.get("protocol"), getattr(adapter, "protocol", None)
            if adapter is not None and made != now:
                raise RuntimeError(
                    f"{out} holds {row['benchmark']} predictions made under protocol {made!r} but this run scores it "
                    f"under {now!r} (another prompt and decoding): choose another output_dir, or rescore those "
                    "predictions with tools/rescore.py"
                )
        run.done = set(done)
        if trainer.is_global_zero:  # earlier predictions count once, on rank 0
            kept = [row for row in done.values() if row["benchmark"] in self.benchmarks]
            run.metric.update([_key(r["benchmark"], r["category"], r["metric"], r["score"]) for r in kept],
                              [float(r["score"] or 0.0) for r in kept])
        part = PREDICTIONS if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        run.part = out / part
        run.bar = tqdm(desc="answers", unit="answer", dynamic_ncols=True,
                       disable=not (self.progress_bar and trainer.is_global_zero))
        return run

    def _score_batch(self, run: _Pass, batch: list[Any], pl_module: L.LightningModule) -> None:
        todo, excluded = [], []
        for sample in batch:
            adapter = self._adapter(sample.benchmark)
            key = (sample.benchmark, str(sample.record.id))
            if not adapter.includes(sample):
                excluded.append((sample.benchmark, "", EXCLUDED))
            elif key not in run.done:
                run.done.add(key)
                todo.append(sample)
        run.metric.update(excluded, [0.0] * len(excluded))
        if not todo:
            return
        adapters = [self._adapter(s.benchmark) for s in todo]
        prompts = [a.prompt(s) for a, s in zip(adapters, todo)]
        outputs = self._generate(pl_module, todo, adapters, prompts)
        keys: list[Key] = []
        rows, items = [], []
        for sample, adapter, prompt, output in zip(todo, adapters, prompts, outputs):
            scored = adapter.score(sample, output)
            items.append(Item(sample, adapter, prompt, output, scored))
            category = adapter.category(sample)
            keys.append(_key(sample.benchmark, category, scored.metric, scored.score))
            row = {
                "id": str(sample.record.id), "benchmark": sample.benchmark, "protocol": getattr(adapter, "protocol", None),
                "category": category, "metric": scored.metric, "score": scored.score, "parsed": scored.parsed,
                "truth": scored.truth, "details": scored.details, "prompt": prompt, "output": output,
            }
            to_dict = getattr(sample.record, "to_dict", None)
            if to_dict is not None:  # the record as it came in: what tools can rescore under another protocol
                row["record"] = to_dict()
            rows.append(row)
        if run.stage == "test":
            for analysis in self.analyses:
                for row, reading in zip(rows, analysis.analyse(items, pl_module)):
                    row.setdefault("analyses", {})[analysis.name] = reading
        run.metric.update(keys, [row["score"] or 0.0 for row in rows])
        if run.part is not None:
            append_jsonl(run.part, rows)
        if run.bar is not None:
            for row in rows:
                if row["score"] is None:
                    continue
                total = run.running.setdefault(row["benchmark"], [0.0, 0.0])
                total[0] += row["score"]
                total[1] += 1
            run.bar.set_postfix({b: f"{s / n:.3f}" for b, (s, n) in run.running.items()}, refresh=False)
            run.bar.update(len(rows))

    @staticmethod
    def _generate(pl_module: L.LightningModule, samples: list[Any], adapters: list[BenchmarkAdapter],
                  prompts: list[str]) -> list[str]:
        """Outputs in sample order; samples whose adapters prescribe different decoding settings are
        generated in separate calls (``generation=None``: the module's own settings)."""
        settings = [a.generation(s) if hasattr(a, "generation") else None for a, s in zip(adapters, samples)]
        return generate_by_setting(settings, lambda index, kwargs: pl_module.generate_answers(
            [samples[i] for i in index], [prompts[i] for i in index], **kwargs))

    def _aggregate(self, benchmark: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The adapter's figure from its predictions lines, else the mean over metric families."""
        adapter = self._adapter(benchmark)
        if hasattr(adapter, "aggregate"):
            return adapter.aggregate(rows)
        block = summarize([(_key(benchmark, r["category"], r["metric"], r["score"]), r["score"] or 0.0) for r in rows])[benchmark]
        return {"protocol": getattr(adapter, "protocol", None), "figure": block["score"], "units": "fraction",
                "metric": "mean over metric families",
                "categories": {c: v["score"] for c, v in block["categories"].items()}}

    def _end(self, run: _Pass, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if run.bar is not None:
            run.bar.close()
        summary = summarize(run.metric.compute())  # a collective: every rank gets every rank's scores
        for benchmark, block in summary.items():
            if block["n"] == 0:
                continue
            if run.stage != "test":
                pl_module.log(f"{run.stage}/{benchmark}/accuracy", block["score"], batch_size=block["n"])
            if len(block["metrics"]) > 1:
                for family, values in block["metrics"].items():
                    pl_module.log(f"{run.stage}/{benchmark}/metric/{family}", values["score"], batch_size=values["n"])
        if run.stage != "test":
            return
        # The protocols' figures need every answer's details: rank 0 computes them from the merged
        # predictions file (which also holds the answers of earlier, resumed runs) and shares them.
        trainer.strategy.barrier()  # every rank has flushed its predictions file
        out = self._directory(trainer)
        figures: dict[str, dict[str, Any]] | None = None
        analyses: dict[str, dict[str, Any]] | None = None
        if trainer.is_global_zero:
            self._merge_predictions(out)
            # Sorted by id: the same order whatever the number of ranks (float32 means depend on it).
            predictions = [row for _, row in sorted(read_predictions([out / PREDICTIONS]).items())]
            by_benchmark = {b: [r for r in predictions if r["benchmark"] == b] for b, block in summary.items() if block["n"]}
            figures = {b: self._aggregate(b, rows) for b, rows in by_benchmark.items()}
            analyses = {a.name: self._summarize_analysis(a, by_benchmark) for a in self.analyses}
        figures, analyses = trainer.strategy.broadcast((figures, analyses), src=0)
        for benchmark, figure in figures.items():
            pl_module.log(f"test/{benchmark}/accuracy", as_percent(figure) / 100.0, batch_size=summary[benchmark]["n"])
        for analysis in self.analyses:
            for name, value in analysis.scalars(analyses[analysis.name]).items():
                pl_module.log(f"test/analysis/{analysis.name}/{name}", value)
        columns = {name: getattr(adapter, "column", "") for name, adapter in self.benchmarks.items()}
        values = table_values(figures, columns)
        config = {
            "protocol": self.protocol,
            "benchmarks": {name: {"class": f"{type(a).__module__}.{type(a).__qualname__}", **jsonable(vars(a))}
                           for name, a in self.benchmarks.items()},
            "ckpt_path": trainer.ckpt_path,
            "module": {"class": type(pl_module).__qualname__, **jsonable(dict(pl_module.hparams))},
            "world_size": trainer.world_size,
        }
        self.results = results_document(summary, figures, values, model_name(pl_module), config)
        if analyses:
            self.results["analyses"] = analyses
        if trainer.is_global_zero:
            write_json(out / RESULTS, self.results)
            print("\n" + markdown_table(model_name(pl_module), values, self.table_columns) + "\n")
            for analysis in self.analyses:
                print(analysis.markdown(analyses[analysis.name]) + "\n")

    def _summarize_analysis(self, analysis: Analysis, by_benchmark: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """An analysis's results block from the lines holding its reading; lines without one (made
        by an earlier run without the analysis, then resumed) are counted in ``not_analysed``."""
        read = {b: [r for r in rows if reading_of(r, analysis.name) is not None] for b, rows in by_benchmark.items()}
        block = analysis.summarize(read, self._aggregate)
        block["not_analysed"] = {b: len(rows) - len(read[b]) for b, rows in by_benchmark.items() if len(rows) > len(read[b])}
        return block

    @staticmethod
    def _merge_predictions(out: Path) -> None:
        """Fold the per-rank files into predictions.jsonl (keeping the first line of each id)."""
        merged = out / PREDICTIONS
        seen = set(read_predictions([merged]))
        for part in sorted(out.glob("predictions.rank*.jsonl")):
            new = {k: row for k, row in read_predictions([part]).items() if k not in seen}
            append_jsonl(merged, list(new.values()))
            seen.update(new)
            part.unlink()
