"""Observation-only and question-only answering: is the model's observation information-sufficient?

VideoP2R's Table 5: a text model, with no video, answers each question from the question plus the
observation the evaluated model wrote (Qwen-7B: 55.5 % from VideoP2R's observations, against
52.9 % for the base model with the video and 35.1 % from the question alone). An observation that
lets a blind text model answer as well as the video does carries what the question needs.

For every answer of a ``test`` run, :class:`TextOnlyAnswering` asks a text answerer twice:

- observation only: ``observation_template`` with ``{observation}`` (every ``<observation>``
  block of the output, joined by newlines, as the perception judge reads it; empty when the output
  has none) and ``{prompt}`` (the exact user text the run gave the model: the benchmark's question,
  options and answer-format instruction under the run's protocol);
- question only: ``question_template`` with ``{prompt}``.

Each reply is scored by the benchmark's adapter exactly as the run scores the model's own answers,
with the protocol's decoding settings, and each condition's figure is the adapter's aggregate over
the same samples, so ``with_video``, ``observation_only`` and ``question_only`` are paired and
comparable. A sample whose text answer failed (an endpoint that never answered) is left out of all
three conditions and counted in ``failed``.

Answerers (``answer(prompts, generations, pl_module) -> [(text, error)]``):

- :class:`ModuleTextAnswerer` (default): the evaluated backbone itself with no video, through the
  module's documented ``generate_text(prompts, generation=None)`` hook;
- :class:`OpenAIChatAnswerer`: any OpenAI-compatible server (a vLLM serving Qwen2.5-7B-Instruct, as
  in the paper's table, or a provider).

Where the paper is silent (its prompt is not published): the default observation template below.
Cost: two extra generations per answer.
"""

from __future__ import annotations

import string
from typing import Any

from callbacks.chat_client import ChatModel
from callbacks.evaluation.adapter import Generation, generate_by_setting
from callbacks.evaluation.analysis import Figure, Item, mean_se, reading_of
from callbacks.evaluation.report import as_percent
from callbacks.segments import split_segments

OBSERVATION_TEMPLATE = (
    "You cannot see the video. Someone who watched it described it as follows:\n"
    "{observation}\n\n"
    "Answer the question about the video using this description.\n{prompt}"
)
QUESTION_TEMPLATE = "{prompt}"
CONDITIONS = ("with_video", "observation_only", "question_only")
Reply = tuple[str | None, str | None]  # (text, None) or (None, error)


def _check_template(template: str, fields: set[str], what: str) -> str:
    found = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if found != fields:
        raise ValueError(f"TextOnlyAnswering.{what} must use exactly the fields {sorted(fields)}, "
                         f"got {sorted(found)} in {template!r} (write a literal brace as {{{{ or }}}})")
    return template


def _generation(item: Item) -> Generation | None:
    return item.adapter.generation(item.sample) if hasattr(item.adapter, "generation") else None


class ModuleTextAnswerer:
    """The evaluated model itself, with no video: ``pl_module.generate_text(prompts, generation)``."""

    def __repr__(self) -> str:
        return "ModuleTextAnswerer()"

    def answer(self, prompts: list[str], generations: list[Generation | None], pl_module: Any) -> list[Reply]:
        hook = getattr(pl_module, "generate_text", None)
        if hook is None:
            raise TypeError(f"ModuleTextAnswerer needs the module's generate_text(prompts, generation=None) hook, which "
                            f"{type(pl_module).__name__} lacks; configure an OpenAIChatAnswerer instead")
        texts = generate_by_setting(generations, lambda index, kwargs: hook([prompts[i] for i in index], **kwargs))
        return [(text, None) for text in texts]


