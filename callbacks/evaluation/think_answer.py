"""Think-answer mismatch: how often the conclusion reached in ``<think>`` differs from ``<answer>``.

VideoP2R's Table 6 (VideoP2R 7.5 %, Video-R1 21.5 %, VideoRFT 16.9 %): a model whose final answer
does not follow from its own reasoning is not reasoning. The paper does not publish its procedure;
ours, per answer of a ``test`` run:

- the reasoning is the last complete ``<think>...</think>`` block, the answer the first complete
  ``<answer>...</answer>`` block (Video-R1's reading, the one the reasoning reward scores); an
  output missing either is not measured (``not_measured``: ``no <think>`` / ``no <answer>``);
- a question with options (or of type ``multiple choice``) is read by rule: the option letter
  ``<think>`` finally commits to (:func:`callbacks.rewards.parsing.last_committed_letter`) against
  the letter ``<answer>`` names (:func:`~callbacks.rewards.parsing.parse_option_letter`);
- a ``numerical`` or ``regression`` question by rule too: the last number in ``<think>``
  (:func:`~callbacks.rewards.parsing.last_number`) against the number in ``<answer>``
  (:func:`~callbacks.rewards.parsing.parse_number`), equal when they agree to 2 decimals (the
  rounding of Video-R1's numerical reward);
- any other (free text: OCR, free-form, open questions) goes to the judge: "does the final answer
  state the conclusion the reasoning reached?". :class:`OpenAIMismatchJudge` asks an LLM;
  :class:`RuleMismatchJudge` (default, and what CI runs) only checks that the answer's words appear
  in the reasoning in order;
- when the rule finds no conclusion in ``<think>`` (or no option / number in ``<answer>``), or the
  judge gives no verdict, the answer is not measured, with the reason counted.

The rate is mismatches over measured answers, in percent, per benchmark and pooled over all of
them (``all``), with its binomial standard error and the counts behind it. Every reading (what
the rule read on each side, or the judge's verdict) is stored per answer in ``predictions.jsonl``
for audit.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, NamedTuple

from callbacks.chat_client import ChatModel
from callbacks.evaluation.analysis import Figure, Item, reading_of
from callbacks.rewards.judges import parse_verdict
from callbacks.rewards.parsing import (
    extract_tag,
    last_committed_letter,
    last_number,
    parse_number,
    parse_option_letter,
    video_r1_answer,
)

MISMATCH_SYSTEM_PROMPT = (
    "You check whether a model's final answer follows its own reasoning. You read a question, the "
    "model's reasoning and its final answer. Whether the answer is correct does not matter: decide "
    "only whether the final answer states the same conclusion the reasoning reached. Reply with "
    "exactly one word: yes or no."
)
MISMATCH_USER_TEMPLATE = (
    "Question:\n{question}\n\nReasoning:\n{think}\n\nFinal answer:\n{answer}\n\n"
    "Does the final answer state the conclusion the reasoning reached? Reply yes or no."
)


class Case(NamedTuple):
    """One free-text answer for the judge."""

    question: str
    think: str
    answer: str


Verdict = tuple[bool | None, str | None]  # (True: they agree / False: mismatch / None, error)


def answer_kind(record: Any) -> str:
    """``letter`` (options, or type multiple choice), ``number`` (numerical, regression) or ``text``,
    from the record's Video-R1 fields ``options`` and ``problem_type``."""
    problem_type = str(getattr(record, "problem_type", "") or "").lower()
    if getattr(record, "options", None) or problem_type == "multiple choice":
        return "letter"
    if problem_type in ("numerical", "regression"):
        return "number"
    return "text"


def rule_reading(output: str, record: Any) -> dict[str, Any]:
    """The reading of one output (see the module doc); free-text answers come back with
    ``method: judge`` and ``mismatch: None`` for the judge to fill in."""
    kind = answer_kind(record)
    think, answer = extract_tag(output, "think"), video_r1_answer(output)
    reading: dict[str, Any] = {"kind": kind, "method": "judge" if kind == "text" else "rule", "mismatch": None}
    if think is None:
        return {**reading, "reason": "no <think>"}
    if not answer:
        return {**reading, "reason": "no <answer>"}
    if kind == "text":
        return {**reading, "think": think, "answer": answer}
    if kind == "letter":
        options = list(getattr(record, "options", None) or [])
        n = len(options) or None
        concluded, stated = last_committed_letter(think, n), parse_option_letter(answer, n, options or None)
        same = concluded == stated
    else:
        concluded, stated = last_number(think), parse_number(answer)
        same = concluded is not None and stated is not None and round(concluded, 2) == round(stated, 2)
    reading.update(think=concluded, answer=stated)
    if concluded is None:
        return {**reading, "reason": f"no {'option' if kind == 'letter' else 'number'} concluded in <think>"}
    if stated is None:
        return {**reading, "reason": f"no {'option' if kind == 'letter' else 'number'} in <answer>"}
    return {**reading, "mismatch": not same}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class RuleMismatchJudge:
    """Free text by rule, with no model: the answer agrees when its words appear in the reasoning
    as one run, in order (case and punctuation ignored). Crude (a reasoning that quotes the answer
    to reject it agrees); what CI and offline runs use."""

    def __repr__(self) -> str:
        return "RuleMismatchJudge()"

    def agree(self, cases: list[Case]) -> list[Verdict]:
        out: list[Verdict] = []
        for case in cases:
            answer, think = _words(case.answer), _words(case.think)
            if not answer:
                out.append((None, "the answer has no words"))
                continue
            found = any(think[i : i + len(answer)] == answer for i in range(len(think) - len(answer) + 1))
            out.append((found, None))
        return out


