"""Video and image decoding, frame sampling by presentation time, and the per-run pixel budget.

Every number here comes from the run's config (``FrameSampling``): Video-R1 hard-coded its
frame counts and pixel limits, which was its users' top complaint.

Sampling. A clip's frames are listed with their presentation timestamps (from the container,
before anything is decoded). The number of frames is its duration x a target fps, clamped to
[min_frames, max_frames] and rounded to a multiple of the temporal patch (2 for Qwen-VL). The
duration is cut into that many equal bins and each bin takes the frame on screen at its centre
(the last frame whose timestamp is not after it), so a variable-frame-rate clip is sampled
evenly in time, not in frame count; for a constant rate this is the centre frame of equal index
bins. The clip keeps the real timestamps of the frames it took (``Clip.timestamps``), which the
backbone hands to the processor.

Size. Each frame is resized so that its sides are multiples of ``size_factor`` (28 = patch 14 x
merge 2 for Qwen-VL) with Qwen's ``smart_resize`` arithmetic (:func:`fit_pixels`), applied here
so that the processor never resizes again and the vision-token count is known from the config.

Decoders, tried in order for each file (``FrameSampling.decoders``):

- PyAV (FFmpeg 7, bundled in its wheel): every codec FFmpeg decodes (H.264, HEVC incl. 10-bit,
  VP8/9, AV1 via dav1d, MPEG-4, MJPEG, ...) in any container it reads (MP4/MOV, MKV/WebM, AVI,
  MPEG-TS/PS, FLV, ASF, Ogg, ...). The container is found from the bytes alone, never from the
  file's name, so a file on disk opens exactly as its bytes in a shard do. It seeks to the
  keyframe before each needed group of frames, lets the decoder drop non-reference frames that
  are not sampled (``skip_frame``, where the decoder honours it per packet), and converts and
  resizes each sampled frame in one swscale pass as it comes out, so no full-resolution RGB frame
  is ever held. It applies the display rotation (display matrix). Cover art (an attached picture)
  is not a video stream; of several video streams the first is used, with a warning.
- decord (FFmpeg 4.1): the fallback. It has no AV1 decoder, fails on MPEG-TS named .mp4 and
  ignores display rotation (measured: 90-degree clips come back as 4-channel garbage), and it
  copies bytes input twice; it decodes the sampled frames in chunks of ``chunk_frames`` and
  resizes each chunk before decoding the next.

At full resolution both give the same frames (same FFmpeg colour conversion); after resizing
they differ by the order of conversion and scaling (PyAV scales the YUV planes, decord's path
scales RGB): a mean difference under 2 grey levels.

A file that no decoder can read raises :class:`MediaError` naming the sample and the cause
(no video stream, an image in a video's name, the codec, the container, truncation).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image

from p2r.data.shard_reader import TarMember

log = logging.getLogger(__name__)


class MediaError(ValueError):
    """A video or image that cannot be decoded; the message names it and why."""


class BrokenMedia(MediaError):
    """The file itself is unusable (empty, truncated, no video stream, an image): no other decoder is tried."""


@dataclass
class FrameSampling:
    """How frames are taken from a clip, how large each frame may be, and how it is decoded."""

    fps: float = 2.0
    """Target sampling rate in frames per second of video."""
    min_frames: int = 4
    """Fewest frames taken from any clip (a clip with fewer frames repeats some)."""
    max_frames: int = 16
    """Most frames taken from any clip (paper: 16 for training, 32 for evaluation)."""
    frame_multiple: int = 2
    """Frame counts are rounded to a multiple of this (Qwen-VL's temporal patch is 2)."""
    min_pixels: int = 16 * 28 * 28
    """Smallest area of a frame after resizing, in pixels (see fit_pixels for the exact rule)."""
    max_pixels: int = 128 * 28 * 28
    """Largest area of a frame after resizing (paper: 128*28*28 training, 256*28*28 evaluation)."""
    size_factor: int = 28
    """Frame sides are multiples of this (patch size x spatial merge)."""
    decoders: list[Literal["pyav", "decord"]] = field(default_factory=lambda: ["pyav", "decord"])
    """Video decoders tried in order for each file; the next one is tried when one fails."""
    decoder_threads: int = 1
    """Decoding threads per clip (per DataLoader worker); 0 lets FFmpeg choose from the cores."""
    chunk_frames: int = 4
    """Full-resolution frames decord decodes at once before resizing them (bounds its memory)."""


@dataclass
class Clip:
    """Decoded frames of one video (or one image as a single frame) and where they came from."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float  # the source's average frame rate: its frame count / its duration (1.0 for an image)
    frame_indices: list[int] = field(default_factory=list)  # each frame's index in presentation order
    total_frames: int = 1
    is_image: bool = False
    timestamps: list[float] = field(default_factory=list)  # seconds from the first frame; default index / fps
    notes: list[str] = field(default_factory=list)  # how it was read, worth a warning (which of several streams)

    def __post_init__(self) -> None:
        if not self.timestamps:
            self.timestamps = [index / self.fps for index in self.frame_indices]


def num_frames_to_sample(duration: float, cfg: FrameSampling) -> int:
    """How many frames to take from ``duration`` seconds: x target fps, clamped, rounded to the multiple."""
    wanted = round(duration * cfg.fps)
    wanted = max(cfg.min_frames, min(cfg.max_frames, wanted))
    wanted = max(cfg.frame_multiple, (wanted // cfg.frame_multiple) * cfg.frame_multiple)
    if wanted < cfg.min_frames:  # rounding down must not go below min_frames: round up instead
        wanted += cfg.frame_multiple
    return wanted


def sample_frame_indices(times: Sequence[float], duration: float, num_frames: int) -> list[int]:
    """Indices of the frames on screen at the centres of ``num_frames`` equal bins of ``duration``.

    ``times`` are the frames' presentation timestamps in seconds from the first frame, ascending.
    A clip with fewer frames than bins repeats frames, so the vision-token count stays what the
    config promised. For a constant rate (``times[i] = i / fps``, ``duration = len / fps``) frame
    ``floor(len * (i + 0.5) / num_frames)`` is taken.
    """
    if not times:
        raise MediaError("video has no frames")
    # Bin centres as exact fractions of the duration, so constant-rate clips hit exact indices.
    centres = [duration * (2 * i + 1) / (2 * num_frames) for i in range(num_frames)]
    return [max(0, bisect.bisect_right(times, centre + 1e-9) - 1) for centre in centres]


def fit_pixels(height: int, width: int, cfg: FrameSampling) -> tuple[int, int]:
    """The (height, width) to resize to: Qwen's ``smart_resize`` (qwen-vl-utils) arithmetic.

    Sides are multiples of ``size_factor`` near the original aspect ratio. Both sides are first
    rounded to the nearest multiple; if that area is above ``max_pixels`` the frame is scaled
    down to that area and each side FLOORED to a multiple (so the result never exceeds
    ``max_pixels``); if below ``min_pixels`` it is scaled up and each side CEILED (never below
    ``min_pixels``). The bound on the other side is not guaranteed: when the budget is narrower
    than one rounding step (e.g. ``min_pixels == max_pixels`` for a non-square frame) flooring
    can land below ``min_pixels`` and ceiling above ``max_pixels``, as smart_resize does; we keep
    its result so that frames match what Qwen's own pipeline feeds the model. One difference: a
    side never floors to 0 here (smart_resize would return 0 for aspect ratios near its limit).
    """
    f = cfg.size_factor
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > cfg.max_pixels:
        scale = math.sqrt(height * width / cfg.max_pixels)
        h = max(f, math.floor(height / scale / f) * f)
        w = max(f, math.floor(width / scale / f) * f)
    elif h * w < cfg.min_pixels:
        scale = math.sqrt(cfg.min_pixels / (height * width))
        h = math.ceil(height * scale / f) * f
        w = math.ceil(width * scale / f) * f
    return h, w


def resize_frames(frames: np.ndarray, cfg: FrameSampling) -> np.ndarray:
    """Resize (T, H, W, 3) frames to the budgeted size (bicubic, as Qwen's processor does)."""
    h, w = fit_pixels(frames.shape[1], frames.shape[2], cfg)
    if (h, w) == frames.shape[1:3]:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])