class OpenAIChatAnswerer(ChatModel):
    """A text model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Each prompt is one user turn; temperature, top_p and max_tokens are the protocol's decoding
    settings where it prescribes them, else greedy with ``max_tokens``. Failures (after the client's
    bounded retries) come back as errors, never raise.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "P2R_ANSWERER_API_KEY", max_tokens: int = 1024,
                 max_concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3) -> None:
        """Arguments as :class:`callbacks.chat_client.ChatModel`'s (``model``: the paper's Table 5 used
        Qwen-7B; ``max_tokens``: the reply length when the protocol prescribes none)."""
        super().__init__(base_url, model, api_key_env, max_tokens, max_concurrency, timeout_s, max_retries)

    def answer(self, prompts: list[str], generations: list[Generation | None], pl_module: Any) -> list[Reply]:
        settings = [s or Generation(self.max_tokens) for s in generations]
        replies = self.ask([[{"role": "user", "content": p}] for p in prompts],
                           [{"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p} for s in settings])
        return [(r.text, r.error) for r in replies]


class TextOnlyAnswering:
    """Observation-only and question-only accuracy beside the run's own (VideoP2R's Table 5; module doc)."""

    name = "text_only"

    def __init__(self, answerer: Any = None, observation_template: str = OBSERVATION_TEMPLATE,
                 question_template: str = QUESTION_TEMPLATE) -> None:
        """
        Args:
            answerer: Who answers without the video (default: the evaluated backbone, ModuleTextAnswerer),
                e.g. {class_path: callbacks.evaluation.OpenAIChatAnswerer, init_args: {base_url: ..., model: ...}}.
            observation_template: The observation-only user turn, with {observation} and {prompt}.
            question_template: The question-only user turn, with {prompt}.
        """
        self.answerer = answerer if answerer is not None else ModuleTextAnswerer()
        self.observation_template = _check_template(observation_template, {"observation", "prompt"}, "observation_template")
        self.question_template = _check_template(question_template, {"prompt"}, "question_template")

    def analyse(self, items: list[Item], pl_module: Any) -> list[dict[str, Any]]:
        observations = [split_segments(item.output).observation for item in items]
        prompts = [self.observation_template.format(observation=o, prompt=item.prompt) for o, item in zip(observations, items)]
        prompts += [self.question_template.format(prompt=item.prompt) for item in items]
        settings = [_generation(item) for item in items]
        replies = self.answerer.answer(prompts, settings + settings, pl_module)
        return [
            {"observation": observation,
             "observation_only": self._scored(item, replies[i]),
             "question_only": self._scored(item, replies[len(items) + i])}
            for i, (item, observation) in enumerate(zip(items, observations))
        ]

    @staticmethod
    def _scored(item: Item, reply: Reply) -> dict[str, Any]:
        text, error = reply
        if text is None:
            return {"error": error or "no reply"}
        scored = item.adapter.score(item.sample, text)
        return {"output": text, "parsed": scored.parsed, "score": scored.score, "metric": scored.metric,
                "details": scored.details}

    def summarize(self, rows: dict[str, list[dict[str, Any]]], figure: Figure) -> dict[str, Any]:
        benchmarks = {}
        for benchmark, lines in sorted(rows.items()):
            readings = [(row, reading_of(row, self.name)) for row in lines]
            used = [(row, r) for row, r in readings if "error" not in r["observation_only"] and "error" not in r["question_only"]]
            block: dict[str, Any] = {"n": len(used), "failed": len(readings) - len(used),
                                     "without_observation": sum(not r["observation"] for _, r in used)}
            if used:
                variants = {
                    "with_video": [row for row, _ in used],
                    "observation_only": [{**row, **r["observation_only"]} for row, r in used],
                    "question_only": [{**row, **r["question_only"]} for row, r in used],
                }
                block.update({c: round(as_percent(figure(benchmark, v)), 4) for c, v in variants.items()})
                scores = {c: [row.get("score") for row in v] for c, v in variants.items()}
                for a, b in (("observation_only", "with_video"), ("observation_only", "question_only")):
                    pairs = [(x, y) for x, y in zip(scores[a], scores[b]) if x is not None and y is not None]
                    block[f"{a}_minus_{b}"] = mean_se([100.0 * (x - y) for x, y in pairs])
            benchmarks[benchmark] = block
        scored = [b for b in benchmarks.values() if b["n"]]
        average = {c: round(sum(b[c] for b in scored) / len(scored), 4) for c in CONDITIONS} if scored else {}
        return {"units": "percent", "answerer": repr(self.answerer), "benchmarks": benchmarks, "average": average}

    def scalars(self, block: dict[str, Any]) -> dict[str, float]:
        out = {}
        for benchmark, values in block["benchmarks"].items():
            out.update({f"{benchmark}/{c}": values[c] / 100.0 for c in CONDITIONS if c in values})
        return out

    def markdown(self, block: dict[str, Any]) -> str:
        lines = ["| text only (%) | n | with video | observation only | question only |", "|---|---|---|---|---|"]
        named = [*block["benchmarks"].items(), *([("average", block["average"])] if block["average"] else [])]
        for benchmark, values in named:
            cells = [f"{values[c]:.1f}" if c in values else "-" for c in CONDITIONS]
            lines.append(f"| {benchmark} | {values.get('n', '')} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
