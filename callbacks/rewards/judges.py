"""Perception judges: is the correct answer deducible from the observation alone? (Racc_P)

METHOD.md: a text-only LLM judge gets the question, the correct answer and ONLY the observation
segment, and answers yes (1) or no (0). Three back-ends share one interface,
``judge(requests) -> results``, one prompt and one verdict parser:

- :class:`OpenAIChatJudge`: any OpenAI-compatible chat-completions server (vLLM, SGLang, a
  provider), through ``urllib`` only; concurrent, with timeouts and bounded retries;
- :class:`HFTextJudge`: a local Hugging Face causal LM, batched greedy decoding;
- :class:`RuleBasedJudge`: the synthetic data's ``facts["evidence"]``, no model at all.

Every back-end caches verdicts keyed by ``(question, answer, observation)`` (the G samples of a
group often repeat an observation, and a failed call is never cached so it is retried next time).
An empty observation is judged 0 without asking anyone: nothing can be deduced from nothing.
A judge never raises for a request: failures come back as results with ``score=None`` and an
``error``, and the reward callback applies its failure policy.

Where we depart from the paper: the paper's prompt is not published; ours is below, and adds one
rule against an obvious reward hack: an observation that only states the answer (or an option
letter) without describing what is seen does not count as sufficient.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from callbacks.chat_client import ChatCompletionsClient

log = logging.getLogger(__name__)

JUDGE_SYSTEM_PROMPT = (
    "You grade visual observations. You never see the video; you only read a question, its correct "
    "answer and an observation written by someone who watched the video. Decide whether the correct "
    "answer can be deduced from the observation alone, with ordinary common sense but without "
    "guessing. An observation that only states the answer or an option letter, without describing "
    "what is seen, is NOT sufficient. Reply with exactly one word: yes or no."
)
JUDGE_USER_TEMPLATE = (
    "Question:\n{question}\n\nCorrect answer:\n{answer}\n\nObservation:\n{observation}\n\n"
    "Can the correct answer be deduced from the observation alone? Reply yes or no."
)


@dataclass(frozen=True)
class JudgeRequest:
    """One perception-judge question. ``facts`` is only read by :class:`RuleBasedJudge`."""

    question: str
    answer: str
    observation: str
    facts: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str, str, str]:
        # The evidence is part of the key: synthetic questions repeat word for word across clips,
        # and the rule-based verdict depends on each clip's own facts.
        evidence = self.facts.get("evidence") if isinstance(self.facts, dict) else None
        return (self.question, self.answer, self.observation, json.dumps(evidence, sort_keys=True))


@dataclass(frozen=True)
class JudgeResult:
    """A verdict (``score`` 1.0 or 0.0) or a failure (``score`` None, ``error`` says why)."""

    score: float | None
    error: str | None = None
    latency_s: float = 0.0
    cached: bool = False


def judge_messages(request: JudgeRequest) -> list[dict[str, str]]:
    """The chat messages every LLM back-end sends: system rules, then the three texts."""
    user = JUDGE_USER_TEMPLATE.format(question=request.question.strip(), answer=request.answer.strip(),
                                      observation=request.observation.strip())
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^[\s*_`\"'#>:\-]*(?:(?:final\s+)?(?:answer|verdict|judg(?:e)?ment)\s*[:\-]?\s*)?[\s*_`\"']*",
                            re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the reply says neither.

    Reasoning inside ``<think>...</think>`` is dropped first; an unclosed ``<think>`` (the reply was
    cut while thinking) is no verdict. The first word decides ("Yes.", "**No**", "Verdict: yes");
    otherwise the LAST yes/no in the reply, since a judge that explains itself concludes at the end.

    >>> parse_verdict("**Yes**, the observation lists three cars.")
    True
    >>> parse_verdict("The observation mentions the cup but not its colour, so: no")
    False
    >>> parse_verdict("<think>hmm") is None
    True
    """
    text = _THINK_BLOCK.sub(" ", text)
    if re.search(r"<think>", text, re.IGNORECASE):
        return None
    head = _YES_NO.match(text[_LEADING_NOISE.match(text).end():])
    if head:
        return head.group(1).lower() == "yes"
    words = _YES_NO.findall(text)
    return words[-1].lower() == "yes" if words else None