# The causes a decoding failure is counted under (tools/make_shards.py --verify), in the order
# they are looked for in its message.
MEDIA_CAUSES = ("empty file", "truncated", "no video stream", "an image", "not a video container", "no decoder",
                "decoding failed", "cannot decode image")


def media_cause(error: MediaError) -> str:
    """The short cause of a decoding failure, one of MEDIA_CAUSES ("other" when none fits)."""
    return next((cause for cause in MEDIA_CAUSES if cause in str(error)), "other")


# ---- PyAV -------------------------------------------------------------------------------------


@dataclass
class FrameTable:
    """A video stream's frames in presentation order, read from its packets without decoding."""

    pts: list[int]  # presentation timestamps in stream time-base units, ascending
    times: list[float]  # the same in seconds from the first frame
    keyframes: list[int]  # pts of the keyframes, ascending
    duration: float  # seconds from the first frame to the end of the last


def _open_failure(head: bytes, err: Exception) -> str:
    """Why FFmpeg could not open a file, from its first bytes (FFmpeg's own message is generic)."""
    if not head:
        return "empty file"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "truncated or damaged MP4/MOV container: its index (moov box) cannot be read"
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return "an image, not a video"
    return f"not a video container FFmpeg recognises ({type(err).__name__}: {err})"


def frame_table_duration(times: Sequence[float], nominal_fps: float) -> float:
    """A clip's duration from its frame timestamps: the last one plus one average frame gap.

    Packet durations are not used: muxers guess the last one differently and decord does not
    expose them, and both decoders must sample the same frames. One frame lasts 1 / nominal_fps.
    """
    if len(times) > 1:
        return times[-1] * len(times) / (len(times) - 1)
    return 1.0 / nominal_fps if nominal_fps > 0 else 1.0


