"""One OpenAI-compatible ``/chat/completions`` HTTP client, shared by every back-end that calls one.

The perception judge (:class:`callbacks.rewards.judges.OpenAIChatJudge`) and the CoT teacher
(``p2r.cot.teachers.OpenAIChatTeacher``) both talk to a vLLM / SGLang / provider server; this is
the one place that knows how: the standard library only (``http.client``; no client library to
pin), the API key read from an environment variable at each request and never stored (so it
cannot reach a ``repr``, a log, hyperparameters or a saved config), bounded retries with
exponential backoff on failures that may pass (timeouts, connection errors, HTTP 408/429/5xx), and
no retry on the ones that will not (other HTTP errors, a malformed or oversized body).
:meth:`ChatCompletionsClient.complete` never raises: callers run it from worker threads inside long
jobs, and turn a failure into their own failed result. What the reply MEANS (a verdict, a trace,
whether a cut reply matters) stays with the caller.

Bounds, whatever the server does: ``timeout_s`` is a deadline on each whole attempt (connect, send,
status and headers, body), enforced by shutting the socket down when it passes, so a server that
trickles its reply a byte at a time cannot hold a training step longer than
``(1 + max_retries) * timeout_s`` plus the backoff sleeps; a reply body is read up to
``max_response_bytes`` and no further. Any text from the server that reaches a message is first
stripped of the API key and only then cut to length, so no part of the key survives a cut.
Proxies from the usual environment variables (``https_proxy``, ``no_proxy``, ...) are used as
``urllib`` would, without proxy authentication.

It lives in ``callbacks`` because ``callbacks`` must never import ``p2r``, while ``p2r`` may import
``callbacks``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

OnRetry = Callable[[int, int, str], None]
"""``on_retry(attempt, attempts, error)``: attempt ``attempt`` (1-based) of ``attempts`` failed in a
way worth retrying; ``error`` is already redacted. Callers log it with their own logger and words."""


@dataclass(frozen=True)
class ChatReply:
    """The outcome of one :meth:`ChatCompletionsClient.complete` call.

    On success ``text`` is the assistant message's content (``""`` when the server sent none) and
    ``error`` is None; on failure ``text`` is None and ``error`` says why, with the key redacted.
    ``finish_reason`` is the server's (``"length"`` means the reply hit ``max_tokens``).
    ``latency_s`` covers every attempt and the backoff sleeps between them.
    """

    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    latency_s: float = 0.0


EXCERPT_CHARS = 200  # how much of a server's words an error message quotes


class _RetryableError(Exception):
    """A failure worth another attempt: timeouts, connection errors, HTTP 408/429/5xx."""


class _Deadline:
    """Shuts a connection's socket down when an attempt's time is up, waking any blocked read."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.passed = False
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def watch(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._connection = connection
        self._timer.start()

    def check(self) -> None:
        if self.passed or time.monotonic() >= self.end:
            self.passed = True
            raise TimeoutError("deadline passed")

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            sock = self._connection.sock if self._connection is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed

    def cancel(self) -> None:
        self._timer.cancel()


class ChatCompletionsClient:
    """POSTs request bodies to ``{base_url}/chat/completions`` with retries; holds no secret, no connection.

    Holding nothing but settings makes it free to build and safe to pickle, copy and print: the objects
    that call a server (the perception judge, the CoT teacher, the evaluation judge) keep one as the
    single home of their server settings.
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_response_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """
        Args:
            base_url: server root up to the API version, e.g. ``http://127.0.0.1:8000/v1`` (a URL
                already ending in ``/chat/completions`` is used as is).
            api_key_env: NAME of the environment variable holding the API key (never the key itself);
                unset or empty means no ``Authorization`` header (a local vLLM needs none).
            timeout_s: deadline in seconds on each whole attempt (connect, send, headers and body).
            max_retries: extra attempts after a retryable failure.
            backoff_s: sleep before retry k (1-based) is ``backoff_s * 2**(k-1)`` seconds.
            max_response_bytes: longest reply body read; a longer one fails the call without a retry.
        """
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s
        self.max_response_bytes = max_response_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def describe(self, owner: object, model: str) -> str:
        """``owner``'s repr: its class, this server, the ``model`` it asks for; never a secret."""
        return f"{type(owner).__name__}(base_url={self.base_url!r}, model={model!r}, api_key_env={self.api_key_env!r})"

    @property
    def url(self) -> str:
        """The endpoint every request goes to."""
        return self.base_url if self.base_url.endswith("/chat/completions") else self.base_url + "/chat/completions"

    def redact(self, text: str) -> str:
        """``text`` with the current API key replaced by ``***`` (also as JSON escapes it): for any
        message that may hold a server's words. Redact before cutting a text short, never after."""
        key = os.environ.get(self.api_key_env)
        if not key:
            return text
        for form in {key, json.dumps(key)[1:-1]}:
            text = text.replace(form, "***")
        return text

    def excerpt(self, data: bytes | str, limit: int = EXCERPT_CHARS) -> str:
        """The start of a server's reply for a message: decoded, redacted, THEN cut to ``limit`` characters."""
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        text = self.redact(text)
        return text if len(text) <= limit else text[:limit] + "..."

    def complete(self, body: dict[str, Any], on_retry: OnRetry | None = None) -> ChatReply:
        """Send ``body`` (model, messages, sampling settings) and return the reply; never raises.

        Retryable failures are retried up to ``max_retries`` times with exponential backoff, calling
        ``on_retry`` after each one; any other failure (a 4xx other than 408/429, a malformed
        response, a body that is not JSON) ends the call at once.
        """
        start = time.monotonic()
        error = "no attempt made"
        try:
            data = json.dumps(body).encode()
        except Exception as err:  # encoded once: a large body (base64 frames) is not re-encoded per attempt
            return ChatReply(text=None, error=self.redact(f"{type(err).__name__}: {err}"),
                             latency_s=time.monotonic() - start)
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                text, finish_reason = self._post(data)
            except _RetryableError as err:
                error = self.redact(str(err))
                if on_retry is not None:
                    on_retry(attempt + 1, attempts, error)
                continue
            except Exception as err:
                error = self.redact(f"{type(err).__name__}: {err}")
                break
            return ChatReply(text=text, finish_reason=finish_reason, latency_s=time.monotonic() - start)
        return ChatReply(text=None, error=error, latency_s=time.monotonic() - start)

    def complete_all(self, bodies: list[dict[str, Any]], max_concurrency: int = 8) -> list[ChatReply]:
        """:meth:`complete` for each body, at most ``max_concurrency`` in flight; replies in body order."""
        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(bodies)))) as pool:
            return list(pool.map(self.complete, bodies))

    def _connection(self, deadline: _Deadline) -> tuple[http.client.HTTPConnection, str]:
        """A connection to the server (through the environment's proxy, if one applies) and the request target."""
        url = urllib.parse.urlsplit(self.url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {url.scheme!r} in {self.url}")
        https = url.scheme == "https"
        target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        proxy = None if urllib.request.proxy_bypass(url.hostname or "") else urllib.request.getproxies().get(url.scheme)
        if not proxy:
            kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
            return kind(url.hostname, url.port, timeout=deadline.left()), target
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if https:  # a CONNECT tunnel through the proxy, TLS to the server
            connection = http.client.HTTPSConnection(via.hostname, via.port or 8080, timeout=deadline.left())
            connection.set_tunnel(url.hostname, url.port or 443)
            return connection, target
        return http.client.HTTPConnection(via.hostname, via.port or 8080, timeout=deadline.left()), self.url

    def _read_body(self, response: http.client.HTTPResponse, deadline: _Deadline) -> bytes:
        """The reply body, read in pieces until the end, the deadline or ``max_response_bytes``."""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise RuntimeError(f"reply body of {int(declared):,} bytes is over max_response_bytes={self.max_response_bytes:,}")
        chunks, size = [], 0
        while True:
            deadline.check()
            chunk = response.read1(65536)
            if not chunk:
                # The deadline's socket shutdown can end a blocked read as a clean end of file (a body
                # with no Content-Length, a TLS socket): a cut body is a timeout, not a malformed reply.
                deadline.check()
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_response_bytes:
                raise RuntimeError(f"reply body is over max_response_bytes={self.max_response_bytes:,}")
            chunks.append(chunk)

    def _post(self, data: bytes) -> tuple[str, str | None]:
        """One attempt: the reply text and finish reason; raises :class:`_RetryableError` or another error."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)  # read per request, never kept
        if key:
            headers["Authorization"] = f"Bearer {key}"
        deadline = _Deadline(self.timeout_s)
        connection = None
        try:
            connection, target = self._connection(deadline)
            deadline.watch(connection)
            connection.connect()
            deadline.check()
            connection.request("POST", target, body=data, headers=headers)
            deadline.check()
            response = connection.getresponse()
            payload = self._read_body(response, deadline)
        except (OSError, http.client.HTTPException) as err:
            if deadline.passed or isinstance(err, (TimeoutError, socket.timeout)):
                raise _RetryableError(f"timed out: no complete reply within timeout_s={self.timeout_s:g} s") from None
            raise _RetryableError(f"{type(err).__name__}: {err}") from None
        finally:
            deadline.cancel()
            if connection is not None:
                connection.close()
        if response.status >= 400:
            message = f"HTTP {response.status}: {self.excerpt(payload)}"
            if response.status in (408, 429) or response.status >= 500:
                raise _RetryableError(message)
            raise RuntimeError(message)
        try:
            choice = json.loads(payload)["choices"][0]
            content = choice["message"].get("content")
            finish_reason = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            raise RuntimeError(f"malformed chat-completions response: {self.excerpt(payload)!r}") from None
        if content is not None and not isinstance(content, str):
            raise RuntimeError(f"malformed chat-completions response: content is {type(content).__name__}, not text")
        return content or "", finish_reason if isinstance(finish_reason, str) else None


class ChatModel:
    """A model behind an OpenAI-compatible endpoint that a tool asks many prompts at once (the
    evaluation analyses' text answerer and mismatch judge build on it)."""

    def __init__(self, base_url: str, model: str, api_key_env: str, max_tokens: int, max_concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 3) -> None:
        """
        Args:
            base_url: Server root up to the API version, e.g. http://127.0.0.1:8000/v1.
            model: Model name the server expects.
            api_key_env: NAME of the environment variable holding the API key (unset: no key sent).
            max_tokens: Reply length limit (where the caller prescribes none).
            max_concurrency: Requests in flight at once.
            timeout_s: Deadline on each whole attempt, in seconds.
            max_retries: Extra attempts after a timeout, a connection error or HTTP 408/429/5xx.
        """
        self.client = ChatCompletionsClient(base_url, api_key_env, timeout_s, max_retries)
        self.model = model
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency

    def __repr__(self) -> str:
        return self.client.describe(self, self.model)

    def ask(self, conversations: list[list[dict[str, str]]], settings: list[dict[str, Any]] | None = None) -> list[ChatReply]:
        """One reply per conversation (its messages), with per-request sampling ``settings``
        (default: greedy, ``max_tokens``); failures come back as replies with an error, never raised."""
        settings = settings or [{"temperature": 0.0, "max_tokens": self.max_tokens}] * len(conversations)
        bodies = [{"model": self.model, "messages": messages, **extra} for messages, extra in zip(conversations, settings)]
        return self.client.complete_all(bodies, self.max_concurrency)
