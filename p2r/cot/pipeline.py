"""The three-step process-aware CoT pipeline (METHOD.md, "Three-step CoT generation") and its driver.

1. Generation: a teacher writes ``<observation>..</observation><think>..</think><answer>..</answer>``
   for the record's question and media (:mod:`p2r.cot.teachers`, :mod:`p2r.cot.prompt`).
2. Verification: both format rewards must be 1 and the reasoning reward's task metric on the
   answer (``reasoning_accuracy`` with its default, Video-R1's exact reader: the training reward, so
   a kept trace answers in the form RL rewards) at least ``min_score`` (0.6 in the paper).
3. Observation sufficiency: the perception reward's judge (question, correct answer and only the
   observation) must say the answer follows from the observation.

Output, in ``out_dir``: ``cot.jsonl``, one line per finished record in the VideoP2R release layout
(the input record with ``observation``, ``process``, ``output`` from the teacher, ``reward`` = the
step-2 task score, ``select`` = kept, ``dropped_at``/``drop_reason``/``drop_detail`` = which step
dropped it and why, ``sufficient`` = the judge's verdict), appended and flushed as each chunk
finishes; ``shards/`` with the kept records as WebDataset shards for SFT; ``stats.json``.

Resuming: an id with a line in ``cot.jsonl`` is finished and skipped. A teacher answer is
expensive, so every answer is also appended to ``teacher_replies.jsonl`` the moment it arrives,
before verification and judging: a crash between the answer and the finished line (or a judge
that is down) costs a rerun only the cheap steps, never a second teacher call. ``cot.jsonl``
could not be that cache by itself: it would need a line before judging and another after, and the
file must hold each id once. A last line cut by a crash is removed on reopening (its record is
redone from the reply cache). Failures of a service, not of the sample (the teacher failed after
its retries, the judge gave no verdict), are not finished: they are counted, reported, and retried
by the next run. An undecodable video is finished (dropped at step 1): rerunning will not fix it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from callbacks.reward_callbacks import judge_answer_text
from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.format import perception_format, reasoning_format
from callbacks.rewards.judges import Judge, JudgeRequest, JudgeResult
from callbacks.rewards.parsing import extract_tag, video_r1_answer
from callbacks.segments import split_segments
from p2r.cot.prompt import teacher_prompt
from p2r.cot.stats import RETRIED_REASONS, Row, Summary, summarize
from p2r.cot.teachers import Teacher, TeacherReply, TeacherRequest
from p2r.data.prompts import build_question
from p2r.data.records import RecordError, RecordLimits, VideoRecord, parse_record
from p2r.data.shard_reader import (
    DEFAULT_MAX_MEDIA_BYTES,
    IMAGE_EXTENSIONS,
    MEDIA_EXTENSIONS,
    RECORD_EXT,
    VIDEO_EXTENSIONS,
    Unusable,
    count_samples,
    expand_shards,
    media_bytes,
    shard_items,
)
from p2r.data.shards import load_raw_records, media_extension, validate_records, write_shards
from p2r.data.video import Clip, FrameSampling, MediaError, decode_image, decode_video

log = logging.getLogger(__name__)

OUTPUT_FILE = "cot.jsonl"
REPLIES_FILE = "teacher_replies.jsonl"
STATS_FILE = "stats.json"


# ---- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """A usable record and how to get its media bytes (read only when needed)."""

    record: VideoRecord
    ext: str
    load: Callable[[], bytes]


class RecordFileSource:
    """A Video-R1 / VideoP2R record file (JSON list or JSON Lines) with media under ``media_root``.

    Every record is validated up front (:func:`p2r.data.shards.validate_records`): bad records and
    missing media land in ``rejected`` and never reach the teacher. Re-iterable.
    """

    def __init__(self, path: str | Path, media_root: str | Path) -> None:
        path = Path(path)
        good, self.rejected = validate_records(load_raw_records(path), media_root, source=path.name)
        self.items = [InputItem(record, media_extension(media), media.read_bytes) for record, media in good]
        self.size: int | None = len(self.items)

    def __iter__(self) -> Iterator[InputItem]:
        return iter(self.items)


class ShardSource:
    """WebDataset shards (``KEY.json`` + ``KEY.<media ext>``), streamed; media stays inside the sample.

    Read as training reads them (:func:`p2r.data.shard_reader.shard_items`: links, duplicate and
    oversized members, damaged and non-tar shards are named, never followed or fatal). Bad samples
    (those, an unreadable record, no media, a repeated id) seen while iterating land in ``rejected``.
    """

    def __init__(self, pattern: str, max_record_bytes: int = RecordLimits().max_record_bytes,
                 max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES) -> None:
        self.urls = expand_shards(pattern, "--shards")
        self.size = count_samples(self.urls)
        self.max_record_bytes = max_record_bytes
        self.max_media_bytes = max_media_bytes
        self.rejected: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[InputItem]:
        self.rejected = []
        seen: set[str] = set()
        items = (item for url in self.urls for item in shard_items(url, self.max_record_bytes, self.max_media_bytes))
        for raw in items:
            if isinstance(raw, Unusable):
                self.rejected.append((raw.where, f"{raw.kind} ({raw.detail})" if raw.detail else raw.kind))
                continue
            where = f"{raw['__url__']}:{raw['__key__']}"
            if RECORD_EXT not in raw:
                self.rejected.append((where, "no .json record in the sample"))
                continue
            try:
                record = parse_record(json.loads(raw[RECORD_EXT]), where=where, default_id=raw["__key__"])
            except (RecordError, ValueError, RecursionError) as err:  # bad JSON, a 5000-digit number, deep nesting
                self.rejected.append((where, str(err).removeprefix(f"{where}: ")))
                continue
            ext = next((k for k in MEDIA_EXTENSIONS if k in raw), None)
            if ext is None:
                self.rejected.append((where, "no media in the sample"))
            elif record.id in seen:
                self.rejected.append((where, f"duplicate id: {record.id!r}"))
            else:
                seen.add(record.id)
                data = raw[ext]
                yield InputItem(record, ext, lambda data=data: media_bytes(data))


def decode_media(item: InputItem, frames: FrameSampling) -> Clip:
    """The record's frames: a video sampled and resized by ``frames``, or an image as one frame."""
    name = f"{item.record.id} ({item.record.path})"
    if item.record.data_type == "video" and item.ext in VIDEO_EXTENSIONS:
        return decode_video(item.load(), frames, name=name)
    if item.ext in IMAGE_EXTENSIONS:
        return decode_image(item.load(), frames, name=name)
    raise MediaError(f"{name}: a {item.record.data_type} record with .{item.ext} media")


