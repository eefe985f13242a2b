"""Reading WebDataset tar shards so that nothing in them can crash, hang or exhaust a run.

A shard is a tar file whose members are grouped into samples by key: ``KEY.json`` (the record)
and ``KEY.<ext>`` (the media), consecutive members sharing the text before the first dot of
their file name (webdataset's convention, so any shard webdataset reads is read the same way).
:func:`shard_items` yields, in shard order, each sample as a dict (``__key__``, ``__url__`` and
one entry per extension) and an :class:`Unusable` for everything that cannot be used:

- a shard that cannot be opened, is not a tar, or is damaged part-way (the samples before the
  damage are kept; the rest counts once);
- a shard with no sample in it (an empty tar, or one of directories and unknown files);
- a sample with a member that is a link or a device instead of a regular file (links are never
  followed), a member name used twice, or a member over its size cap (never read into memory).

Only members the loader uses (``.json`` and the media extensions) are read; others are passed over
without reading. In a local, uncompressed ``.tar`` shard a media member is not read at all here:
its entry is a :class:`TarMember` (where its bytes lie in the file), which the decoder reads from
in place when the sample is decoded. A shuffle buffer of 256 samples then holds 256 records and
file positions, not 256 videos, and a 3.5 GiB video is never copied into a worker's memory
(PyAV reads the member through a window on the shard file). Other shards (``pipe:``, ``http://``,
``.tar.gz``) are streams: their media entries are bytes, read whole (:func:`media_bytes` gives the
bytes of either). Every shard therefore yields at least one item, which is what lets a training
stream over resampled shards count every failure towards its stop instead of looping silently.
:class:`SkipLog` keeps the warnings about skipped items readable when there are millions of them.

This module is also the one home of what defines a shard set for every reader (training, evaluation,
the CoT pipeline) and writer (:mod:`p2r.data.shards`): the member extensions, the default size cap on
media, :func:`expand_shards` (patterns to shard URLs) and :func:`count_samples`.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

RECORD_EXT = "json"
# A video's extension only says "this is a video": its container is found from its bytes (see
# p2r.data.video), so an MPEG-TS named .mp4 and an MP4 named .ts both decode. These are the names
# videos commonly come under, each decoded in tests/data/test_video_files.py.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "ts", "mts", "m2ts", "mpg", "mpeg", "vob",
                    "flv", "3gp", "3g2", "wmv", "asf", "ogv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
# Media bigger than this is skipped unread: an hour of 720p video is well under it.
DEFAULT_MAX_MEDIA_BYTES = 4 * 1024**3
_MAX_NAME = 512  # longer member names are cut in messages


@dataclass(frozen=True)
class TarMember:
    """A media member of a local tar shard, by position: its bytes stay in the file until decoded."""

    path: str  # the shard file
    offset: int  # where the member's data start in it
    size: int  # bytes

    def open(self) -> BinaryIO:
        """A read-only, seekable file over the member's bytes only (what PyAV and PIL read from)."""
        return io.BufferedReader(_Window(self.path, self.offset, self.size))

    def bytes(self) -> bytes:
        """The member's bytes, read whole (for a decoder or writer that needs them in memory)."""
        with self.open() as f:
            return f.read()


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + size)`` of a file as a file of their own. A shard cut short since it
    was indexed reads as a short member, which the decoder reports as truncated."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._offset + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset} before the start of a tar member")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def media_bytes(value: bytes | TarMember) -> bytes:
    """A sample's media entry as bytes, whether it was read (bytes) or left in its shard (TarMember)."""
    return value.bytes() if isinstance(value, TarMember) else value


def _local_tar(url: str) -> str | None:
    """The path of ``url`` when it is a plain, uncompressed local tar file (read in place), else None."""
    path = url.removeprefix("file://") if url.startswith("file://") else url
    if "://" in path or path.startswith("pipe:") or not path.endswith(".tar"):
        return None
    return path if os.path.isfile(path) else None


@dataclass(frozen=True)
class Unusable:
    """Something in a shard that could not be used: ``kind`` is the short reason a summary counts by."""

    where: str  # shard URL, and the key or member inside it
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 3] + "..."


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name; None for a name without an extension."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member_problem(member: tarfile.TarInfo, sample: dict[str, Any], ext: str, cap: int) -> str | None:
    """Why ``member`` cannot be used in ``sample`` (the short kind a summary counts by), or None."""
    if member.issym():
        return "symbolic link member (links are not followed)"
    if member.islnk():
        return "hard link member (links are not followed)"
    if not member.isfile():
        return "member that is not a regular file"
    if ext in sample:
        return "member name used twice"
    if member.size > cap:
        return "member over its size cap"
    return None


