"""Video files as a new user brings them: AV1 from SVT-AV1, every common video extension (the
container is found from the bytes), files that are no video under a video's name, files with
several video streams or cover art, and make_shards' full list of bad records."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import encode_video, zoo_frames
from p2r.data.datamodule import decode_sample
from p2r.data.shard_reader import VIDEO_EXTENSIONS, shard_items
from p2r.data.video import (
    FrameSampling,
    MediaError,
    decode_video,
    media_cause,
    num_frames_to_sample,
    sample_frame_indices,
)

REPO = Path(__file__).resolve().parents[2]
MAKE_SHARDS = REPO / "tools" / "make_shards.py"
SMALL = FrameSampling(min_pixels=784, max_pixels=64 * 64, decoders=["pyav"])  # frames stay about 64x48


def grey_levels(frames: np.ndarray) -> list[float]:
    return frames.reshape(len(frames), -1).mean(axis=1).tolist()


def ramp(count: int = 16) -> list[np.ndarray]:
    """64x48 frames, frame t uniformly grey at level 20 + 12 t."""
    return [np.full((48, 64, 3), 20 + 12 * t, dtype=np.uint8) for t in range(count)]


# ---- AV1 from SVT-AV1 --------------------------------------------------------------------------

AV1_FRAMES, AV1_RATE = 60, 30  # 2 s; frame t is grey level 20 + 3 t


def svt_av1(params: str) -> bytes:
    """A 64x64 SVT-AV1 clip: its default random-access structure makes most frames non-reference."""
    frames = [np.full((64, 64, 3), 20 + 3 * t, dtype=np.uint8) for t in range(AV1_FRAMES)]
    options = {"preset": "12", "svtav1-params": params}
    return encode_video(frames, "libsvtav1", rate=AV1_RATE, options=options)


def decoded_pts(data: bytes, skip_frame: str) -> list[int]:
    """The pts of the frames libdav1d gives with ``skip_frame`` set before it opens."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = skip_frame
        return sorted(frame.pts for frame in container.decode(stream))


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="this PyAV has no SVT-AV1 encoder")
@pytest.mark.parametrize("params", ["lp=1", "lp=1:keyint=16:hierarchical-levels=3"], ids=["one-gop", "gop16-seeks"])
def test_svt_av1_with_non_reference_frames_sampled_decodes_every_sampled_frame(params):
    data = svt_av1(params)
    cfg = FrameSampling(decoders=["pyav"])
    picks = sample_frame_indices([t / AV1_RATE for t in range(AV1_FRAMES)], AV1_FRAMES / AV1_RATE,
                                 num_frames_to_sample(AV1_FRAMES / AV1_RATE, cfg))
    # The premise: libdav1d told to skip non-reference frames when it opens drops some sampled ones.
    every = decoded_pts(data, "DEFAULT")
    assert len(every) == AV1_FRAMES
    assert {every[i] for i in picks} - set(decoded_pts(data, "NONREF")), "no sampled frame is non-reference"

    clip = decode_video(data, cfg, name="svt.mp4")
    assert clip.frame_indices == picks == [7, 22, 37, 52]
    np.testing.assert_allclose(grey_levels(clip.frames), [20 + 3 * i for i in picks], atol=4)


# ---- every video extension, decided by content ---------------------------------------------------

# extension -> (PyAV container format, codec, frame rate): a real clip of the kind found under that name.
CONTAINERS = {
    "mp4": ("mp4", "libx264", 8), "m4v": ("ipod", "libx264", 8), "mov": ("mov", "libx264", 8),
    "mkv": ("matroska", "libx264", 8), "webm": ("webm", "libvpx-vp9", 8), "avi": ("avi", "mpeg4", 8),
    "ts": ("mpegts", "libx264", 8), "mts": ("mpegts", "libx264", 8), "m2ts": ("mpegts", "libx264", 8),
    "mpg": ("mpeg", "mpeg1video", 25), "mpeg": ("mpeg", "mpeg2video", 8), "vob": ("vob", "mpeg2video", 8),
    "flv": ("flv", "flv", 8), "3gp": ("3gp", "libx264", 8), "3g2": ("3g2", "libx264", 8),
    "wmv": ("asf", "wmv2", 8), "asf": ("asf", "msmpeg4", 8), "ogv": ("ogg", "libvpx", 8),
}
VPX_FAST = {"deadline": "realtime", "cpu-used": "8"}