# ---- the steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Where a record's run through the steps ended; ``dropped_at`` None means kept."""

    dropped_at: str | None
    reason: str | None = None
    detail: str = ""
    text: str | None = None  # the teacher's reply, when there is one
    reward: float | None = None  # the step-2 task score
    sufficient: bool | None = None  # the step-3 verdict

    @property
    def retried(self) -> bool:
        """A service failure: not finished, so the next run tries this record again."""
        return self.reason in RETRIED_REASONS


def verify(text: str, record: VideoRecord, min_score: float, truncated: bool = False) -> Outcome:
    """Step 2: both formats must be 1 and the task score at least ``min_score``.

    Returns the drop, or an outcome with ``dropped_at`` None when the trace passes. ``reward`` is
    the task metric on the answer even when the format fails, so the output shows how often the
    teacher was right but sloppy.
    """
    score = reasoning_accuracy(text, record.solution, record.problem_type, record.options)
    perception_ok, reasoning_ok = perception_format(text) == 1.0, reasoning_format(text) == 1.0
    cut = " (the reply hit the token limit)" if truncated else ""
    if not text.strip():
        return Outcome("verification", "malformed trace", "empty reply" + cut, text, score)
    if not perception_ok and not reasoning_ok:
        return Outcome("verification", "malformed trace", "no well-formed observation, think or answer" + cut, text, score)
    if not perception_ok:
        return Outcome("verification", "malformed observation", "one observation block must come before the think and answer" + cut, text, score)
    if not reasoning_ok:
        return Outcome("verification", "malformed think/answer", "one think block then one answer block must follow" + cut, text, score)
    if score < min_score:
        detail = f"score {score:.2f} < {min_score}: answered {video_r1_answer(text)[:80]!r}, expected {record.answer[:80]!r}"
        return Outcome("verification", "low answer score", detail, text, score)
    return Outcome(None, text=text, reward=score)