def shard_items(url: str, max_record_bytes: int, max_media_bytes: int) -> Iterator[dict[str, Any] | Unusable]:
    """The samples of shard ``url`` and an :class:`Unusable` for each part that cannot be used (see module doc).

    ``url`` is anything webdataset opens (a path, ``pipe:``, ``http(s)://``). Members over
    ``max_record_bytes`` (``.json``) or ``max_media_bytes`` (media) make their sample unusable
    without being read. Never raises for what is in the shard.
    """
    from webdataset.gopen import gopen  # here: modules that only need Sample run without webdataset

    local = _local_tar(url)
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # a missing file, a refused URL: whatever the opener raises
        yield Unusable(url, "shard cannot be opened", f"{type(err).__name__}: {err}")
        return
    samples = 0
    sample: dict[str, Any] | None = None
    bad: Unusable | None = None  # why the current sample is unusable
    reading = False  # inside a member's data (a failure there leaves the current sample incomplete)
    try:
        try:
            # A local file is read with seeks, so the media members it leaves in place are passed over
            # without reading them; a stream (or a compressed file named .tar) has to be read through.
            try:
                tar = tarfile.open(fileobj=stream, mode="r:" if local else "r|*")
            except tarfile.ReadError:
                if not local:
                    raise
                stream.seek(0)
                local, tar = None, tarfile.open(fileobj=stream, mode="r|*")
        except Exception as err:
            yield Unusable(url, "not a tar file", f"{type(err).__name__}: {err}")
            return
        try:
            for member in tar:
                tar.members = []  # stream mode keeps every header otherwise
                if member.isdir():
                    continue
                parts = _split_name(member.name)
                if parts is None or parts[1] not in MEDIA_EXTENSIONS + (RECORD_EXT,):
                    continue  # not a sample member (a README, a caption file): never read
                key, ext = parts
                if sample is None or key != sample["__key__"]:
                    if bad is not None or sample is not None:
                        samples += 1
                        yield bad or sample
                    sample, bad = {"__key__": key, "__url__": url}, None
                cap = max_record_bytes if ext == RECORD_EXT else max_media_bytes
                problem = _member_problem(member, sample, ext, cap)
                if problem is not None and bad is None:
                    detail = repr(_short(member.name))
                    if problem == "member over its size cap":
                        cap_name = "max_record_bytes" if ext == RECORD_EXT else "max_media_bytes"
                        detail += f": {member.size:,} bytes, {cap_name}={cap:,}"
                    bad = Unusable(f"{url}:{_short(key)}", problem, detail)
                if bad is None and local and ext != RECORD_EXT:
                    sample[ext] = TarMember(local, member.offset_data, member.size)
                elif bad is None:
                    reading = True
                    sample[ext] = tar.extractfile(member).read()
                    reading = False
        except Exception as err:  # truncated or damaged part-way: keep what came before
            if not reading and (bad is not None or sample is not None):
                samples += 1
                yield bad or sample
            yield Unusable(url, "shard damaged part-way", f"after {samples} sample(s): {type(err).__name__}: {err}")
            return
        if bad is not None or sample is not None:
            samples += 1
            yield bad or sample
        if samples == 0:
            yield Unusable(url, "shard holds no samples", "no .json or media member in it")
    finally:
        try:
            stream.close()
        except Exception as err:  # a pipe: command that failed, say
            log.debug("closing shard %s: %s", url, err)


def expand_shards(pattern: str | None, option: str) -> list[str]:
    """The shard URLs of ``pattern``: brace patterns and local globs (several joined by ``::``).

    A local glob (``data/train-*.tar``) expands to its sorted matches; a local path must exist
    (webdataset would skip a missing shard silently); URLs (``https://``, ``pipe:``) pass through.
    ``option`` names the setting in errors (``data.train_shards``, ``--shards``).
    """
    if not pattern:
        raise ValueError(f"{option} is not set: point it at WebDataset shards (see tools/make_shards.py)")
    import braceexpand  # here: modules that only need Sample run without webdataset and its dependencies

    urls = []
    for part in pattern.split("::"):
        for url in braceexpand.braceexpand(part):
            local = "://" not in url and not url.startswith("pipe:")
            if any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
            else:
                matches = [url] if not local or Path(url).is_file() else []
            if not matches:
                raise FileNotFoundError(f"{option}: no file matches {url!r}")
            urls.extend(matches)
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Samples (keys with a ``.json`` record) in local tar shards, from the tar headers only (None
    if a shard is not a local file).

    A shard that is not a tar counts 0; a truncated or damaged one counts the samples before the
    damage; both with a warning naming the shard.
    """
    total = 0
    for url in urls:
        if not Path(url).is_file():
            return None
        keys: set[str] = set()
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    parts = _split_name(member.name)
                    if member.isfile() and parts is not None and parts[1] == RECORD_EXT:
                        keys.add(parts[0])
        except Exception as err:  # not a tar, truncated, damaged headers
            log.warning("shard %s is damaged (%s): counting the %d samples before the damage", url, err, len(keys))
        total += len(keys)
    return total


class SkipLog:
    """Warnings about skipped data that stay readable however many there are.

    The first ``first`` skips are logged one line each; after that one summary line (counts by
    kind, and the latest skip) at most every ``interval_s`` seconds, and a last one at :meth:`close`.
    A stream over shards that are all bad logs a few dozen lines, not millions.
    """

    def __init__(self, logger: logging.Logger, what: str, first: int = 20, interval_s: float = 30.0) -> None:
        self.logger = logger
        self.what = what
        self.first = first
        self.interval_s = interval_s
        self.total = 0
        self.kinds: Counter[str] = Counter()
        self.last = ""  # the latest skip's message
        self._unreported = 0
        self._last_summary = time.monotonic()

    def skip(self, kind: str, message: str) -> None:
        """Note one skipped item of ``kind``; ``message`` names it and says why."""
        self.total += 1
        self.kinds[kind] += 1
        self.last = message
        if self.total <= self.first:
            self.logger.warning("%s: skipping %s%s", self.what, message,
                                " (further skips are summarised)" if self.total == self.first else "")
            return
        self._unreported += 1
        if time.monotonic() - self._last_summary >= self.interval_s:
            self._summarise()

    def _summarise(self) -> None:
        kinds = ", ".join(f"{k}: {n:,}" for k, n in self.kinds.most_common(5))
        self.logger.warning("%s: %d more skipped (%d in all; by kind: %s); latest: %s",
                            self.what, self._unreported, self.total, kinds, self.last)
        self._unreported = 0
        self._last_summary = time.monotonic()

    def close(self) -> None:
        """Log what was skipped since the last line, if anything."""
        if self._unreported:
            self._summarise()
