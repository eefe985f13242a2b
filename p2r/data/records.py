"""The record schema shared by every p2r data path, and its validation.

A record is one question about one video (or image) in the Video-R1 / VideoP2R layout
(METHOD.md, "Data records"). The RL file stores every value as a string, ``options`` included
(a stringified Python/JSON list); :func:`parse_record` accepts both that and the native layout.

Fields outside the schema (a benchmark's category columns, ``problem_id``, ...) are kept in
``extra`` and written back by ``to_dict``. p2r adds two optional fields: ``id`` (made from the position in the source file when absent) and
``facts``, the structured ground truth of a synthetic record. ``facts["evidence"]`` is a list of
groups of phrases: an observation is sufficient to deduce the answer when, for every group, it
mentions at least one phrase of that group (the rule-based perception judge uses exactly this).

Every field is type-checked (text fields take strings, or numbers that are written as text) and,
when :class:`RecordLimits` are given, size-checked before anything tokenizes it: one malformed or
oversized record must cost one skipped sample, never the run.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from callbacks.rewards.parsing import solution_answer

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
DATA_TYPES = ("video", "image")
REQUIRED_FIELDS = ("problem", "problem_type", "data_type", "path", "solution")
TEXT_FIELDS = ("problem", "problem_type", "data_type", "path", "solution", "observation", "process", "output", "data_source")
# Deeper JSON than this in ``facts`` or extra fields is refused: copying or printing it could overflow the stack.
MAX_NESTING = 32


class RecordError(ValueError):
    """A record that cannot be used; the message says which record and what is wrong."""


@dataclass(frozen=True)
class RecordLimits:
    """Size caps on one record, checked before it is parsed further or tokenized.

    The defaults hold the paper's data with a wide margin (VideoP2R-CoT traces and Video-R1
    questions are a few thousand characters at most) while bounding what one bad record can cost:
    a 1 MB question would make an SFT step allocate tens of GB.
    """

    max_record_bytes: int = 1_000_000  # the record's JSON, in bytes
    max_prompt_chars: int = 8_192  # problem plus all options: the text that becomes the prompt
    max_text_chars: int = 16_384  # any other text field (output, observation, process, solution, path, ...)

    def __post_init__(self) -> None:
        for name in ("max_record_bytes", "max_prompt_chars", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"record_limits.{name} must be at least 1, got {getattr(self, name)}")


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


def _as_text(value: Any, name: str, where: str) -> str:
    """A text field as ``str``: strings as they are, numbers written out; anything else is an error."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"{where}: {name!r} must be text, got {type(value).__name__}")
    try:
        return value if isinstance(value, str) else str(value)
    except ValueError as err:  # an int too long to write out (Python's 4300-digit limit)
        raise RecordError(f"{where}: {name!r} is a number that cannot be written as text ({err})") from err