def sufficiency_request(record: VideoRecord, text: str) -> JudgeRequest:
    """Step 3's question to the judge, built exactly as the perception reward builds it."""
    answer = judge_answer_text({"answer": record.answer, "options": record.options, "problem_type": record.problem_type})
    return JudgeRequest(question=build_question(record), answer=answer,
                        observation=split_segments(text).observation, facts=record.facts)


def sufficiency_outcome(verified: Outcome, result: JudgeResult) -> Outcome:
    """Step 3 on a trace that passed step 2: kept when the judge says sufficient; no verdict is retried later."""
    if result.score is None:
        return Outcome("sufficiency", "judge error", result.error or "", verified.text, verified.reward)
    if result.score < 1.0:
        return Outcome("sufficiency", "insufficient observation", "the judge cannot deduce the answer from the observation",
                       verified.text, verified.reward, sufficient=False)
    return Outcome(None, text=verified.text, reward=verified.reward, sufficient=True)


def output_line(record: VideoRecord, outcome: Outcome) -> dict[str, Any]:
    """The finished record in the release layout: the input fields, the teacher's trace, the verdicts."""
    text = (outcome.text or "").strip()
    observation, think = extract_tag(text, "observation"), extract_tag(text, "think")
    line = record.to_dict()
    line.update(
        observation=f"<observation>{observation}</observation>" if observation is not None else "",
        process=f"<think>{think}</think>" if think is not None else "",
        output=text,
        reward=outcome.reward,
        select=outcome.dropped_at is None,
        dropped_at=outcome.dropped_at,
        drop_reason=outcome.reason,
        drop_detail=outcome.detail,
        sufficient=outcome.sufficient,
    )
    return line


# ---- the append-only store ---------------------------------------------------------------------


def cut_torn_tail(path: Path) -> None:
    """Remove a last line a crash left without its newline (the record it held is done again)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                f.truncate(pos + newline + 1)
                return
        f.truncate(0)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, object)`` per line; a bad line in the middle of the file is an error naming it."""
    if not path.is_file():
        return
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield offset, json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}); fix or delete that line") from err
            offset += len(raw)