def _read_frame_table(container, stream) -> FrameTable:
    """Scan the stream's packets (no decoding) for timestamps and keyframes; detect truncation."""
    kind = container.format.name
    entries: list[tuple[int, bool]] = []
    try:
        for packet in container.demux(stream):
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None and packet.size > 0:
                entries.append((pts, packet.is_keyframe))
    except Exception as err:  # FFmpeg raises InvalidDataError, EOFError, ... on cut data
        raise BrokenMedia(f"truncated or corrupt {kind} data after {len(entries)} frames ({err})") from err
    tb = stream.time_base or Fraction(1, 90000)
    declared = float(stream.duration * tb) if stream.duration else None
    if declared is None and container.duration and len(container.streams) == 1:  # MKV keeps it per file
        declared = container.duration / 1_000_000
    if not entries:
        raise BrokenMedia(f"truncated {kind}: no video frames of the {declared:.2f} s it declares" if declared
                         else f"no video frames in the {kind} container")
    if stream.frames and len(entries) < 0.9 * stream.frames:  # 0.9: edit lists may drop a few
        raise BrokenMedia(f"truncated {kind}: {len(entries)} of the {stream.frames} frames its index lists are present")
    entries.sort()
    pts = [p for p, _ in entries]
    times = [float((p - pts[0]) * tb) for p in pts]
    rate = stream.average_rate or stream.guessed_rate
    duration = frame_table_duration(times, float(rate) if rate else 0.0)
    # Without a frame count (MKV, WebM, MPEG-TS) a cut shows as frames ending well before the declared
    # duration; with one (MP4, AVI) the count decides, so a long-held last frame is never "truncated".
    if not stream.frames and declared and duration < 0.9 * declared - 2 * duration / len(times):
        raise BrokenMedia(f"truncated {kind}: frames end at {duration:.2f} s of the {declared:.2f} s it declares")
    return FrameTable(pts, times, [p for p, key in entries if key], duration)