def _nests_deeper(value: Any, limit: int) -> bool:
    """True when lists and dicts nest more than ``limit`` levels deep in ``value`` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _parse_options(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        # The RL file stores a stringified list: JSON first, then a Python literal (single quotes).
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
                raise RecordError(f"{where}: 'options' is a string that is not a list: {value[:80]!r}") from err
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in value):
        raise RecordError(f"{where}: 'options' must be a list of strings, got {type(value).__name__}")
    return [_as_text(o, "options", where) for o in value]


def _check_sizes(fields: dict[str, str], options: list[str], limits: RecordLimits, where: str) -> None:
    prompt = len(fields["problem"]) + sum(len(o) for o in options)
    if prompt > limits.max_prompt_chars:
        raise RecordError(f"{where}: problem and options are {prompt:,} characters, over max_prompt_chars={limits.max_prompt_chars:,}")
    for name, text in fields.items():
        if name != "problem" and len(text) > limits.max_text_chars:
            raise RecordError(f"{where}: {name!r} is {len(text):,} characters, over max_text_chars={limits.max_text_chars:,}")


def parse_record(
    raw: Any, where: str = "record", default_id: str | None = None, limits: RecordLimits | None = None
) -> VideoRecord:
    """Validate one raw record (a dict from JSON) and return it typed.

    ``where`` names the record in error messages (e.g. ``"train.json[17]"``); ``limits`` (if given)
    caps the text sizes. Raises :class:`RecordError` naming the missing, mistyped or oversized
    field; never returns a half-valid record.
    """
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_FIELDS if raw.get(k) in (None, "")]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    fields = {name: _as_text(raw.get(name), name, where) for name in TEXT_FIELDS}
    raw_options = raw.get("options")
    if limits is not None and isinstance(raw_options, str):
        # Sized before it is parsed (a Python literal of megabytes is slow to parse, or worse).
        longest = max(limits.max_prompt_chars, limits.max_text_chars)
        if len(raw_options) > longest:
            raise RecordError(f"{where}: 'options' is a {len(raw_options):,}-character string, over {longest:,}")
    problem_type = fields["problem_type"].strip()
    canonical = {p.lower(): p for p in PROBLEM_TYPES}
    if problem_type.lower() not in canonical:
        raise RecordError(f"{where}: unknown problem_type {problem_type[:80]!r} (expected one of {', '.join(PROBLEM_TYPES)})")
    data_type = fields["data_type"].strip().lower()
    if data_type not in DATA_TYPES:
        raise RecordError(f"{where}: unknown data_type {data_type[:80]!r} (expected video or image)")
    options = _parse_options(raw_options, where)
    if limits is not None:
        _check_sizes(fields, options, limits, where)
    problem_type = canonical[problem_type.lower()]
    if problem_type == "multiple choice" and not options:
        raise RecordError(f"{where}: a multiple choice record needs a non-empty 'options' list")
    facts = raw.get("facts")
    if facts == "":  # the all-string RL layout writes an absent value as ""
        facts = None
    if isinstance(facts, str):
        try:
            facts = json.loads(facts)
        except (ValueError, RecursionError) as err:
            raise RecordError(f"{where}: 'facts' is a string that is not JSON ({err})") from err
    if facts is not None and not isinstance(facts, dict):
        raise RecordError(f"{where}: 'facts' must be an object")
    known = set(REQUIRED_FIELDS) | {"id", "options", "observation", "process", "output", "data_source", "facts"}
    extra = {k: v for k, v in raw.items() if k not in known}
    if _nests_deeper(facts, MAX_NESTING) or any(_nests_deeper(v, MAX_NESTING) for v in extra.values()):
        raise RecordError(f"{where}: 'facts' or an extra field nests lists/objects deeper than {MAX_NESTING} levels")
    rec_id = raw.get("id", raw.get("problem_id"))
    rec_id = _as_text(rec_id, "id", where) if rec_id not in (None, "") else (default_id or where)
    return VideoRecord(
        id=rec_id,
        problem=fields["problem"],
        problem_type=problem_type,
        data_type=data_type,
        path=fields["path"],
        solution=fields["solution"],
        options=options,
        observation=fields["observation"],
        process=fields["process"],
        output=fields["output"],
        data_source=fields["data_source"],
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


# Which assistant text SFT trains on: p2r's observation/think/answer trace or Video-R1's think/answer one.
TargetTemplate = Literal["videop2r", "video_r1"]


def _segment(field_text: str, output: str, tag: str) -> str:
    """A segment's text without its tags, stripped: its own field (inside its first ``<tag>`` block,
    or all of it when untagged), else its first complete block in the full trace ``output``, else ""."""
    block = re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL)
    if field_text.strip():
        match = block.search(field_text)
        return (match.group(1) if match else field_text).strip()
    match = block.search(output)
    return match.group(1).strip() if match else ""


def think_answer_target(record: VideoRecord) -> str:
    """The SFT target in Video-R1's think/answer template, for the T-GRPO baseline's own SFT stage.

    Follows tulerfeng/Video-R1 ``src/r1-v/src/open_r1/sft_video.py`` (``prepare_dataset``), whose
    assistant text is ``process + "\\n" + solution``: on Video-R1-COT-165k (``process`` =
    ``<think>...</think>``, ``solution`` = ``<answer>X</answer>``) that is
    ``<think>...</think>\\n<answer>X</answer>``, the whole-output layout its format reward asks for.

    Departs where p2r's records differ: a record that keeps its perception text apart (VideoP2R
    records, the synthetic set) gets it at the head of the think text, tags stripped
    (``<think>{observation} {think}</think>``), so the baseline learns from the same information as
    the process-aware SFT, never an ``<observation>`` block its format reward scores 0; a record
    with only a full trace in ``output`` gives its segments from there; the answer is the
    record's :attr:`~VideoRecord.answer` in one ``<answer>`` block (a bare solution gets the tags).
    Raises when the record has no reasoning to learn from.
    """
    think = _segment(record.process, record.output, "think")
    if not think:
        raise RecordError(f"record {record.id}: no 'process' and no <think> in 'output' to build the think/answer SFT target")
    observation = _segment(record.observation, record.output, "observation")
    reasoning = f"{observation} {think}" if observation else think
    return f"<think>{reasoning}</think>\n<answer>{record.answer}</answer>"


# The target function of each SFT target template.
SFT_TARGETS = {"videop2r": target_text, "video_r1": think_answer_target}
