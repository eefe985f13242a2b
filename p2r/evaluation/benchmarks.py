"""One adapter per benchmark, scored under a chosen protocol: ``video_r1``, ``lmms_eval`` or ``p2r``.

Each adapter implements ``callbacks.evaluation.adapter.BenchmarkAdapter`` for the evaluation
callback on p2r's :class:`~p2r.data.datamodule.Sample`, and hands everything protocol-specific
(which questions count, the prompt, decoding settings, reading, score, figure) to the rules of its
protocol (:func:`p2r.evaluation.protocol.make_rules`). ``protocol`` is set per run on the
callback and may be overridden per adapter; an adapter left at None takes the callback's, and
with neither the default is ``video_r1``.

Records: ``video_r1`` and ``p2r`` read the Video-R1 layout (``eval_<name>.json``); ``lmms_eval``
reads the benchmark's own dataset row, which a record carries whole under ``native`` with its
lmms-eval task under ``task`` (``tools/native_records.py`` makes such records from the Hugging
Face rows, with the Video-R1-layout fields too, so one set of records serves every protocol).

Categories under ``video_r1`` and ``p2r`` come from the record's own fields
(:mod:`p2r.evaluation.categories`), else VideoMME's duration class from the decoded video's
length, else ``other``; under ``lmms_eval`` they are lmms-eval's.

Registry: :data:`BENCHMARKS` maps a benchmark name to its adapter class, :func:`make_benchmark`
builds one by name.
"""

from __future__ import annotations

from typing import Any

from callbacks.evaluation import Generation, Scored
from p2r.data.datamodule import Sample
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.records import VideoRecord
from p2r.evaluation.categories import OTHER, videomme_duration
from p2r.evaluation.judge import EvalJudge
from p2r.evaluation.lmms_eval import NativeRow, resolve_task
from p2r.evaluation.protocol import ProtocolName, make_rules
from p2r.evaluation.scoring import MRAConvention, reward_score

DEFAULT_PROTOCOL = "video_r1"


def native_row(benchmark: str, record: VideoRecord) -> NativeRow:
    """The lmms-eval dataset row a record carries (``native``) with its task (``task``); raises
    naming the record when it carries none."""
    row = record.extra.get("native")
    if not isinstance(row, dict):
        raise ValueError(
            f"{benchmark} record {record.id!r} has no 'native' row: protocol lmms_eval scores the benchmark's own "
            "dataset rows. Make the records with tools/native_records.py from the Hugging Face rows, or choose "
            "protocol video_r1 or p2r for Video-R1's eval files."
        )
    return NativeRow(row, resolve_task(benchmark, record.extra.get("task"), f"{benchmark} record {record.id!r}"))


class VideoBenchmark:
    """A benchmark scored under a protocol (see module doc)."""

    name = ""  # registry name: data.test_sets key and eval_<name>.json
    column = ""  # header of this benchmark in the summary table (VideoP2R's Table 1)

    def __init__(
        self,
        protocol: ProtocolName | None = None,
        template: PromptTemplate | None = None,
        category_fields: list[str] | None = None,
        mra_convention: MRAConvention = "video_r1",
        judge: EvalJudge | None = None,
        protocol_generation: bool = True,
    ) -> None:
        """
        Args:
            protocol: video_r1 (Video-R1's eval_bench.py), lmms_eval (lmms-eval 0.7.3's task) or p2r
                (lenient, not comparable); None: the evaluation callback's setting.
            template: Prompt template under video_r1 and p2r (:mod:`p2r.data.prompts`): video_r1_eval
                (Video-R1's eval_bench.py prompt, video_r1's default), videop2r (observation/think/answer,
                p2r's default and what p2r trains with), video_r1 (Video-R1's training prompt) or none
                (the bare question and answer rule). lmms_eval always asks with lmms-eval's prompts.
            category_fields: Record fields naming the category under video_r1 and p2r, first
                non-empty wins (default: the benchmark's usual field names).
            mra_convention: p2r protocol: mean relative accuracy convention, video_r1 (strict <) or
                lmms_eval (<=). The other protocols use their own.
            judge: lmms_eval protocol: the OpenAI-compatible judge for MMVU open questions and
                TempCompass (None: those questions count as not judged).
            protocol_generation: Decode with the protocol's settings (tokens, temperature); False:
                the module's eval_* settings.
        """
        self.protocol = protocol
        self.template = template
        self.category_fields = list(category_fields) if category_fields is not None else None
        self.mra_convention = mra_convention
        self.judge = judge
        self.protocol_generation = protocol_generation
        self._rules: dict[str, Any] = {}

    @property
    def active_protocol(self) -> str:
        return self.protocol or DEFAULT_PROTOCOL

    def rules(self) -> Any:
        """This benchmark's rules under the active protocol (built once per protocol)."""
        protocol = self.active_protocol
        if protocol not in self._rules:
            template = {"template": self.template} if self.template is not None else {}
            options: dict[str, Any] = {
                "video_r1": {**template, "category_fields": self.category_fields},
                "lmms_eval": {"ask": self.judge},
                "p2r": {**template, "mra_convention": self.mra_convention, "category_fields": self.category_fields},
            }.get(protocol, {})
            self._rules[protocol] = make_rules(protocol, self.name, **options)
        return self._rules[protocol]

    def doc(self, sample: Sample) -> VideoRecord | NativeRow:
        """The record as the active protocol reads it."""
        return native_row(self.name, sample.record) if self.active_protocol == "lmms_eval" else sample.record

    def includes(self, sample: Sample) -> bool:
        """Whether the sample counts in this benchmark as the protocol reports it."""
        return self.rules().includes(self.doc(sample))

    def prompt(self, sample: Sample) -> str:
        return self.rules().prompt(self.doc(sample))

    def generation(self, sample: Sample) -> Generation | None:
        return self.rules().generation(self.doc(sample)) if self.protocol_generation else None

    def category(self, sample: Sample) -> str:
        return self.rules().category(self.doc(sample)) or self.derived_category(sample) or OTHER

    def derived_category(self, sample: Sample) -> str | None:
        """The category when neither the record nor the protocol names one (None: unknown)."""
        return None

    def score(self, sample: Sample, output: str) -> Scored:
        return self.rules().score(self.doc(sample), output)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The benchmark's figure under the active protocol, from its predictions lines."""
        return {"protocol": self.active_protocol, **self.rules().aggregate(rows)}