class _PyAVFrames:
    """Decodes the sampled frames of one open stream into a preallocated (T, h, w, 3) array."""

    def __init__(self, container, stream, table: FrameTable, picks: list[int], cfg: FrameSampling) -> None:
        self.container, self.stream, self.table, self.cfg = container, stream, table, cfg
        self.slots: dict[int, list[int]] = {}  # wanted pts -> output rows
        for row, index in enumerate(picks):
            self.slots.setdefault(table.pts[index], []).append(row)
        self.count = len(picks)
        self.out: np.ndarray | None = None
        self.done: set[int] = set()

    def _key_of(self, pts: int) -> int:
        """The keyframe whose group holds the frame at ``pts`` (the last keyframe not after it)."""
        keys = self.table.keyframes
        i = bisect.bisect_right(keys, pts) - 1
        return keys[i] if i >= 0 else keys[0] if keys else pts

    def _take(self, frame) -> None:
        pts = frame.pts if frame.pts is not None else frame.dts
        rows = self.slots.get(pts)
        if rows is None or pts in self.done:
            return
        turns = (frame.rotation // 90) % 4 if frame.rotation else 0
        if self.out is None:  # sized by the first frame taken: later ones (a mid-stream size change) follow it
            shown_h, shown_w = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)
            self.out = np.empty((self.count, *fit_pixels(shown_h, shown_w, self.cfg), 3), dtype=np.uint8)
        h, w = self.out.shape[1:3]
        rgb = frame.reformat(
            width=h if turns % 2 else w, height=w if turns % 2 else h, format="rgb24",
            interpolation="BICUBIC", src_color_range=frame.color_range, threads=1,
        ).to_ndarray()
        if turns:
            rgb = np.rot90(rgb, k=turns)
        self.out[rows] = rgb
        self.done.add(pts)

    def _drain(self, codec) -> None:
        """Take the frames the decoder still holds (reordering delay), then let it start afresh."""
        try:
            for frame in codec.decode(None):
                self._take(frame)
        except Exception:  # a broken tail: the missing frames are reported by the caller
            pass

    def decode(self, seek: bool, skip: bool) -> None:
        """Decode until every wanted frame is taken; ``seek`` jumps between keyframe groups,
        ``skip`` lets the decoder drop non-reference frames that are not wanted."""
        codec = self.stream.codec_context
        pending = sorted(self.slots)
        sought: set[int] = set()  # each keyframe is sought once: a seek that lands early then decodes on
        self.container.seek(0)  # back to the start (a stream-time seek lands late in MPEG-TS)
        for packet in self.container.demux(self.stream):
            remaining = [p for p in pending if p not in self.done]
            if not remaining:
                break
            key = self._key_of(remaining[0])
            if seek and packet.is_keyframe and packet.pts is not None and packet.pts < key and key not in sought:
                self._drain(codec)  # the next wanted frame is in a later group: jump to it
                sought.add(key)
                self.container.seek(key, stream=self.stream, backward=True, any_frame=False)
                continue
            # Only once the decoder is open: libdav1d (AV1) reads skip_frame when it opens and then drops
            # every non-reference frame for good, wanted or not (an SVT-AV1 clip lost 38 of its 60
            # frames, and no retry on that decoder gets them back). FFmpeg's own decoders read it per
            # packet and lose nothing by starting one packet late; libdav1d simply never skips.
            if skip and codec.is_open:
                codec.skip_frame = "DEFAULT" if packet.pts in self.slots else "NONREF"
            try:
                for frame in codec.decode(packet):
                    self._take(frame)
            except Exception:  # a corrupt packet: FFmpeg conceals what it can; missing frames are reported
                continue
        codec.skip_frame = "DEFAULT"
        self._drain(codec)

    def missing(self) -> list[float]:
        return [self.table.times[self.table.pts.index(p)] for p in sorted(self.slots) if p not in self.done]


def _is_cover(stream) -> bool:
    """Whether a video stream is an attached picture (cover art, a thumbnail), not moving video."""
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _describe_stream(stream) -> str:
    """``audio (aac)``, ``video (mjpeg, cover picture)``: a stream as an error lists it."""
    codec = stream.codec_context.name if stream.codec_context else "?"
    return f"{stream.type} ({codec}{', cover picture' if stream.type == 'video' and _is_cover(stream) else ''})"


def pick_video_stream(streams: Sequence) -> tuple[object | None, str]:
    """The video stream to decode among a container's ``streams`` (None if there is none), and a note
    for a warning when there was a choice ("" when there was not).

    Cover art is not video (yt-dlp's --embed-thumbnail adds one to MP4 as a one-frame video stream),
    so a file with only cover art has no video stream. Of several real video streams (two camera
    angles, picture-in-picture) the first is taken, as FFmpeg lists them: the note names them all
    and the one used, since nothing in the file says which one the question is about.
    """
    videos = [s for s in streams if s.type == "video" and not _is_cover(s)]
    if len(videos) < 2:
        return (videos[0] if videos else None), ""
    listed = ", ".join(f"#{s.index} {s.codec_context.name} {s.codec_context.width}x{s.codec_context.height}"
                       if s.codec_context else f"#{s.index} (no decoder)" for s in videos)
    return videos[0], f"{len(videos)} video streams ({listed}); using #{videos[0].index}, the first"


