"""Teachers for step 1 of the CoT pipeline: who writes the tagged trace for a record.

Two back-ends share one interface, ``answer(requests, on_reply) -> replies``:

- :class:`BackboneTeacher`: any p2r backbone (a hub model through ``HFBackbone``, a tiny preset,
  a fine-tuned checkpoint via ``weights_from``), batched local generation on one device;
- :class:`OpenAIChatTeacher`: an OpenAI-compatible ``/chat/completions`` server that takes images,
  e.g. vLLM serving Qwen2.5-VL-72B-Instruct (the paper's teacher). A video goes as its sampled
  frames, each a base64 JPEG ``image_url`` data URL in time order, with one sentence saying so;
  stdlib ``urllib`` only, concurrent, with timeouts and bounded retries with backoff.

A teacher never raises for a request: a failure comes back as a reply with ``text=None`` and an
``error``. ``on_reply`` is called as soon as each reply exists (from worker threads for the
HTTP teacher), so the pipeline can store every answer before anything else can go wrong.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from callbacks.chat_client import ChatCompletionsClient
from p2r.backbones.base import VideoBackbone
from p2r.data.video import Clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherRequest:
    """One record to answer: its id, the user text and the decoded media."""

    id: str
    prompt: str
    clip: Clip
    data_type: str


@dataclass(frozen=True)
class TeacherReply:
    """The teacher's text, or ``text=None`` and an ``error`` saying why there is none."""

    text: str | None
    error: str | None = None
    truncated: bool = False  # the reply hit the token limit (its template is likely cut)
    latency_s: float = 0.0


OnReply = Callable[[int, TeacherReply], None]


class _DeliveryError(Exception):
    """Carries an ``on_reply`` failure through a back-end's own error handling."""


class Teacher:
    """Base of every back-end: the never-raise guard. Subclasses implement :meth:`_answer`."""

    chunk_size: int = 1
    """How many requests the pipeline hands over at once (a batch, or enough to keep every worker busy)."""

    def answer(self, requests: list[TeacherRequest], on_reply: OnReply | None = None) -> list[TeacherReply]:
        """One reply per request, in order; ``on_reply(index, reply)`` as each one arrives.

        Never raises for a request that failed. An error inside ``on_reply`` (the pipeline storing
        the answer, e.g. on a full disk) does propagate: answers that cannot be kept must stop the run.
        """
        if not requests:  # nothing to do: do not build a model or open a pool for it
            return []
        done: dict[int, TeacherReply] = {}
        lock = threading.Lock()

        def deliver(index: int, reply: TeacherReply) -> None:
            with lock:
                done[index] = reply
            if on_reply is not None:
                try:
                    on_reply(index, reply)
                except Exception as err:
                    raise _DeliveryError() from err

        try:
            self._answer(requests, deliver)
        except _DeliveryError as err:
            raise err.__cause__ from None
        except Exception as err:  # a broken back-end must not take a long generation run down
            for i in range(len(requests)):
                if i not in done:
                    deliver(i, TeacherReply(text=None, error=f"{type(err).__name__}: {err}"))
        return [done.get(i, TeacherReply(text=None, error="the teacher returned no reply")) for i in range(len(requests))]

    def _answer(self, requests: list[TeacherRequest], deliver: OnReply) -> None:
        """Answer ``requests``, calling ``deliver(index, reply)`` once per request as its reply exists."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the teacher for the run's header (never a secret)."""
        return repr(self)


