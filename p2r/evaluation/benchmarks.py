"""One adapter per benchmark: which records count, the prompt, the category key and the metric.

Each adapter implements the protocol of ``callbacks.evaluation.adapter.BenchmarkAdapter`` for the
evaluation callback, on p2r's :class:`~p2r.data.datamodule.Sample`. The records are Video-R1's
evaluation files (``eval_<name>.json``) or shards made from them; every benchmark is asked with
p2r's prompt (:func:`p2r.data.prompts.build_prompt` with the adapter's ``template``: by default
question, lettered options, the observation/think/answer template and the answer rule of the
problem type), as Video-R1 asked every benchmark with one prompt and a per-type answer rule.

Categories come from the record's own fields when it carries one (``category_fields``, looked up
in the fields the record kept beyond the schema and in ``facts``); otherwise VSI-Bench reads the
question type from its fixed question templates and VideoMME the duration class from the
decoded video's length; anything else is ``other``.

Registry: :data:`BENCHMARKS` maps a benchmark name to its adapter class, :func:`make_benchmark`
builds one by name.
"""

from __future__ import annotations

from typing import Any

from callbacks.evaluation import Scored
from p2r.data.datamodule import Sample
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.records import VideoRecord
from p2r.evaluation.scoring import (
    MRAConvention,
    mra_score,
    reward_score,
    score_by_type,
    videomme_duration,
    vsi_question_type,
)

OTHER = "other"  # the category of a record that names none and gives no way to derive one


def record_field(record: VideoRecord, names: list[str]) -> str | None:
    """The first non-empty value among ``names`` in the record's fields beyond the schema
    (``extra``, when the record type keeps them) and its ``facts``; None if there is none."""
    sources: list[dict[str, Any]] = [getattr(record, "extra", None) or {}, record.facts or {}]
    for name in names:
        for source in sources:
            value = source.get(name)
            if value not in (None, ""):
                return str(value)
    return None


class VideoBenchmark:
    """A benchmark of Video-R1 evaluation records, scored as Video-R1's ``eval_bench.py`` scores
    them by problem type (see :func:`p2r.evaluation.scoring.score_by_type`)."""

    column = ""  # header of this benchmark in the summary table (VideoP2R's Table 1)
    CATEGORY_FIELDS: tuple[str, ...] = ()  # record fields that name the category, in order

    def __init__(
        self,
        template: PromptTemplate = "videop2r",
        category_fields: list[str] | None = None,
        mra_convention: MRAConvention = "video_r1",
    ) -> None:
        """
        Args:
            template: Reasoning template of the prompt: videop2r (observation/think/answer), video_r1
                (Video-R1's think/answer training prompt), video_r1_eval (its eval_bench.py prompt), none (bare question).
            category_fields: Record fields naming the category, first non-empty wins (default:
                the benchmark's usual field names).
            mra_convention: Mean relative accuracy convention for numerical answers scored by MRA:
                video_r1 (the paper's, strict <) or lmms_eval (<=).
        """
        self.template = template
        self.category_fields = list(category_fields) if category_fields is not None else list(self.CATEGORY_FIELDS)
        self.mra_convention = mra_convention

    def includes(self, sample: Sample) -> bool:
        """Whether the sample counts in this benchmark (all of them, unless a subset is reported)."""
        return True

    def prompt(self, sample: Sample) -> str:
        return build_prompt(sample.record, self.template)

    def category(self, sample: Sample) -> str:
        return record_field(sample.record, self.category_fields) or self.derived_category(sample) or OTHER

    def derived_category(self, sample: Sample) -> str | None:
        """The category when no record field names it (None: unknown)."""
        return None

    def score(self, sample: Sample, output: str) -> Scored:
        return score_by_type(output, sample.record, self.mra_convention)


class MultipleChoiceSubset(VideoBenchmark):
    """A benchmark reported on its multiple-choice questions only (the paper's MMVU and VCR-Bench)."""

    def includes(self, sample: Sample) -> bool:
        return sample.record.problem_type == "multiple choice"


class VSIBench(VideoBenchmark):
    """VSI-Bench: multiple-choice accuracy and, for every numerical question, MRA; the benchmark's
    figure is the mean of the two (the paper's). Category: the question type."""

    column = "VSI"
    CATEGORY_FIELDS = ("original_question_type", "question_type")

    def derived_category(self, sample: Sample) -> str | None:
        return vsi_question_type(sample.record.problem)

    def score(self, sample: Sample, output: str) -> Scored:
        if sample.record.problem_type == "multiple choice":
            return score_by_type(output, sample.record, self.mra_convention)
        return mra_score(output, sample.record, self.mra_convention)


class VideoMMMU(VideoBenchmark):
    """VideoMMMU: option letters, and numbers to 2 decimals for its open numerical questions.
    Category: the track (Perception, Comprehension, Adaptation)."""

    column = "VideoMMMU"
    CATEGORY_FIELDS = ("track", "subset", "category")


class MMVU(MultipleChoiceSubset):
    """MMVU, multiple-choice subset. Category: the discipline."""

    column = "MMVU"
    CATEGORY_FIELDS = ("discipline", "subject", "field")


class VCRBench(MultipleChoiceSubset):
    """VCR-Bench, multiple-choice subset. Category: the reasoning dimension."""

    column = "VCR"
    CATEGORY_FIELDS = ("dimension", "task", "category")


class MVBench(VideoBenchmark):
    """MVBench. Category: the task (20 of them)."""

    column = "MVBench"
    CATEGORY_FIELDS = ("task_type", "task", "sub_task")


class TempCompass(VideoBenchmark):
    """TempCompass (multiple-choice). Category: the temporal dimension (action, speed, direction, ...)."""

    column = "TempCompass"
    CATEGORY_FIELDS = ("dim", "dimension", "task_type")


class VideoMME(VideoBenchmark):
    """VideoMME without subtitles (the prompt is the question and its options only). Category: the
    duration class, from the record or else from the decoded video's length."""

    column = "VideoMME"
    CATEGORY_FIELDS = ("duration",)

    def derived_category(self, sample: Sample) -> str | None:
        clip = sample.clip
        if clip.is_image or not clip.fps:
            return None
        return videomme_duration(clip.total_frames / clip.fps)


class Synthetic(VideoBenchmark):
    """p2r's synthetic set: every problem type scored by the reasoning-accuracy reward (regression
    as 1 - relative error, not MRA). Category: the problem type."""

    column = "synthetic"

    def category(self, sample: Sample) -> str:
        return sample.record.problem_type

    def score(self, sample: Sample, output: str) -> Scored:
        return reward_score(output, sample.record)


BENCHMARKS: dict[str, type[VideoBenchmark]] = {
    "vsibench": VSIBench,
    "videommmu": VideoMMMU,
    "mmvu": MMVU,
    "vcrbench": VCRBench,
    "mvbench": MVBench,
    "tempcompass": TempCompass,
    "videomme": VideoMME,
    "synthetic": Synthetic,
}


def make_benchmark(name: str, **options: Any) -> VideoBenchmark:
    """The adapter registered as ``name`` (the eval file's ``eval_<name>.json``), built with ``options``."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**options)
