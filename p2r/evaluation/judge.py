"""The judge some lmms-eval tasks call (MMVU open questions, TempCompass), on any OpenAI-compatible server.

lmms-eval sends these prompts to OpenAI (gpt-4o-2024-11-20 for MMVU, gpt-3.5-turbo-1106 for
TempCompass); p2r sends the same prompts and request settings to the server configured here, e.g.
a vLLM serving an open model, or OpenAI itself with ``model: gpt-3.5-turbo-1106``. Transport,
retries and the API key (read from ``api_key_env`` at each request, never stored) are
:class:`callbacks.chat_client.ChatCompletionsClient`'s.
"""

from __future__ import annotations

import logging
from typing import Any

from callbacks.chat_client import ChatCompletionsClient

log = logging.getLogger(__name__)


class EvalJudge:
    """A chat model that answers lmms-eval's judge prompts; calling it never raises."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "P2R_JUDGE_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3) -> None:
        """
        Args:
            base_url: Server root up to the API version, e.g. http://127.0.0.1:8000/v1.
            model: Model name the server knows (lmms-eval: gpt-4o-2024-11-20 for MMVU, gpt-3.5-turbo-1106 for TempCompass).
            api_key_env: Name of the environment variable holding the API key (unset: no key sent).
            timeout_s: Seconds per attempt.
            max_retries: Extra attempts after a timeout, connection error or HTTP 408/429/5xx.
        """
        self.client = ChatCompletionsClient(base_url, api_key_env, timeout_s, max_retries)  # server settings
        self.model = model

    def __repr__(self) -> str:
        return self.client.describe(self, self.model)

    def __call__(self, messages: list[dict[str, str]], settings: dict[str, Any]) -> str | None:
        """The reply text to ``messages`` under ``settings`` (temperature, max_tokens, ...); None on failure."""
        reply = self.client.complete({"model": self.model, "messages": messages, **settings})
        if reply.text is None:
            log.warning("evaluation judge at %s failed: %s (the question counts as not judged)", self.client.url, reply.error)
        return reply.text
