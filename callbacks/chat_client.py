"""One OpenAI-compatible ``/chat/completions`` HTTP client, shared by every back-end that calls one.

The perception judge (:class:`callbacks.rewards.judges.OpenAIChatJudge`) and the CoT teacher
(``p2r.cot.teachers.OpenAIChatTeacher``) both talk to a vLLM / SGLang / provider server; this is
the one place that knows how: stdlib ``urllib`` only (no client library to pin), the API key read
from an environment variable at each request and never stored (so it cannot reach a ``repr``, a
log, hyperparameters or a saved config), the key redacted from every error in case a server echoes
it, bounded retries with exponential backoff on failures that may pass (timeouts, connection
errors, HTTP 408/429/5xx), and no retry on the ones that will not (other HTTP errors, a malformed
body). :meth:`ChatCompletionsClient.complete` never raises: callers run it from worker threads
inside long jobs, and turn a failure into their own failed result. What the reply MEANS (a verdict,
a trace, whether a cut reply matters) stays with the caller.

It lives in ``callbacks`` because ``callbacks`` must never import ``p2r``, while ``p2r`` may import
``callbacks``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
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


class _RetryableError(Exception):
    """A failure worth another attempt: timeouts, connection errors, HTTP 408/429/5xx."""


class ChatCompletionsClient:
    """POSTs request bodies to ``{base_url}/chat/completions`` with retries; holds no secret, no connection.

    Holding nothing but settings makes it free to build (callers may build one per request from their
    own attributes) and safe to pickle, copy and print.
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        """
        Args:
            base_url: server root up to the API version, e.g. ``http://127.0.0.1:8000/v1`` (a URL
                already ending in ``/chat/completions`` is used as is).
            api_key_env: NAME of the environment variable holding the API key (never the key itself);
                unset or empty means no ``Authorization`` header (a local vLLM needs none).
            timeout_s: per-attempt socket timeout in seconds.
            max_retries: extra attempts after a retryable failure.
            backoff_s: sleep before retry k (1-based) is ``backoff_s * 2**(k-1)`` seconds.
        """
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    @property
    def url(self) -> str:
        """The endpoint every request goes to."""
        return self.base_url if self.base_url.endswith("/chat/completions") else self.base_url + "/chat/completions"

    def redact(self, text: str) -> str:
        """``text`` with the current API key replaced by ``***``: for any message that may hold a server's words."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

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

    def _post(self, data: bytes) -> tuple[str, str | None]:
        """One attempt: the reply text and finish reason; raises :class:`_RetryableError` or another error."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)  # read per request, never kept
        if key:
            headers["Authorization"] = f"Bearer {key}"
        http_request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            message = f"HTTP {err.code}: {err.read()[:200].decode(errors='replace')}"
            if err.code in (408, 429) or err.code >= 500:
                raise _RetryableError(message) from None
            raise RuntimeError(message) from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, HTTPException) as err:
            raise _RetryableError(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            choice = json.loads(payload)["choices"][0]
            content = choice["message"].get("content")
            finish_reason = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"malformed chat-completions response: {payload[:200]!r}") from None
        return content or "", finish_reason if isinstance(finish_reason, str) else None
