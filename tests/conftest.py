"""Shared fixtures: a small synthetic data set made once per session, tiny backbone sizes, a zoo of
tiny videos in every common codec and container (and broken ones), and a fake OpenAI-compatible
chat server on loopback (judges, the chat client and the CoT teacher)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

from p2r.data.synthetic import encode_mp4, make_synthetic

# Small enough that a backbone builds in ~0.1 s and a forward takes a few ms on one core.
TINY_SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1, vocab_size=512)
# Synthetic split sizes: odd counts and 5 samples per shard, so shards and batches are uneven.
SPLIT_SIZES = dict(n_train=18, n_val=7, n_test=6)


@pytest.fixture(scope="session")
def tiny_sizes() -> dict:
    return dict(TINY_SIZES)


@pytest.fixture(scope="session")
def split_sizes() -> dict:
    return dict(SPLIT_SIZES)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """videos/, {train,val,test}.json and shards/{split}-00000N.tar (5 samples per shard)."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, **SPLIT_SIZES, seed=0, samples_per_shard=5, progress=False)
    return root


@pytest.fixture(scope="session")
def ramp_mp4() -> bytes:
    """A real 64x64 H.264 clip, 48 frames at 8 fps, frame t uniformly grey at level 20 + 4 t."""
    frames = [np.full((64, 64, 3), 20 + 4 * t, dtype=np.uint8) for t in range(48)]
    return encode_mp4(frames, fps=8)


def zoo_frames(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Frame t is grey at level 20 + 12 t, with a white block in its top-left ninth (for rotation)."""
    frames = []
    for t in range(count):
        frame = np.full((height, width, 3), 20 + 12 * t, dtype=np.uint8)
        frame[: height // 3, : width // 3] = 255
        frames.append(frame)
    return frames


def encode_video(
    frames: list[np.ndarray],
    codec: str = "libx264",
    container: str = "mp4",
    pix_fmt: str = "yuv420p",
    rate: int = 8,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    options: dict[str, str] | None = None,
    rotation: int | None = None,
    color_range: int | None = None,
) -> bytes:
    """Encode RGB frames with PyAV; ``pts``/``time_base`` give each frame its own timestamp (VFR)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=None if pts else rate, options={"threads": "1", **(options or {})})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        if time_base is not None:
            stream.time_base = stream.codec_context.time_base = time_base
        if color_range is not None:
            stream.codec_context.color_range = color_range
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=pix_fmt, dst_color_range=color_range)
            if color_range is not None:
                video_frame.color_range = color_range
            video_frame.pts = pts[index] if pts else index
            if time_base is not None:
                video_frame.time_base = time_base
            out.mux(stream.encode(video_frame))
        out.mux(stream.encode())
    return buffer.getvalue()


@dataclass
class ZooVideo:
    """A generated test video: its bytes, the extension it is stored under, and what decoding must give."""

    data: bytes
    ext: str
    cause: str = ""  # "" when it must decode; else a word the MediaError must contain
    frames: int = 16  # frames in the clip (frame t has grey level 20 + 12 t)


def _audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(zoo_frames(1)[0]).save(buffer, format="JPEG")
    return buffer.getvalue()


# VFR: 16 frames, 12 of them in the first 1.2 s and 4 spread over the next 8.8 s (time base 1/10 s).
VFR_PTS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 40, 60, 80, 100]


