"""Questions about your own videos, for ``p2r predict``: the questions file, its checks, and the media.

A questions file is JSON Lines, one question per line::

    {"video": "clips/cat.mp4", "question": "What does the cat do?"}
    {"video": "https://example.com/race.mp4", "question": "Who wins?", "options": ["red car", "blue car"]}
    {"image": "photos/desk.jpg", "question": "How many pens are on the desk?", "problem_type": "numerical"}

- ``video`` or ``image`` (exactly one): a path, relative to the questions file's folder, or a URL
  (anything ``urllib`` opens: ``http(s)://``, ``file://``, ...). A ``video`` whose name ends in an
  image extension (.jpg, .jpeg, .png) is read as an image.
- ``question``: the question text.
- ``options`` (optional): the answer options, shown as "A. ..." lines; with options the question
  is multiple choice, else free-form.
- ``problem_type`` (optional): one of the record problem types, for its answer rule (e.g.
  ``numerical`` asks for a number); ``multiple choice`` needs options.
- ``id`` (optional, default the line number): copied to the prediction.

Other keys are allowed and ignored (each prediction repeats its input line). Blank lines are
skipped. Every malformed line (not JSON, not an object, no question, no or two media, options
that are not a list of strings, an unknown problem type, text over the record size caps) is
reported at once, as ``file:line: reason``, by :func:`read_questions` before any model is built.
A video that is missing or cannot be decoded is not a malformed line: its prediction carries the
error (the media are opened only when the data workers reach them).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2r.data.records import PROBLEM_TYPES, RecordLimits, VideoRecord
from p2r.data.shard_reader import IMAGE_EXTENSIONS
from p2r.data.video import Clip, FrameSampling, MediaError, decode_image, decode_video

MAX_REPORTED = 20  # malformed lines listed in one error (the count says how many more)
URL_TIMEOUT_S = 60.0


class QuestionsError(ValueError):
    """A questions file that cannot be used; the message names each bad line as file:line."""


@dataclass
class Question:
    """One checked line of a questions file (a plain dataclass: Lightning copies batches field by field)."""

    line: int  # 1-based line number in its file (0: the command line's data.predict_video)
    input: dict[str, Any]  # the line as given, echoed in its prediction
    media: str  # where the video or image is: an absolute path or a URL
    record: VideoRecord  # question, options, problem type and data type, for the prompt


def is_url(location: str) -> bool:
    return "://" in location


def media_type(location: str, declared: str) -> str:
    """``"image"`` when declared so or when the name (URL path included) ends in an image extension, else ``"video"``."""
    path = urllib.parse.urlparse(location).path if is_url(location) else location
    return "image" if declared == "image" or Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS else "video"


def make_question(raw: Any, line: int, folder: Path, limits: RecordLimits) -> Question:
    """Check one parsed line and build its :class:`Question`; raises ValueError with the reason."""
    if not isinstance(raw, dict):
        raise ValueError(f"a question must be a JSON object, got {type(raw).__name__}")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no 'question' (a non-empty string)")
    keys = [k for k in ("video", "image") if raw.get(k) not in (None, "")]
    if len(keys) != 1:
        raise ValueError("no 'video' or 'image' path" if not keys else "both 'video' and 'image': give one")
    location = raw[keys[0]]
    if not isinstance(location, str):
        raise ValueError(f"'{keys[0]}' must be a path or URL string, got {type(location).__name__}")
    options = raw.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in options):
        raise ValueError("'options' must be a list of strings")
    options = [str(o) for o in options]
    problem_type = _problem_type(raw.get("problem_type"), options)
    size = len(question) + sum(len(o) for o in options)
    if size > limits.max_prompt_chars:
        raise ValueError(f"question and options are {size:,} characters, over max_prompt_chars={limits.max_prompt_chars:,}")
    if not is_url(location):
        path = Path(location).expanduser()
        location = str(path if path.is_absolute() else (folder / path).resolve())
    rec_id = raw.get("id", line)
    if isinstance(rec_id, bool) or not isinstance(rec_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(rec_id).__name__}")
    record = VideoRecord(id=str(rec_id), problem=question, problem_type=problem_type,
                         data_type=media_type(location, keys[0]), path=location, solution="", options=options)
    return Question(line, raw, location, record)


def _problem_type(given: Any, options: list[str]) -> str:
    """The declared problem type (any case), else multiple choice with options and free-form without."""
    if given in (None, ""):
        return "multiple choice" if options else "free-form"
    canonical = {p.lower(): p for p in PROBLEM_TYPES}
    if not isinstance(given, str) or given.strip().lower() not in canonical:
        raise ValueError(f"unknown problem_type {str(given)[:80]!r} (expected one of {', '.join(PROBLEM_TYPES)})")
    problem_type = canonical[given.strip().lower()]
    if problem_type == "multiple choice" and not options:
        raise ValueError("a multiple choice question needs 'options'")
    return problem_type


def read_questions(path: str | Path, limits: RecordLimits | None = None) -> list[Question]:
    """Every question of a questions file, in order; raises :class:`QuestionsError` listing each
    malformed line as ``file:line: reason`` (so that all of them are fixed in one go)."""
    limits = limits or RecordLimits()
    path = Path(path)
    try:
        # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines() breaks on.
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise QuestionsError(f"data.predict_file: cannot read {path} ({type(err).__name__}: {err})") from err
    questions, problems = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            if len(text.encode()) > limits.max_record_bytes:
                raise ValueError(f"line is over max_record_bytes={limits.max_record_bytes:,}")
            try:
                raw = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise ValueError(f"not JSON ({type(err).__name__}: {str(err)[:200]})") from err
            questions.append(make_question(raw, number, path.resolve().parent, limits))
        except ValueError as err:
            problems.append(f"{path}:{number}: {err}")
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise QuestionsError(f"{len(problems)} malformed line(s) in the questions file:\n" + "\n".join(problems[:MAX_REPORTED]) + more)
    if not questions:
        raise QuestionsError(f"data.predict_file: {path} holds no question (one JSON object per line)")
    return questions


def command_line_question(video: str, question: str, options: list[str] | None, limits: RecordLimits | None = None) -> Question:
    """The one question of ``data.predict_video`` + ``data.predict_question`` (a path relative to the working directory)."""
    raw = {"video": video, "question": question, **({"options": options} if options else {})}
    try:
        return make_question(raw, 0, Path.cwd(), limits or RecordLimits())
    except ValueError as err:
        raise QuestionsError(f"data.predict_video / data.predict_question: {err}") from err


def load_media(question: Question, frames: FrameSampling, max_bytes: int) -> Clip:
    """Decode the question's video or image (at most ``max_bytes``); raises MediaError naming it and the cause."""
    name = question.media
    if is_url(name):
        try:
            with urllib.request.urlopen(name, timeout=URL_TIMEOUT_S) as response:
                source: bytes | str = response.read(max_bytes + 1)
        except OSError as err:  # URLError, HTTPError, timeouts
            raise MediaError(f"{name}: cannot download ({type(err).__name__}: {err})") from err
        size = len(source)
    else:
        if not Path(name).is_file():
            raise MediaError(f"{name}: no such file")
        source, size = name, Path(name).stat().st_size
    if size > max_bytes:
        raise MediaError(f"{name}: over max_media_bytes={max_bytes:,}")
    if question.record.data_type == "image":
        return decode_image(source, frames, name=name)
    return decode_video(source, frames, name=name)