def _by_content(path: str) -> BinaryIO:
    """``path`` opened so that FFmpeg finds its format from the bytes alone, as for a shard's bytes.

    Given a file name FFmpeg also scores formats by its extension, so a raw-stream demuxer can claim
    a file by name alone (a text file named .m4v opened as an MPEG-4 elementary stream and failed
    with "Operation not permitted"), and a file could decode from disk (make_shards --verify) but
    not from its shard, which has no name. A file opened from its descriptor is named by the
    descriptor's number, which matches no extension.
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return open(descriptor, "rb")
    except OSError:  # a directory: open() leaves a descriptor it was given open
        os.close(descriptor)
        raise


def _decode_pyav(source: str | BinaryIO, cfg: FrameSampling, seek: bool = True, skip: bool = True) -> Clip:
    """PyAV's decode; ``seek``/``skip`` off only to measure what they bring (tools/bench_decode.py)."""
    import av  # imported here: only the data path needs it

    if isinstance(source, str):
        try:
            file = _by_content(source)
        except OSError as err:
            raise BrokenMedia(f"cannot read the file ({type(err).__name__}: {err.strerror})") from err
        with file:
            return _decode_pyav(file, cfg, seek, skip)
    try:
        container = av.open(source, metadata_errors="ignore")
    except Exception as err:  # av.FFmpegError and OSError subclasses
        reason = _open_failure(_head(source), err)
        raise (BrokenMedia if reason.startswith(("empty", "truncated", "an image")) else MediaError)(reason) from err
    with container:
        kind = container.format.name
        if kind.endswith("_pipe") or kind == "image2":
            raise BrokenMedia(f"an image ({kind}), not a video")
        stream, note = pick_video_stream(container.streams)
        if stream is None:
            found = ", ".join(_describe_stream(s) for s in container.streams)
            raise BrokenMedia(f"no video stream in the {kind} container (streams: {found or 'none'})")
        if stream.codec_context is None:
            raise MediaError(f"no decoder for the video codec (id {stream.codec_tag or '?'}) in {kind}")
        codec_name = stream.codec_context.name
        stream.codec_context.thread_count = cfg.decoder_threads
        stream.codec_context.thread_type = "AUTO" if cfg.decoder_threads != 1 else "SLICE"
        table = _read_frame_table(container, stream)
        picks = sample_frame_indices(table.times, table.duration, num_frames_to_sample(table.duration, cfg))
        frames = _PyAVFrames(container, stream, table, picks, cfg)
        try:
            frames.decode(seek=seek, skip=skip)
            if frames.missing() and (seek or skip):  # a seek that landed late (MPEG-TS), or a stream that defies skipping: go plainly
                frames.decode(seek=False, skip=False)
        except Exception as err:  # FFmpeg's errors, and anything odd a damaged stream provokes
            raise MediaError(f"{codec_name} in {kind}: decoding failed ({type(err).__name__}: {err})") from err
        missing = frames.missing()
        if missing or frames.out is None:
            raise MediaError(
                f"truncated or corrupt {codec_name} in {kind}: the frames at "
                f"{', '.join(f'{t:.2f}' for t in missing[:4])} s do not decode"
            )
    fps = len(table.times) / table.duration
    return Clip(frames.out, fps=fps, frame_indices=picks, total_frames=len(table.times),
                timestamps=[table.times[i] for i in picks], notes=[note] if note else [])


def _head(source: BinaryIO) -> bytes:
    """The first bytes of an open file or buffer (to name the cause of an open failure)."""
    source.seek(0)
    return source.read(16)


# ---- decord -----------------------------------------------------------------------------------