def clip_for(ext: str) -> bytes:
    container, codec, rate = CONTAINERS[ext]
    return encode_video(ramp(), codec, container, rate=rate, options=VPX_FAST if "vpx" in codec else None)


def test_every_accepted_video_extension_is_tested_with_a_real_clip():
    assert set(VIDEO_EXTENSIONS) == set(CONTAINERS)


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_a_real_clip_under_each_video_extension_decodes_from_disk_and_from_bytes(ext, tmp_path):
    data = clip_for(ext)
    path = tmp_path / f"clip.{ext}"
    path.write_bytes(data)
    from_disk = decode_video(path, SMALL, name=path.name)
    from_bytes = decode_video(data, SMALL, name=path.name)
    assert from_disk.frame_indices == [2, 6, 10, 14]
    np.testing.assert_allclose(grey_levels(from_disk.frames), [20 + 12 * i for i in [2, 6, 10, 14]], atol=4)
    np.testing.assert_array_equal(from_disk.frames, from_bytes.frames)


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_text_under_a_video_extension_is_not_a_video_container(ext, tmp_path):
    # From disk as from a shard's bytes: the name must not make FFmpeg try a raw stream (.m4v did).
    path = tmp_path / f"notes.{ext}"
    path.write_bytes(b"these are my notes, not a video\n" * 40)
    for source in (path, path.read_bytes()):
        expected = rf"notes\.{ext}: cannot decode video: pyav: not a video container"
        with pytest.raises(MediaError, match=expected) as err:
            decode_video(source, FrameSampling(), name=path.name)
        assert media_cause(err.value) == "not a video container"


@pytest.mark.parametrize("what, error", [("missing", "FileNotFoundError"), ("folder", "IsADirectoryError")])
def test_a_path_that_is_no_readable_file_names_the_cause(what, error, tmp_path):
    path = tmp_path / "clip.mp4"
    if what == "folder":
        path.mkdir()
    with pytest.raises(MediaError, match=rf"clip\.mp4: cannot decode video: pyav: cannot read the file \({error}"):
        decode_video(path, FrameSampling(), name=path.name)


# ---- several video streams, cover art --------------------------------------------------------------