class OpenAIMismatchJudge(ChatModel):
    """An LLM behind an OpenAI-compatible endpoint decides whether free-text answers follow their reasoning."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "P2R_JUDGE_API_KEY", max_tokens: int = 256,
                 max_concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3) -> None:
        """Arguments as :class:`callbacks.chat_client.ChatModel`'s (``max_tokens``: leave room when the
        judge model thinks before answering)."""
        super().__init__(base_url, model, api_key_env, max_tokens, max_concurrency, timeout_s, max_retries)

    def agree(self, cases: list[Case]) -> list[Verdict]:
        out: list[Verdict] = []
        for reply in self.ask([mismatch_messages(c) for c in cases]):
            if reply.text is None:
                out.append((None, reply.error))
                continue
            verdict = parse_verdict(reply.text)
            out.append((verdict, None if verdict is not None else f"no yes/no verdict in reply: {self.client.excerpt(reply.text)!r}"))
        return out


def mismatch_messages(case: Case) -> list[dict[str, str]]:
    """The chat messages the LLM judge is sent for one free-text answer."""
    user = MISMATCH_USER_TEMPLATE.format(question=case.question.strip(), think=case.think, answer=case.answer)
    return [{"role": "system", "content": MISMATCH_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def rate_block(readings: list[dict[str, Any]]) -> dict[str, Any]:
    """Mismatch rate (percent) over the measured readings, its binomial standard error, and counts.

    >>> rate_block([{"method": "rule", "mismatch": True}, {"method": "rule", "mismatch": False},
    ...             {"method": "judge", "mismatch": None, "reason": "judge failed"}])["rate"]
    50.0
    """
    measured = [r for r in readings if r["mismatch"] is not None]
    k, n = sum(r["mismatch"] for r in measured), len(measured)
    rate = k / n if n else None
    return {
        "n": len(readings), "measured": n, "mismatches": k,
        "rate": None if rate is None else round(100.0 * rate, 4),
        "se": None if rate is None else round(100.0 * math.sqrt(rate * (1 - rate) / n), 4),
        "by_method": {m: {"measured": sum(r["method"] == m for r in measured),
                          "mismatches": sum(r["method"] == m and r["mismatch"] for r in measured)}
                      for m in sorted({r["method"] for r in readings})},
        "not_measured": dict(sorted(Counter(r["reason"] for r in readings if r["mismatch"] is None).items())),
    }


class ThinkAnswerMismatch:
    """Think-answer mismatch rate per benchmark and pooled (VideoP2R's Table 6; module doc)."""

    name = "think_answer_mismatch"

    def __init__(self, judge: Any = None) -> None:
        """
        Args:
            judge: Who reads free-text answers (default RuleMismatchJudge), e.g.
                {class_path: callbacks.evaluation.OpenAIMismatchJudge, init_args: {base_url: ..., model: ...}}.
        """
        self.judge = judge if judge is not None else RuleMismatchJudge()

    def analyse(self, items: list[Item], pl_module: Any) -> list[dict[str, Any]]:
        readings = [rule_reading(item.output, item.sample.record) for item in items]
        asked = [i for i, r in enumerate(readings) if r["method"] == "judge" and "reason" not in r]
        cases = [Case(str(getattr(items[i].sample.record, "problem", "") or items[i].prompt),
                      readings[i]["think"], readings[i]["answer"]) for i in asked]
        for i, (agrees, error) in zip(asked, self.judge.agree(cases) if cases else []):
            readings[i]["judge"] = repr(self.judge)
            if agrees is None:
                readings[i].update(reason="judge failed", error=error)
            else:
                readings[i]["mismatch"] = not agrees
        return readings

    def summarize(self, rows: dict[str, list[dict[str, Any]]], figure: Figure) -> dict[str, Any]:
        readings = {b: [reading_of(row, self.name) for row in lines] for b, lines in sorted(rows.items())}
        return {"units": "percent", "judge": repr(self.judge),
                "benchmarks": {b: rate_block(r) for b, r in readings.items()},
                "all": rate_block([r for b in readings.values() for r in b])}

    def scalars(self, block: dict[str, Any]) -> dict[str, float]:
        named = {**block["benchmarks"], "all": block["all"]}
        return {f"{b}/rate": v["rate"] / 100.0 for b, v in named.items() if v["rate"] is not None}

    def markdown(self, block: dict[str, Any]) -> str:
        lines = ["| think-answer mismatch | measured / n | mismatch (%) |", "|---|---|---|"]
        for benchmark, values in [*block["benchmarks"].items(), ("all", block["all"])]:
            rate = "-" if values["rate"] is None else f"{values['rate']:.1f} ± {values['se']:.1f}"
            lines.append(f"| {benchmark} | {values['measured']} / {values['n']} | {rate} |")
        return "\n".join(lines)