def _decode_decord(source: str | io.BytesIO, cfg: FrameSampling) -> Clip:
    import decord  # imported here: decord is heavy and only the data path needs it

    try:
        reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=cfg.decoder_threads)
        total = len(reader)
        if total == 0:
            raise MediaError("video has no frames")
        starts = reader.get_frame_timestamp(range(total))[:, 0].astype(float)
        times = (starts - starts[0]).tolist()
        duration = frame_table_duration(times, float(reader.get_avg_fps()))
        picks = sample_frame_indices(times, duration, num_frames_to_sample(duration, cfg))
        out: np.ndarray | None = None
        for start in range(0, len(picks), cfg.chunk_frames):
            chunk = reader.get_batch(picks[start : start + cfg.chunk_frames]).asnumpy()
            if chunk.ndim != 4 or chunk.shape[-1] != 3:
                raise MediaError(f"decord returned frames of shape {chunk.shape[1:]} (a rotated video?)")
            h, w = fit_pixels(chunk.shape[1], chunk.shape[2], cfg)
            if out is None:
                out = np.empty((len(picks), h, w, 3), dtype=np.uint8)
            out[start : start + len(chunk)] = _scale_rgb(chunk, h, w)
    except MediaError:
        raise
    except Exception as err:  # decord raises its own DECORDError and RuntimeError types
        raise MediaError(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    return Clip(out, fps=total / duration, frame_indices=picks, total_frames=total,
                timestamps=[times[i] for i in picks])


def _scale_rgb(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, H, W, 3) RGB frames resized to (N, h, w, 3) by swscale bicubic (as the PyAV path)."""
    if frames.shape[1:3] == (h, w):
        return frames
    import av

    return np.stack([
        av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        .reformat(width=w, height=h, interpolation="BICUBIC", threads=1).to_ndarray()
        for f in frames
    ])


_DECODERS: dict[str, Callable[[str | io.BytesIO, FrameSampling], Clip]] = {"pyav": _decode_pyav, "decord": _decode_decord}


_WARNED: set[str] = set()  # "name: note" warnings this process has logged


def _warn_once(name: str, notes: list[str]) -> None:
    """Log each note on how ``name`` was read once per process, not again every epoch it is decoded."""
    for note in notes:
        if f"{name}: {note}" not in _WARNED:
            _WARNED.add(f"{name}: {note}")
            log.warning("%s: %s", name, note)


def _source(data: bytes | str | Path | TarMember, decoder: str) -> BinaryIO | str:
    """What ``decoder`` reads ``data`` from: bytes through a BytesIO (which shares the buffer, no copy;
    each decoder gets its own read position), a path as text, and a shard member
    (:class:`p2r.data.shard_reader.TarMember`) in place for PyAV, whole for decord (which reads
    whole anyway)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    if isinstance(data, TarMember):
        return data.open() if decoder == "pyav" else io.BytesIO(data.bytes())
    return str(data)


def decode_video(data: bytes | str | Path | TarMember, cfg: FrameSampling, name: str = "video") -> Clip:
    """Decode a video from bytes, a path or a shard member, sample its frames by time and resize them.

    The decoders in ``cfg.decoders`` are tried in order; a file found broken (:class:`BrokenMedia`:
    truncated, no video stream, ...) is not handed to the next one, so a truncated clip is never
    half-used. Raises :class:`MediaError` naming ``name`` and the first decoder's reason, e.g.
    ``shard-000003.tar:clip-9: cannot decode video: pyav: truncated matroska,webm: ...``. What the
    decoder noted about the file (several video streams) is logged as a warning, once per ``name``.
    """
    reasons = []
    for decoder in cfg.decoders:
        source = _source(data, decoder)
        try:
            clip = _DECODERS[decoder](source, cfg)
        except BrokenMedia as err:
            raise MediaError(f"{name}: cannot decode video: {decoder}: {err}") from err
        except MediaError as err:
            reasons.append(f"{decoder}: {err}")
            continue
        finally:
            if not isinstance(source, str):
                source.close()
        _warn_once(name, clip.notes)
        return clip
    # The first decoder's reason names the cause; the others' (decord's internal asserts) add noise.
    raise MediaError(f"{name}: cannot decode video: {reasons[0] if reasons else 'no decoder configured'}")


def decode_image(data: bytes | str | TarMember, cfg: FrameSampling, name: str = "image") -> Clip:
    """Decode an image (bytes, a path or a shard member) into a one-frame clip, resized to the pixel budget."""
    try:
        with contextlib.ExitStack() as stack:  # closes a shard member's file (PIL leaves a given file open)
            if isinstance(data, TarMember):
                source = stack.enter_context(data.open())
            else:
                source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
            with Image.open(source) as img:
                frame = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ...
        raise MediaError(f"{name}: cannot decode image ({type(err).__name__}: {str(err)[:200]})") from err
    return Clip(resize_frames(frame[None], cfg), fps=1.0, frame_indices=[0], total_frames=1, is_image=True)
