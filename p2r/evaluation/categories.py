"""The breakdown key of a Video-R1-layout record: the benchmark's own category field, else one
derived from the question or the video.

Used by the ``video_r1`` and ``p2r`` protocols (``lmms_eval`` reads its categories from the
native rows). A record names its category in a field it kept beyond the schema (``extra``) or in
``facts``: the benchmark's usual field names are tried in order (:data:`CATEGORY_FIELDS`, e.g.
``original_question_type`` for VSI-Bench, ``task_type`` for MVBench, ``duration`` for VideoMME).
Without one, VSI-Bench's question type is read from its fixed question templates and VideoMME's
duration class from the decoded video's length (the adapter's job: it has the clip).
"""

from __future__ import annotations

import re
from typing import Any

from p2r.data.records import VideoRecord

OTHER = "other"  # the category of a record that names none and gives no way to derive one

CATEGORY_FIELDS: dict[str, tuple[str, ...]] = {
    "vsibench": ("original_question_type", "question_type"),
    "videommmu": ("track", "subset", "category"),
    "mmvu": ("discipline", "subject", "field"),
    "vcrbench": ("dimension", "task", "category"),
    "mvbench": ("task_type", "task", "sub_task"),
    "tempcompass": ("dim", "dimension", "task_type"),
    "videomme": ("duration",),
}


def record_field(record: VideoRecord, names: list[str] | tuple[str, ...]) -> str | None:
    """The first non-empty value among ``names`` in the record's fields beyond the schema
    (``extra``) and its ``facts``; None if there is none."""
    sources: list[dict[str, Any]] = [getattr(record, "extra", None) or {}, record.facts or {}]
    for name in names:
        for source in sources:
            value = source.get(name)
            if value not in (None, ""):
                return str(value)
    return None


# VSI-Bench question types from the fixed wording of its question templates, for records that do
# not carry the type; first match wins. Names as in VSI-Bench and lmms-eval.
_VSI_TEMPLATES = (
    ("object_counting", r"\bhow many\b"),
    ("object_size_estimation", r"longest dimension"),
    ("room_size_estimation", r"size of (?:this|the) room|room size"),
    ("object_abs_distance", r"direct distance"),
    ("object_rel_distance", r"which of these objects.*\bclosest\b"),
    ("object_rel_direction_hard", r"standing by.*facing.*front-left"),
    ("object_rel_direction_medium", r"standing by.*facing.*left, right, or back"),
    ("object_rel_direction_easy", r"standing by.*facing"),
    ("route_planning", r"\brobot\b|navigate to"),
    ("obj_appearance_order", r"appearance order"),
)


def vsi_question_type(question: str) -> str | None:
    """The VSI-Bench question type of a question, from its template wording; None if none fits.

    >>> vsi_question_type("How many chair(s) are in this room?")
    'object_counting'
    """
    for name, pattern in _VSI_TEMPLATES:
        if re.search(pattern, question, re.IGNORECASE | re.DOTALL):
            return name
    return None


def videomme_duration(seconds: float) -> str:
    """VideoMME's duration class of a video (short < 2 min, medium 4-15 min, long 30-60 min).

    The classes leave gaps; the cut points are put in the middle of them (3 and 22.5 minutes)
    so that a decoder's slightly-off duration never changes the class.

    >>> videomme_duration(95), videomme_duration(600), videomme_duration(2400)
    ('short', 'medium', 'long')
    """
    if seconds < 180:
        return "short"
    return "medium" if seconds < 1350 else "long"


def record_category(benchmark: str, record: VideoRecord, fields: list[str] | None = None) -> str | None:
    """The record's category from ``fields`` (default: the benchmark's usual ones), else VSI-Bench's
    question template; None when neither gives one."""
    names = fields if fields is not None else CATEGORY_FIELDS.get(benchmark, ())
    found = record_field(record, names)
    if found is None and benchmark == "vsibench":
        found = vsi_question_type(record.problem)
    return found
