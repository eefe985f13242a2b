"""Validate Video-R1 / VideoP2R records against their media, and pack them into WebDataset shards.

Validation checks each record's fields and that its media file exists and is not empty;
:func:`verify_media` also decodes every file's sampled frames (in worker processes), so media that
would only be skipped during training is reported before it is written.

A shard is a plain tar file; each sample is two members sharing one key: ``KEY.json`` (the
record, :meth:`VideoRecord.to_dict` as UTF-8 JSON) and ``KEY.<ext>`` (the media bytes, ``ext``
one of :data:`MEDIA_EXTENSIONS`). WebDataset groups members by the text before the first dot of
the file name, so keys never contain dots or slashes. Shards are written to ``NAME.tar.tmp`` and
renamed when complete, so a crash never leaves a truncated ``NAME.tar`` for a loader to choke on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from p2r.data.records import RecordError, VideoRecord, parse_record
from p2r.data.shard_reader import MEDIA_EXTENSIONS, VIDEO_EXTENSIONS
from p2r.data.video import FrameSampling, MediaError, decode_image, decode_video, media_cause

SHARD_DIGITS = 6
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
# Fixed member metadata, so the same samples always give byte-identical shards.
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o444


def safe_key(record_id: str) -> str:
    """A WebDataset key for ``record_id``: only ``[A-Za-z0-9_-]``, distinct ids give distinct keys.

    Ids that are already safe are kept as they are (readable shards); others get their unsafe runs
    replaced by ``_`` plus a short hash of the original id, so ``a/b`` and ``a.b`` stay apart.
    """
    cleaned = _UNSAFE_KEY_CHARS.sub("_", record_id)
    if cleaned == record_id and record_id:
        return record_id
    digest = hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:10]
    return f"{cleaned}_{digest}"


def media_extension(path: str | Path) -> str:
    """The lower-case extension of a media path without the dot ('' when there is none)."""
    return Path(path).suffix.lower().lstrip(".")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


def shard_pattern(paths: list[Path]) -> str:
    """The brace pattern WebDataset expands to exactly ``paths`` (as written by :func:`write_shards`)."""
    if not paths:
        raise ValueError("no shards to describe")
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0], paths[-1]
    prefix = first.name[: -len(f"{0:0{SHARD_DIGITS}d}.tar")]
    lo, hi = first.name[len(prefix) : -4], last.name[len(prefix) : -4]
    return str(first.parent / f"{prefix}{{{lo}..{hi}}}.tar")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MEMBER_MTIME
    info.mode = _MEMBER_MODE
    tar.addfile(info, io.BytesIO(data))


def _write_one_shard(path: Path, samples: list[tuple[str, bytes, str, bytes]]) -> None:
    """Write ``samples`` (key, json bytes, ext, media bytes) to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, json_bytes, ext, media in samples:
                _add_member(tar, f"{key}.json", json_bytes)
                _add_member(tar, f"{key}.{ext}", media)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encoded_samples(records: Iterable[tuple[VideoRecord, bytes, str]]) -> Iterator[tuple[str, bytes, str, bytes]]:
    """Check and encode each sample; raises on a duplicate key, an unknown extension or empty media."""
    seen: dict[str, str] = {}
    for record, media, ext in records:
        ext = ext.lower().lstrip(".")
        if ext not in MEDIA_EXTENSIONS:
            raise ValueError(f"record {record.id}: media extension {ext!r} is not one of {', '.join(MEDIA_EXTENSIONS)}")
        if not media:
            raise ValueError(f"record {record.id}: empty media bytes")
        key = safe_key(record.id)
        if key in seen:
            raise ValueError(f"record {record.id}: key {key!r} already used by record {seen[key]}; ids must be unique")
        seen[key] = record.id
        yield key, json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8"), ext, media


