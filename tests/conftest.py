"""Shared fixtures: a small synthetic data set made once per session, tiny backbone sizes, and a
fake OpenAI-compatible chat server on loopback (judges, the chat client and the CoT teacher)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