class OutputStore:
    """``cot.jsonl`` (finished records) and ``teacher_replies.jsonl`` (every teacher answer), append-only.

    Holds in memory only what resuming needs: each finished id's table row, the byte offset of each
    kept line (shards are written from the file), and the replies of ids not yet finished.
    """

    def __init__(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.output_path, self.replies_path = out / OUTPUT_FILE, out / REPLIES_FILE
        cut_torn_tail(self.output_path)
        cut_torn_tail(self.replies_path)
        self.finished: dict[str, Row] = {}
        self.kept_offsets: dict[str, int] = {}
        for offset, line in iter_jsonl(self.output_path):
            self._index(line, offset)
        self.replies: dict[str, tuple[str, bool]] = {}
        for _, reply in iter_jsonl(self.replies_path):
            if reply["id"] not in self.finished:
                self.replies[reply["id"]] = (reply["text"], bool(reply.get("truncated", False)))
        self._lock = threading.Lock()
        self._output = open(self.output_path, "ab")
        self._replies = open(self.replies_path, "ab")

    def _index(self, line: dict[str, Any], offset: int) -> None:
        record_id = str(line["id"])
        self.finished[record_id] = Row(line["problem_type"], line["data_type"], line.get("dropped_at"), line.get("drop_reason"))
        if line.get("select"):
            self.kept_offsets[record_id] = offset

    @staticmethod
    def _encode(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")

    def save_reply(self, record_id: str, reply: TeacherReply) -> None:
        """Append one teacher answer (thread-safe: the HTTP teacher's workers call this)."""
        data = self._encode({"id": record_id, "text": reply.text, "truncated": reply.truncated})
        with self._lock:
            self._replies.write(data)
            self._replies.flush()
            self.replies[record_id] = (reply.text or "", reply.truncated)

    def finish(self, lines: list[dict[str, Any]]) -> None:
        """Append finished records; from here on their ids are skipped."""
        with self._lock:
            for line in lines:
                offset = self._output.tell()
                self._output.write(self._encode(line))
                self._index(line, offset)
                self.replies.pop(str(line["id"]), None)
            self._output.flush()

    def kept_line(self, record_id: str) -> dict[str, Any]:
        """The finished line of a kept record, read back from ``cot.jsonl``."""
        with open(self.output_path, "rb") as f:
            f.seek(self.kept_offsets[record_id])
            return json.loads(f.readline())

    def close(self) -> None:
        self._output.close()
        self._replies.close()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the driver --------------------------------------------------------------------------------


@dataclass
class RunReport:
    """What one run did: a table row per record in scope, and the records left for the next run."""

    rows: list[Row] = field(default_factory=list)
    retry: list[tuple[str, Outcome]] = field(default_factory=list)  # (id, outcome) of service failures
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of unusable records
    skipped: int = 0  # finished by an earlier run
    asked: int = 0  # teacher requests made by this run
    reused: int = 0  # replies taken from the reply cache instead of asking again
    shards: list[Path] = field(default_factory=list)
    kept: int = 0  # rows kept so far (kept up to date for the progress bar)

    def summary(self) -> Summary:
        return summarize(self.rows)

    def add_row(self, row: Row) -> None:
        self.rows.append(row)
        self.kept += row.dropped_at is None

    def add(self, record: VideoRecord, outcome: Outcome) -> None:
        self.add_row(Row(record.problem_type, record.data_type, outcome.dropped_at, outcome.reason))
        if outcome.retried:
            self.retry.append((record.id, outcome))


def process_chunk(
    items: list[InputItem],
    teacher: Teacher,
    judge: Judge,
    store: OutputStore,
    frames: FrameSampling,
    min_score: float,
    report: RunReport,
    decode_workers: int = 2,
) -> list[Outcome]:
    """Run the three steps on unfinished records; append the finished ones to the store."""
    outcomes: dict[int, Outcome] = {}
    replies: dict[int, tuple[str, bool]] = {}
    fresh = []
    for i, item in enumerate(items):
        if item.record.id in store.replies:
            replies[i] = store.replies[item.record.id]
            report.reused += 1
        else:
            fresh.append(i)

    def decode(i: int) -> Clip | Outcome:
        try:
            return decode_media(items[i], frames)
        except (MediaError, OSError) as err:
            return Outcome("generation", "undecodable media", str(err)[:300])

    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        decoded = list(pool.map(decode, fresh))
    requests, asked = [], []
    for i, clip in zip(fresh, decoded):
        if isinstance(clip, Outcome):
            outcomes[i] = clip
        else:
            record = items[i].record
            requests.append(TeacherRequest(record.id, teacher_prompt(record), clip, record.data_type))
            asked.append(i)

    def on_reply(k: int, reply: TeacherReply) -> None:
        if reply.text is not None:
            store.save_reply(requests[k].id, reply)

    report.asked += len(requests)
    for i, reply in zip(asked, teacher.answer(requests, on_reply)):
        if reply.text is None:
            outcomes[i] = Outcome("generation", "teacher error", reply.error or "")
        else:
            replies[i] = (reply.text, reply.truncated)

    to_judge: list[tuple[int, Outcome]] = []
    for i, (text, truncated) in replies.items():
        checked = verify(text, items[i].record, min_score, truncated)
        if checked.dropped_at is None:
            to_judge.append((i, checked))
        else:
            outcomes[i] = checked
    if to_judge:
        results = judge.judge([sufficiency_request(items[i].record, checked.text or "") for i, checked in to_judge])
        for (i, checked), result in zip(to_judge, results):
            outcomes[i] = sufficiency_outcome(checked, result)

    ordered = [outcomes[i] for i in range(len(items))]
    store.finish([output_line(item.record, o) for item, o in zip(items, ordered) if not o.retried])
    return ordered


def _kept_samples(source: Iterable[InputItem], store: OutputStore, limit: int | None) -> Iterator[tuple[VideoRecord, bytes, str]]:
    """``(record with its trace, media bytes, ext)`` of every kept record in scope, in source order."""
    for item in islice(source, limit):
        if item.record.id not in store.kept_offsets:
            continue
        try:
            media = item.load()
        except OSError as err:  # the media went away since it was decoded: the JSONL still has the record
            log.warning("kept record %s left out of the shards: %s", item.record.id, err)
            continue
        record = parse_record(store.kept_line(item.record.id), where=f"{OUTPUT_FILE}:{item.record.id}")
        yield record, media, item.ext


def run_pipeline(
    source: RecordFileSource | ShardSource,
    teacher: Teacher,
    judge: Judge,
    out_dir: str | Path,
    frames: FrameSampling | None = None,
    min_score: float = 0.6,
    limit: int | None = None,
    shard_prefix: str = "train",
    samples_per_shard: int = 1000,
    decode_workers: int = 2,
    progress: bool = True,
) -> RunReport:
    """Generate, verify and judge every unfinished record of the first ``limit`` usable ones.

    Records finished by an earlier run are skipped (their rows still count in the table); at the
    end the kept records in scope are written as shards under ``out_dir/shards`` and the table as
    ``out_dir/stats.json``. Returns what this run did.
    """
    frames = frames or FrameSampling()
    out = Path(out_dir)
    report = RunReport()
    total = source.size if limit is None else (limit if source.size is None else min(limit, source.size))
    with OutputStore(out) as store, tqdm(total=total, desc="CoT", unit="record", disable=not progress) as bar:

        def unfinished() -> Iterator[InputItem]:
            for item in islice(source, limit):
                row = store.finished.get(item.record.id)
                if row is None:
                    yield item
                    continue
                report.add_row(row)
                report.skipped += 1
                bar.update()

        chunk: list[InputItem] = []
        for item in unfinished():
            chunk.append(item)
            if len(chunk) == teacher.chunk_size:
                _run_chunk(chunk, teacher, judge, store, frames, min_score, report, decode_workers, bar)
                chunk = []
        if chunk:
            _run_chunk(chunk, teacher, judge, store, frames, min_score, report, decode_workers, bar)
        report.rejected = list(source.rejected)
        report.shards = write_shards(_kept_samples(source, store, limit), out / "shards", shard_prefix, samples_per_shard)
    stats = {"summary": report.summary().to_dict(), "rejected": len(report.rejected),
             "retry": [{"id": i, "step": o.dropped_at, "reason": o.reason, "detail": o.detail} for i, o in report.retry]}
    (out / STATS_FILE).write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _run_chunk(chunk: list[InputItem], teacher: Teacher, judge: Judge, store: OutputStore, frames: FrameSampling,
               min_score: float, report: RunReport, decode_workers: int, bar: tqdm) -> None:
    """One chunk through the steps, its rows into the report, the progress bar forward."""
    for item, outcome in zip(chunk, process_chunk(chunk, teacher, judge, store, frames, min_score, report, decode_workers)):
        report.add(item.record, outcome)
    bar.set_postfix(kept=report.kept, retry=len(report.retry))
    bar.update(len(chunk))