class JudgeCache:
    """Thread-safe LRU of verdicts keyed by ``(question, answer, observation)``."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, str]) -> float | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: tuple[str, str, str], score: float) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._data[key] = score
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __getstate__(self) -> dict[str, Any]:
        # Locks do not pickle; spawn-based launchers and deepcopy pickle the callbacks that hold a judge.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Judge:
    """Base of every back-end: the cache, the empty-observation rule and the never-raise guard.

    Subclasses implement :meth:`_judge_uncached` for requests that are neither cached nor empty.
    """

    def __init__(self, cache_size: int = 100_000) -> None:
        """
        Args:
            cache_size: most verdicts kept in the (question, answer, observation) cache; 0 disables it.
        """
        self.cache = JudgeCache(cache_size)

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        """One result per request, in order; never raises."""
        results: list[JudgeResult | None] = [None] * len(requests)
        pending: dict[tuple[str, str, str, str], list[int]] = {}
        for i, request in enumerate(requests):
            if not request.observation.strip():
                results[i] = JudgeResult(score=0.0)
                continue
            if request.key not in pending:
                cached = self.cache.get(request.key)
                if cached is not None:
                    results[i] = JudgeResult(score=cached, cached=True)
                    continue
                pending[request.key] = []
            pending[request.key].append(i)
        unique = [requests[indices[0]] for indices in pending.values()]
        if unique:
            try:
                fresh = self._judge_uncached(unique)
                if len(fresh) != len(unique):
                    raise RuntimeError(f"{type(self).__name__} returned {len(fresh)} results for {len(unique)} requests")
            except Exception as err:  # a judge must never take the training run down
                fresh = [JudgeResult(score=None, error=f"{type(err).__name__}: {err}") for _ in unique]
            for request, result, indices in zip(unique, fresh, pending.values()):
                if result.score is not None:
                    self.cache.put(request.key, result.score)
                for i in indices:
                    results[i] = result
        return results  # type: ignore[return-value]

    def _judge_uncached(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        raise NotImplementedError


class OpenAIChatJudge(Judge):
    """An OpenAI-compatible ``/chat/completions`` endpoint as the perception judge.

    The API key is read from the environment variable named by ``api_key_env`` at each request and
    never stored on the object, so it cannot reach ``repr``, logs, hyperparameters or saved
    configs; when the variable is unset no ``Authorization`` header is sent (a local vLLM needs none).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "P2R_JUDGE_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_tokens: int = 256,
        temperature: float = 0.0,
        cache_size: int = 100_000,
    ) -> None:
        """
        Args:
            base_url: server root up to the API version, e.g. ``http://127.0.0.1:8000/v1``.
            model: model name the server expects in the request body.
            api_key_env: NAME of the environment variable holding the API key (never the key itself).
            max_concurrency: requests in flight at once.
            timeout_s: deadline in seconds on each whole request (connect, send, headers, reply body),
                so a step waits at most (1 + max_retries) x timeout_s plus backoff for the judge.
            max_retries: extra attempts after a retryable failure (timeouts, 408, 429, 5xx).
            backoff_s: sleep before retry k is ``backoff_s * 2**k`` seconds.
            max_tokens: reply length limit; leave room when the judge model thinks before answering.
            temperature: sampling temperature of the judge (0 = greedy, reproducible verdicts).
            cache_size: most verdicts kept in the (question, answer, observation) cache; 0 disables it.
        """
        super().__init__(cache_size)
        self.client = ChatCompletionsClient(base_url, api_key_env, timeout_s, max_retries, backoff_s)  # server settings
        self.model = model
        self.max_concurrency = max(1, max_concurrency)
        self.max_tokens = max_tokens
        self.temperature = temperature

    def __repr__(self) -> str:
        return self.client.describe(self, self.model)

    def _judge_one(self, request: JudgeRequest) -> JudgeResult:
        start = time.monotonic()
        client = self.client
        try:
            body = {
                "model": self.model,
                "messages": judge_messages(request),
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        except Exception as err:  # a malformed request fails alone, like any other non-retryable error
            return JudgeResult(score=None, error=client.redact(f"{type(err).__name__}: {err}"),
                               latency_s=time.monotonic() - start)

        def on_retry(attempt: int, attempts: int, error: str) -> None:
            log.debug("judge attempt %d/%d failed: %s", attempt, attempts, error)

        reply = client.complete(body, on_retry=on_retry)
        if reply.text is None:
            return JudgeResult(score=None, error=reply.error, latency_s=time.monotonic() - start)
        verdict = parse_verdict(reply.text)
        if verdict is None:
            return JudgeResult(score=None, error=f"no yes/no verdict in reply: {client.excerpt(reply.text)!r}",
                               latency_s=time.monotonic() - start)
        return JudgeResult(score=1.0 if verdict else 0.0, latency_s=time.monotonic() - start)

    def _judge_uncached(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            results = list(pool.map(self._judge_one, requests))
        failed = [r for r in results if r.score is None]
        if failed:
            log.warning("%s: %d/%d judge requests failed (last error: %s)",
                        type(self).__name__, len(failed), len(results), failed[-1].error)
        return results


class HFTextJudge(Judge):
    """A local Hugging Face causal LM as the perception judge (batched greedy decoding).

    Give ``model_name_or_path`` (loaded on first use, so building a config loads nothing), or inject
    ``model`` and ``tokenizer`` objects. The prompt goes through the tokenizer's chat template when
    it has one (with ``enable_thinking=False`` for templates that read it), else as plain text.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_new_tokens: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        cache_size: int = 100_000,
    ) -> None:
        """
        Args:
            model_name_or_path: local folder or hub id of the judge model (hub ids need a cached copy offline).
            model: an already built causal LM (tests, or sharing one model); overrides the path.
            tokenizer: the tokenizer that goes with ``model``.
            batch_size: prompts per ``generate`` call.
            max_new_tokens: reply length limit (a verdict is one word; a thinking judge needs more).
            device: where the judge runs; default: an injected model's own device, else cuda when
                available, else cpu.
            dtype: torch dtype name for loading (``auto``, ``bfloat16``, ``float32``...).
            cache_size: most verdicts kept in the (question, answer, observation) cache; 0 disables it.
        """
        super().__init__(cache_size)
        if model is None and model_name_or_path is None:
            raise ValueError("HFTextJudge needs model_name_or_path or an injected model and tokenizer")
        if (model is None) != (tokenizer is None):
            raise ValueError("HFTextJudge: inject model and tokenizer together")
        self.model_name_or_path = model_name_or_path
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.dtype = dtype
        self._model = model
        self._tokenizer = tokenizer
        self._ready = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name_or_path={self.model_name_or_path!r})"

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._model is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_name_or_path, dtype=dtype)
            self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:  # an injected model stays where its owner put it unless a device is configured
            self.device = self.device or str(next(self._model.parameters()).device)
        self._model.to(self.device).eval()
        self._ready = True

    def _prompt(self, request: JudgeRequest) -> str:
        messages = judge_messages(request)
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       enable_thinking=False)
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\nAnswer:"

    def _judge_uncached(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        import torch

        if not self._ready:
            self._load()
        tokenizer = self._tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("HFTextJudge: the tokenizer has neither a pad nor an eos token")
        results: list[JudgeResult] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            begin = time.monotonic()
            ids = [tokenizer(self._prompt(r), add_special_tokens=False)["input_ids"] for r in batch]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=self.device)  # (b, L) left-padded
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)  # (b, L)
            with torch.no_grad():
                out = self._model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                           max_new_tokens=self.max_new_tokens, pad_token_id=pad_id)
            replies = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)  # new tokens only
            latency = (time.monotonic() - begin) / len(batch)
            for reply in replies:
                verdict = parse_verdict(reply)
                if verdict is None:
                    results.append(JudgeResult(score=None, error=f"no yes/no verdict in reply: {reply[:200]!r}",
                                               latency_s=latency))
                else:
                    results.append(JudgeResult(score=1.0 if verdict else 0.0, latency_s=latency))
        return results


@lru_cache(maxsize=4096)
def _phrase_pattern(phrase: str) -> re.Pattern | None:
    words = phrase.split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def evidence_satisfied(observation: str, evidence: list) -> bool:
    """The rule of :class:`RuleBasedJudge`: True when ``observation`` mentions a phrase of every group
    of ``evidence`` (a list of groups of phrases; a group given as a bare string is a group of one).

    Phrases match case-insensitively on word boundaries ("red" does not match "bored"; any run of
    whitespace matches a space). Groups are checked in order; a group without any phrase that is
    reached raises ``ValueError``. The synthetic data generator checks its reference traces with it.
    """
    for group in evidence:
        phrases = [group] if isinstance(group, str) else group
        patterns = [p for p in (_phrase_pattern(str(x)) for x in phrases) if p is not None] if isinstance(phrases, list) else []
        if not patterns:
            raise ValueError(f"facts['evidence'] has an empty or malformed group: {group!r}")
        if not any(p.search(observation) for p in patterns):
            return False
    return True


class RuleBasedJudge(Judge):
    """The synthetic data's own judge: ``facts["evidence"]``, a list of groups of phrases.

    Sufficient (1) iff, for every group, the observation mentions one of its phrases
    (:func:`evidence_satisfied`). A record without ``facts["evidence"]``, an empty evidence list or a
    group without any phrase is an error result: nothing says what the observation must contain.
    """

    def __init__(self, cache_size: int = 100_000) -> None:
        """
        Args:
            cache_size: most verdicts kept in the (question, answer, observation) cache; 0 disables it.
        """
        super().__init__(cache_size)

    def _judge_one(self, request: JudgeRequest) -> JudgeResult:
        evidence = request.facts.get("evidence") if isinstance(request.facts, dict) else None
        if not isinstance(evidence, list) or not evidence:
            return JudgeResult(score=None, error="record has no facts['evidence'] to judge against")
        try:
            return JudgeResult(score=1.0 if evidence_satisfied(request.observation, evidence) else 0.0)
        except ValueError as err:
            return JudgeResult(score=None, error=str(err))

    def _judge_uncached(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        return [self._judge_one(r) for r in requests]