def _remove_stale_shards(out_dir: Path, prefix: str, keep: int) -> None:
    """Delete ``prefix-NNNNNN.tar`` shards numbered ``keep`` or above left by an earlier, larger run,
    so a glob over ``out_dir`` never mixes two runs."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{{SHARD_DIGITS}}})\.tar")
    for path in out_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()


def write_shards(
    records: Iterable[tuple[VideoRecord, bytes, str]],
    out_dir: str | Path,
    prefix: str,
    max_samples_per_shard: int = 1000,
) -> list[Path]:
    """Pack ``(record, media_bytes, media_ext)`` samples into ``out_dir/prefix-000000.tar``, ...

    Streams: holds one shard's samples in memory at a time. Returns the shard paths in order
    (empty when there were no records). Raises ``ValueError`` on duplicate keys or bad media;
    shards completed before the error stay, the one in progress is removed.
    """
    if max_samples_per_shard < 1:
        raise ValueError("max_samples_per_shard must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    batch: list[tuple[str, bytes, str, bytes]] = []
    for sample in _encoded_samples(records):
        batch.append(sample)
        if len(batch) == max_samples_per_shard:
            paths.append(out / shard_name(prefix, len(paths)))
            _write_one_shard(paths[-1], batch)
            batch = []
    if batch:
        paths.append(out / shard_name(prefix, len(paths)))
        _write_one_shard(paths[-1], batch)
    _remove_stale_shards(out, prefix, keep=len(paths))
    return paths


def _check_media(record: VideoRecord, media_root: Path) -> tuple[Path, str | None]:
    """The media path of ``record`` and the reason it is unusable (None when it is fine)."""
    path = media_root / record.path
    if media_extension(path) not in MEDIA_EXTENSIONS:
        return path, f"unsupported media extension: {record.path!r}"
    if not path.is_file():
        return path, f"media file not found: {path}"
    if path.stat().st_size == 0:
        return path, f"media file is empty: {path}"
    return path, None


def validate_records(
    raw_records: Iterable[Any], media_root: str | Path, source: str = "records"
) -> tuple[list[tuple[VideoRecord, Path]], list[tuple[str, str]]]:
    """Split raw records into usable ones and the rest, checking every record (never stopping early).

    ``good`` holds ``(record, media path)``; ``bad`` holds ``(where, reason)`` with ``where`` like
    ``"train.json[17]"`` (``source`` and the position). A record is bad when
    :func:`parse_record` rejects it, its media file is missing or empty, its extension is not a
    known media type, or its id repeats an earlier record's (ids key shards and predictions).
    Records without an id get ``"<source stem>-<position>"``.
    """
    root = Path(media_root)
    stem = Path(source).name.split(".")[0] or "record"
    good: list[tuple[VideoRecord, Path]] = []
    bad: list[tuple[str, str]] = []
    first_seen: dict[str, str] = {}
    for index, raw in enumerate(raw_records):
        where = f"{source}[{index}]"
        try:
            record = parse_record(raw, where=where, default_id=f"{stem}-{index:06d}")
        except (RecordError, ValueError) as err:
            bad.append((where, str(err).removeprefix(f"{where}: ")))
            continue
        if record.id in first_seen:
            bad.append((where, f"duplicate id: {record.id!r} (first used at {first_seen[record.id]})"))
            continue
        path, problem = _check_media(record, root)
        if problem is not None:
            bad.append((where, problem))
            continue
        first_seen[record.id] = where
        good.append((record, path))
    return good, bad


def undecodable_reason(path: str, data_type: str, frames: FrameSampling) -> str | None:
    """Why the media at ``path`` cannot be used as the DataModule would decode it (None when it can).

    A video record with a video extension is decoded as a video (its sampled frames, ``frames``),
    anything else as an image. The reason starts with ``undecodable <kind>, <cause>`` (counted by
    :func:`reason_kind`).
    """
    is_video = data_type == "video" and media_extension(path) in VIDEO_EXTENSIONS
    try:
        if is_video:
            decode_video(path, frames, name=path)
        else:
            decode_image(path, frames, name=path)
    except MediaError as err:
        return f"undecodable {'video' if is_video else 'image'}, {media_cause(err)}: {err}"
    return None


def _undecodable_reason_of(job: tuple[str, str, FrameSampling]) -> str | None:
    return undecodable_reason(*job)


def verify_media(
    good: list[tuple[VideoRecord, Path]], frames: FrameSampling, workers: int, progress: bool = True
) -> tuple[list[tuple[VideoRecord, Path]], list[tuple[str, str]]]:
    """Decode every record's media in ``workers`` processes; split into decodable ones and the rest.

    ``bad`` holds ``("id <record id>", reason)``, in the order of ``good``.
    """
    jobs = [(str(path), record.data_type, frames) for record, path in good]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_undecodable_reason_of, jobs, chunksize=max(1, min(16, len(jobs) // (4 * max(1, workers)))))
        reasons = list(tqdm(results, total=len(jobs), desc="verifying media", unit="file", disable=not progress))
    kept = [item for item, reason in zip(good, reasons) if reason is None]
    bad = [(f"id {record.id!r}", reason) for (record, _), reason in zip(good, reasons) if reason is not None]
    return kept, bad


def reason_kind(reason: str) -> str:
    """The kind of a rejection reason, without its details: what the report counts by."""
    return re.split(r": | \(", reason, maxsplit=1)[0]


def count_reasons(bad: list[tuple[str, str]]) -> Counter[str]:
    """How many bad records there are of each :func:`reason_kind`."""
    return Counter(reason_kind(reason) for _, reason in bad)


def load_raw_records(path: str | Path) -> list[Any]:
    """Read a record file: a JSON list (``.json`` or ``.json.gz``) or JSON Lines (``.jsonl[.gz]``).

    The format is decided by content (a leading ``[`` means a list), since ``.json`` files holding
    one object per line are common in the wild.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from err
    return records