class VSIBench(VideoBenchmark):
    """VSI-Bench: multiple-choice accuracy and MRA on the numerical questions."""

    name, column = "vsibench", "VSI"


class VideoMMMU(VideoBenchmark):
    """VideoMMMU: the Perception, Comprehension and Adaptation tracks."""

    name, column = "videommmu", "VideoMMMU"


class MMVU(VideoBenchmark):
    """MMVU: the multiple-choice subset under video_r1 and p2r (the paper's); lmms-eval's whole
    validation split under lmms_eval."""

    name, column = "mmvu", "MMVU"


class VCRBench(VideoBenchmark):
    """VCR-Bench (the paper's: video chain-of-thought reasoning), multiple-choice subset. Not in
    lmms-eval: its ``vcrbench`` is VCRBench, another benchmark (clip ordering)."""

    name, column = "vcrbench", "VCR"


class MVBench(VideoBenchmark):
    """MVBench: 20 tasks."""

    name, column = "mvbench", "MVBench"


class TempCompass(VideoBenchmark):
    """TempCompass: multi-choice (Video-R1's file); lmms-eval has four answer formats."""

    name, column = "tempcompass", "TempCompass"


class VideoMME(VideoBenchmark):
    """VideoMME without subtitles. Category: the duration class, from the record or else from the
    decoded video's length."""

    name, column = "videomme", "VideoMME"

    def derived_category(self, sample: Sample) -> str | None:
        clip = sample.clip
        if clip.is_image or not clip.fps:
            return None
        return videomme_duration(clip.total_frames / clip.fps)


class Synthetic:
    """p2r's synthetic set, with no reference protocol: p2r's prompt and module decoding, every
    problem type scored by the reasoning-accuracy reward with its lenient reader (regression as
    1 - relative error), the figure the plain mean. Category: the problem type."""

    name, column = "synthetic", "synthetic"
    protocol = "p2r"

    def __init__(self, template: PromptTemplate = "videop2r") -> None:
        """
        Args:
            template: Prompt template (:mod:`p2r.data.prompts`): videop2r, video_r1, video_r1_eval or none.
        """
        self.template = template

    def includes(self, sample: Sample) -> bool:
        return True

    def prompt(self, sample: Sample) -> str:
        return build_prompt(sample.record, self.template)

    def category(self, sample: Sample) -> str:
        return sample.record.problem_type

    def score(self, sample: Sample, output: str) -> Scored:
        return reward_score(output, sample.record)


BENCHMARKS: dict[str, type] = {
    cls.name: cls for cls in (VSIBench, VideoMMMU, MMVU, VCRBench, MVBench, TempCompass, VideoMME, Synthetic)
}


def make_benchmark(name: str, **options: Any) -> Any:
    """The adapter registered as ``name`` (the eval file's ``eval_<name>.json``), built with ``options``."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**options)
