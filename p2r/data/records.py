"""The record schema shared by every p2r data path, and its validation.

A record is one question about one video (or image) in the Video-R1 / VideoP2R layout
(METHOD.md, "Data records"). The RL file stores every value as a string, ``options`` included
(a stringified Python/JSON list); :func:`parse_record` accepts both that and the native layout.

Fields outside the schema (a benchmark's category columns, ``problem_id``, ...) are kept in
``extra`` and written back by ``to_dict``. p2r adds two optional fields: ``id`` (made from the position in the source file when absent) and
``facts``, the structured ground truth of a synthetic record. ``facts["evidence"]`` is a list of
groups of phrases: an observation is sufficient to deduce the answer when, for every group, it
mentions at least one phrase of that group (the rule-based perception judge uses exactly this).
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from callbacks.rewards.parsing import solution_answer

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
DATA_TYPES = ("video", "image")
REQUIRED_FIELDS = ("problem", "problem_type", "data_type", "path", "solution")


class RecordError(ValueError):
    """A record that cannot be used; the message says which record and what is wrong."""


@dataclass
class VideoRecord:
    """One question about one video or image, validated."""

    id: str
    problem: str
    problem_type: str
    data_type: str
    path: str
    solution: str
    options: list[str] = field(default_factory=list)
    observation: str = ""
    process: str = ""
    output: str = ""
    data_source: str = ""
    facts: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields outside the schema (benchmark categories, ...)

    @property
    def answer(self) -> str:
        """The ground-truth answer: the first ``<answer>`` block of ``solution`` (Video-R1's reading),
        else all of it (``callbacks.rewards.parsing.solution_answer``)."""
        return solution_answer(self.solution)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON: schema fields, then the extra fields at top level (as they came in)."""
        out = asdict(self)
        extra = out.pop("extra")
        if out["facts"] is None:
            del out["facts"]
        return {**extra, **out}


def _parse_options(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # The RL file stores a stringified list: JSON first, then a Python literal (single quotes).
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as err:
                raise RecordError(f"{where}: 'options' is a string that is not a list: {value[:80]!r}") from err
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in value):
        raise RecordError(f"{where}: 'options' must be a list of strings, got {type(value).__name__}")
    return [str(o) for o in value]


def parse_record(raw: Any, where: str = "record", default_id: str | None = None) -> VideoRecord:
    """Validate one raw record (a dict from JSON) and return it typed.

    ``where`` names the record in error messages (e.g. ``"train.json[17]"``). Raises
    :class:`RecordError` naming the missing or bad field; never returns a half-valid record.
    """
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_FIELDS if raw.get(k) in (None, "")]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    problem_type = str(raw["problem_type"]).strip()
    canonical = {p.lower(): p for p in PROBLEM_TYPES}
    if problem_type.lower() not in canonical:
        raise RecordError(f"{where}: unknown problem_type {problem_type!r} (expected one of {', '.join(PROBLEM_TYPES)})")
    data_type = str(raw["data_type"]).strip().lower()
    if data_type not in DATA_TYPES:
        raise RecordError(f"{where}: unknown data_type {data_type!r} (expected video or image)")
    options = _parse_options(raw.get("options"), where)
    problem_type = canonical[problem_type.lower()]
    if problem_type == "multiple choice" and not options:
        raise RecordError(f"{where}: a multiple choice record needs a non-empty 'options' list")
    facts = raw.get("facts")
    if facts == "":  # the all-string RL layout writes an absent value as ""
        facts = None
    if isinstance(facts, str):
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError as err:
            raise RecordError(f"{where}: 'facts' is a string that is not JSON ({err})") from err
    if facts is not None and not isinstance(facts, dict):
        raise RecordError(f"{where}: 'facts' must be an object")
    known = set(REQUIRED_FIELDS) | {"id", "options", "observation", "process", "output", "data_source", "facts"}
    extra = {k: v for k, v in raw.items() if k not in known}
    rec_id = raw.get("id", raw.get("problem_id"))
    rec_id = str(rec_id) if rec_id not in (None, "") else (default_id or where)
    return VideoRecord(
        id=rec_id,
        problem=str(raw["problem"]),
        problem_type=problem_type,
        data_type=data_type,
        path=str(raw["path"]),
        solution=str(raw["solution"]),
        options=options,
        observation=str(raw.get("observation") or ""),
        process=str(raw.get("process") or ""),
        output=str(raw.get("output") or ""),
        data_source=str(raw.get("data_source") or ""),
        facts=facts or None,
        extra=extra,
    )


def target_text(record: VideoRecord) -> str:
    """The SFT target in the process-aware template: observation, think, answer (METHOD.md).

    Uses ``output`` when it already holds the full tagged trace, else assembles it from
    ``observation``, ``process`` and the answer. Raises when the record has no CoT to learn from.
    """
    if "<observation>" in record.output and "<answer>" in record.output:
        return record.output.strip()
    if not record.observation or not record.process:
        raise RecordError(f"record {record.id}: no 'output' trace and no 'observation'+'process' to build the SFT target")
    obs = record.observation.strip()
    if not obs.startswith("<observation>"):
        obs = f"<observation>{obs}</observation>"
    think = record.process.strip()
    if not think.startswith("<think>"):
        think = f"<think>{think}</think>"
    return f"{obs}\n{think}\n<answer>{record.answer}</answer>"