def mux(container: str, streams: list[tuple[str, int, int, bool]], audio: bool = False) -> bytes:
    """A clip with the given video streams, each ``(codec, width, height, cover)``: stream i's frame t
    is grey level 20 + 12 t + 30 i; a cover is one picture (an attached picture)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        made = []
        for codec, width, height, cover in streams:
            stream = out.add_stream(codec, rate=8, options={"threads": "1"})
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            if cover:
                stream.disposition = av.stream.Disposition.attached_pic
            made.append((stream, cover))
        if audio:
            sound = out.add_stream("aac", rate=16000)
            for index in range(4):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, index * 1024
                out.mux(sound.encode(frame))
            out.mux(sound.encode())
        for t in range(1 if audio else 16):
            for i, (stream, cover) in enumerate(made):
                if cover and t > 0:
                    continue
                rgb = np.full((stream.height, stream.width, 3), 20 + 12 * t + 30 * i, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=stream.pix_fmt)
                frame.pts = t
                out.mux(stream.encode(frame))
        for stream, _ in made:
            out.mux(stream.encode())
    return buffer.getvalue()


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_two_video_streams_warn_once_naming_both_and_the_one_used(container, caplog):
    data = mux(container, [("libx264", 64, 48, False), ("libx264", 32, 32, False)])
    with av.open(io.BytesIO(data)) as opened:
        assert len(opened.streams.video) == 2
    name = f"two-streams.{container}"
    with caplog.at_level(logging.WARNING, logger="p2r.data.video"):
        clips = [decode_video(data, SMALL, name=name) for _ in range(3)]  # three epochs
    warnings = [r.getMessage() for r in caplog.records if r.name == "p2r.data.video"]
    assert warnings == [f"{name}: 2 video streams (#0 h264 64x48, #1 h264 32x32); using #0, the first"]
    for clip in clips:  # the first stream's frames: stream #1 would give 28x28 frames 30 levels brighter
        assert clip.frames.shape[1:3] == (56, 56)
        np.testing.assert_allclose(grey_levels(clip.frames), [20 + 12 * i for i in [2, 6, 10, 14]], atol=3)


def test_cover_art_is_not_a_second_video_stream(caplog):
    data = mux("mp4", [("libx264", 64, 48, False), ("mjpeg", 32, 32, True)])
    with av.open(io.BytesIO(data)) as opened:
        assert len(opened.streams.video) == 2  # FFmpeg lists the cover as a video stream
    with caplog.at_level(logging.WARNING, logger="p2r.data.video"):
        clip = decode_video(data, SMALL, name="with-cover.mp4")
    assert not [r for r in caplog.records if r.name == "p2r.data.video"]
    np.testing.assert_allclose(grey_levels(clip.frames), [20 + 12 * i for i in [2, 6, 10, 14]], atol=3)


def test_sound_with_only_cover_art_has_no_video_stream():
    data = mux("mp4", [("mjpeg", 32, 32, True)], audio=True)
    expected = (r"song\.mp4: cannot decode video: pyav: no video stream in the mov,mp4,m4a,3gp,3g2,mj2 "
                r"container \(streams: audio \(aac\), video \(mjpeg, cover picture\)\)")
    with pytest.raises(MediaError, match=expected):
        decode_video(data, FrameSampling(), name="song.mp4")


# ---- make_shards: MPEG-TS named .ts, and the full list of bad records -----------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_SHARDS), *args], cwd=REPO, capture_output=True, text=True, timeout=180)


def record(rid: str, path: str, **changes) -> dict:
    base = {"id": rid, "problem": "Which way?", "options": ["A. left", "B. right"], "solution": "<answer>A</answer>",
            "path": path, "data_type": "video", "problem_type": "multiple choice", "data_source": "test"}
    return {**base, **changes}


def test_make_shards_verify_takes_mpegts_named_ts_and_lists_every_bad_record(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.ts").write_bytes(encode_video(ramp(), container="mpegts"))
    (media / "notes.ts").write_bytes(b"these are my notes, not a video\n" * 40)
    Image.fromarray(zoo_frames(1)[0]).save(media / "still.jpg")
    records = [
        record("stream", "clip.ts"),
        record("notes", "notes.ts"),
        record("photo", "still.jpg", data_type="image"),
        *(record(f"lost{i}", f"lost{i}.mp4") for i in range(5)),
        record("gif", "anim.gif"),
        ["not", "a", "record"],
        record("stream", "clip.ts"),
    ]
    source = tmp_path / "t.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "shards"

    done = run_tool("--records", str(source), "--media-root", str(media), "--out", str(out),
                    "--verify", "--workers", "1")
    assert done.returncode == 0, done.stderr
    listing = out / "train.bad-records.jsonl"
    assert "2 of 11 records are usable, 9 bad" in done.stdout
    assert f"first bad records (all 9 are listed in {listing}):" in done.stdout
    shown = [line for line in done.stdout.splitlines() if line.startswith("  t.json[") or line.startswith("  id ")]
    assert len(shown) == 5  # the screen keeps to a few

    rows = [json.loads(line) for line in listing.read_text(encoding="utf-8").splitlines()]
    assert [(r["where"], r["id"], r["path"], r["kind"]) for r in rows] == [
        *((f"t.json[{3 + i}]", f"lost{i}", f"lost{i}.mp4", "media file not found") for i in range(5)),
        ("t.json[8]", "gif", "anim.gif", "unsupported media extension"),
        ("t.json[9]", None, None, "a record must be a JSON object, got list"),
        ("t.json[10]", "stream", "clip.ts", "duplicate id"),
        ("id 'notes'", "notes", "notes.ts", "undecodable video, not a video container"),
    ]
    assert rows[0]["cause"] == f"media file not found: {media / 'lost0.mp4'}"
    assert rows[-1]["cause"].startswith(f"undecodable video, not a video container: {media / 'notes.ts'}: "
                                        "cannot decode video: pyav: not a video container")

    # The MPEG-TS went in as .ts and decodes as training reads it; the image still works.
    samples = [item for url in sorted(out.glob("*.tar")) for item in shard_items(str(url), 1 << 20, 1 << 30)]
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("stream", ["json", "ts"]), ("photo", ["jpg", "json"])]
    video = decode_sample(samples[0], SMALL)
    np.testing.assert_allclose(grey_levels(video.clip.frames), [20 + 12 * i for i in [2, 6, 10, 14]], atol=3)
    assert decode_sample(samples[1], SMALL).clip.is_image

    # A later run with nothing bad leaves an empty list, not the old one.
    source.write_text(json.dumps(records[:1]), encoding="utf-8")
    again = run_tool("--records", str(source), "--media-root", str(media), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "1 of 1 records are usable, 0 bad" in again.stdout
    assert listing.read_text(encoding="utf-8") == ""