@pytest.fixture(scope="session")
def video_zoo() -> dict[str, ZooVideo]:
    """Tiny videos (64x48, 16 frames at 8 fps unless named otherwise) in every common codec and
    container, the odd ones users meet, and broken ones with the cause their error must name."""
    frames = zoo_frames(16)
    h264 = encode_video(frames)
    mkv = encode_video(frames, container="matroska")
    svt = {"preset": "12", "svtav1-params": "lp=1"}
    return {
        "h264": ZooVideo(h264, "mp4"),
        "av1": ZooVideo(encode_video(frames, "libsvtav1", options=svt), "mp4"),
        "mpegts_named_mp4": ZooVideo(encode_video(frames, container="mpegts"), "mp4"),
        "vp9_webm": ZooVideo(encode_video(frames, "libvpx-vp9", "webm", options={"deadline": "realtime", "cpu-used": "8"}), "webm"),
        "hevc_10bit": ZooVideo(encode_video(frames, "libx265", pix_fmt="yuv420p10le", options={"x265-params": "log-level=error"}), "mp4"),
        "yuv444p": ZooVideo(encode_video(frames, pix_fmt="yuv444p"), "mp4"),
        "mjpeg_avi": ZooVideo(encode_video(frames, "mjpeg", "avi", pix_fmt="yuvj420p"), "avi"),
        "mpeg4_mkv": ZooVideo(encode_video(frames, "mpeg4", "matroska"), "mkv"),
        "rotated_90": ZooVideo(encode_video(frames, rotation=90), "mp4"),
        "grayscale_ffv1": ZooVideo(encode_video(frames, "ffv1", "matroska", pix_fmt="gray"), "mkv"),
        "full_range": ZooVideo(encode_video(frames, color_range=2), "mp4"),
        "one_frame": ZooVideo(encode_video(frames[:1]), "mp4", frames=1),
        "odd_33x17": ZooVideo(encode_video(zoo_frames(16, 17, 33), pix_fmt="yuv444p"), "mp4"),
        "vfr": ZooVideo(encode_video(frames, pts=VFR_PTS, time_base=Fraction(1, 10)), "mp4"),
        "truncated_mp4": ZooVideo(h264[: len(h264) // 2], "mp4", cause="truncated"),
        "truncated_mkv": ZooVideo(mkv[: len(mkv) // 2], "mkv", cause="truncated"),
        "audio_only": ZooVideo(_audio_only_mp4(), "mp4", cause="no video stream"),
        "jpeg_named_mp4": ZooVideo(_jpeg(), "mp4", cause="an image"),
        "garbage": ZooVideo(b"not a video at all" * 50, "mp4", cause="not a video container"),
        "empty": ZooVideo(b"", "mp4", cause="empty"),
    }


@pytest.fixture(scope="session")
def tiny25(tiny_sizes):
    """A built tiny Qwen2.5-VL in eval mode; tests must not change its weights."""
    from p2r.backbones import TinyQwen25VL

    backbone = TinyQwen25VL(**tiny_sizes)
    backbone.build()
    return backbone.eval()


@dataclass(frozen=True)
class Trickle:
    """A reply sent slowly: ``data`` in pieces of ``piece`` bytes, one every ``every_s`` seconds.

    ``data`` is the body (status and headers, with its Content-Length, go at once), or with
    ``raw=True`` the whole HTTP response, status line and headers included."""

    data: bytes
    every_s: float
    raw: bool = False
    piece: int = 1


class ChatServer:
    """POST /v1/chat/completions on 127.0.0.1, answered by ``respond(request) -> (status, payload, delay_s)``.

    ``request`` is {"path", "headers", "body"}; ``respond`` runs under a lock (a script can pop) and
    may add keys to it; every request is recorded in ``requests``. ``payload`` is bytes, or a
    :class:`Trickle` to send it slowly. ``close`` may be called twice.
    """

    def __init__(self, respond: Callable[[dict], tuple[int, bytes, float]]) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._closed = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = {"path": self.path, "headers": dict(self.headers), "body": body}
                with server.lock:
                    status, payload, delay = respond(request)
                    server.requests.append(request)
                time.sleep(delay)
                if isinstance(payload, Trickle):
                    return self.trickle(status, payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def trickle(self, status: int, reply: Trickle) -> None:
                try:
                    if not reply.raw:
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(reply.data)))
                        self.end_headers()
                    for start in range(0, len(reply.data), reply.piece):
                        self.wfile.write(reply.data[start : start + reply.piece])
                        self.wfile.flush()
                        time.sleep(reply.every_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.httpd.shutdown()
            self.httpd.server_close()


def _chat_payload(status: int, text: str, finish_reason: str = "stop") -> bytes:
    """What an OpenAI-compatible server sends: a completion for status 200, else an error body."""
    if status == 200:
        data = {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]}
    else:
        data = {"error": {"message": text}}
    return json.dumps(data).encode()


def _scripted(script: list[tuple[int, bytes, float]]) -> Callable[[dict], tuple[int, bytes, float]]:
    """A ``respond`` that plays (status, payload, delay_s) entries in turn, the last one repeating."""
    script = list(script)
    return lambda request: script.pop(0) if len(script) > 1 else script[0]


@pytest.fixture
def trickle():
    """The :class:`Trickle` reply type, for ``chat_server`` scripts."""
    return Trickle


@pytest.fixture
def chat_payload():
    """``chat_payload(status, text, finish_reason="stop") -> bytes``: a completion or an error body."""
    return _chat_payload


@pytest.fixture
def chat_server():
    """``chat_server(respond)`` or ``chat_server([(status, payload, delay_s), ...])`` starts a fake
    chat server (a list is played in turn, its last entry repeating); all are closed after the test."""
    servers: list[ChatServer] = []

    def start(respond_or_script):
        respond = respond_or_script if callable(respond_or_script) else _scripted(respond_or_script)
        servers.append(ChatServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