class BackboneTeacher(Teacher):
    """A p2r backbone generating locally, ``batch_size`` records per ``generate`` call.

    Temperature 0 decodes greedily (the paper generated at temperature 0). The backbone is built
    on first use and moved to ``device`` (default: cuda when available); one device only, so a
    teacher larger than one accelerator belongs behind :class:`OpenAIChatTeacher`.
    """

    def __init__(
        self,
        backbone: VideoBackbone,
        batch_size: int = 4,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        device: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the model that answers (built on first use if it is not yet).
            batch_size: records per generate call.
            max_new_tokens: reply length limit in tokens.
            temperature: 0 decodes greedily; above 0 samples.
            top_p: nucleus sampling mass when sampling.
            device: where the model runs (default: cuda when available, else cpu).
        """
        self.backbone = backbone
        self.batch_size = max(1, batch_size)
        self.chunk_size = self.batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.device = device

    def describe(self) -> str:
        return f"backbone {type(self.backbone).__name__} (batch {self.batch_size}, temperature {self.temperature})"

    def _ready(self) -> VideoBackbone:
        backbone = self.backbone
        if not backbone.is_built:
            backbone.build()
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if backbone.quantization is None:  # bitsandbytes places quantized weights itself
                backbone.to(device)
        return backbone.eval()

    def _answer(self, requests: list[TeacherRequest], deliver: OnReply) -> None:
        backbone = self._ready()
        eos = set(backbone.eos_token_ids)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            begin = time.monotonic()
            try:
                completions = backbone.generate(
                    [backbone.render_prompt(r.prompt, r.data_type) for r in batch],
                    [r.clip for r in batch],
                    max_new_tokens=self.max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature,
                    top_p=self.top_p,
                )
            except Exception as err:  # e.g. out of memory on one batch: the next batch may still fit
                for i in range(len(batch)):
                    deliver(start + i, TeacherReply(text=None, error=f"{type(err).__name__}: {str(err)[:300]}"))
                continue
            latency = (time.monotonic() - begin) / len(batch)
            for i, ids in enumerate(completions):
                text = backbone.tokenizer.decode(ids, skip_special_tokens=True)
                truncated = not ids or ids[-1] not in eos
                deliver(start + i, TeacherReply(text=text, truncated=truncated, latency_s=latency))


def jpeg_data_url(frame: np.ndarray, quality: int = 90) -> str:
    """A (H, W, 3) uint8 frame as a ``data:image/jpeg;base64,...`` URL (what vLLM's image_url takes)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def frames_note(clip: Clip) -> str:
    """The sentence that tells the teacher its images are one video's frames, in order, and how far apart."""
    n = len(clip.frames)
    if len(clip.frame_indices) >= 2 and clip.fps > 0:
        gap = (clip.frame_indices[-1] - clip.frame_indices[0]) / (len(clip.frame_indices) - 1) / clip.fps
        return f"The {n} images are frames of one video, in time order, about {gap:.1f} s apart."
    return f"The {n} images are frames of one video, in time order."


def chat_messages(request: TeacherRequest, jpeg_quality: int = 90) -> list[dict]:
    """One user message: every frame as an ``image_url`` part, then the text (with the frames note for video)."""
    parts: list[dict] = [
        {"type": "image_url", "image_url": {"url": jpeg_data_url(frame, jpeg_quality)}} for frame in request.clip.frames
    ]
    text = request.prompt if request.clip.is_image else f"{frames_note(request.clip)}\n{request.prompt}"
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


class OpenAIChatTeacher(Teacher):
    """An OpenAI-compatible chat server that accepts images (vLLM, SGLang, a provider) as the teacher.

    The API key is read from the environment variable named by ``api_key_env`` at each request and
    never stored on the object, so it cannot reach ``repr``, logs or the output files; errors are
    redacted in case a server echoes it. With the variable unset no ``Authorization`` header is sent.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "P2R_TEACHER_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 2.0,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        jpeg_quality: int = 90,
    ) -> None:
        """
        Args:
            base_url: server root up to the API version, e.g. ``http://127.0.0.1:8000/v1``.
            model: model name the server expects in the request body.
            api_key_env: NAME of the environment variable holding the API key (never the key itself).
            concurrency: requests in flight at once.
            timeout_s: deadline in seconds on each whole request (a 72B model writing 1k tokens needs minutes).
            max_retries: extra attempts after a retryable failure (timeouts, 408, 429, 5xx).
            backoff_s: sleep before retry k is ``backoff_s * 2**k`` seconds.
            max_tokens: reply length limit in tokens.
            temperature: sampling temperature (0: greedy, as in the paper).
            top_p: nucleus sampling mass.
            jpeg_quality: JPEG quality of the frames sent.
        """
        self.client = ChatCompletionsClient(base_url, api_key_env, timeout_s, max_retries, backoff_s)  # server settings
        self.model = model
        self.concurrency = max(1, concurrency)
        # Several requests per worker, so a slow reply does not leave the others idle for long.
        self.chunk_size = 4 * self.concurrency
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.jpeg_quality = jpeg_quality

    def __repr__(self) -> str:
        return self.client.describe(self, self.model)

    def describe(self) -> str:
        return f"{self.model} at {self.client.url} (concurrency {self.concurrency}, temperature {self.temperature})"

    def _answer_one(self, request: TeacherRequest) -> TeacherReply:
        start = time.monotonic()
        try:
            body = {
                "model": self.model,
                "messages": chat_messages(request, self.jpeg_quality),
                "temperature": self.temperature,
                "top_p": self.top_p,
                "max_tokens": self.max_tokens,
            }
        except Exception as err:  # a frame PIL cannot encode: this record fails, the run goes on
            return TeacherReply(text=None, error=f"cannot encode the frames: {type(err).__name__}: {err}")

        def on_retry(attempt: int, attempts: int, error: str) -> None:
            log.debug("teacher attempt %d/%d for %s failed: %s", attempt, attempts, request.id, error)

        reply = self.client.complete(body, on_retry=on_retry)
        if reply.text is None:
            return TeacherReply(text=None, error=reply.error, latency_s=time.monotonic() - start)
        truncated = reply.finish_reason == "length"  # the reply hit max_tokens: its template is likely cut
        return TeacherReply(text=reply.text, truncated=truncated, latency_s=time.monotonic() - start)

    def _answer(self, requests: list[TeacherRequest], deliver: OnReply) -> None:
        def work(index: int) -> None:
            deliver(index, self._answer_one(requests[index]))

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(requests)))) as pool:
            list(pool.map(work, range(len(requests))))
