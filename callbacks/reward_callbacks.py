"""Reward callbacks: each wires one pure reward function (``callbacks.rewards``) to a training run.

The RL module owns the order of a step; after generating its :class:`~callbacks.rollouts.Rollouts`
it calls :func:`score_all`, which finds every :class:`RewardCallback` on the trainer, orders them
by ``depends_on`` and lets each store its values in ``rollouts.rewards`` under its ``name`` and
log ``reward/<name>``. PA-GRPO then sums per ``process``; plain GRPO sums everything. Then the
module calls :func:`notify_rollouts_scored` so that observers (the rollout table) see the result.

Configs pick rewards by class path, e.g.::

    trainer:
      callbacks:
        - class_path: callbacks.reward_callbacks.ReasoningAccuracyReward
        - class_path: callbacks.reward_callbacks.PerceptionJudgeReward
          init_args:
            judge: {class_path: callbacks.rewards.judges.RuleBasedJudge}

Metrics are logged with ``pl_module.log`` from inside the module's ``training_step`` (where
:func:`score_all` is meant to be called), on step, without cross-rank sync.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning as L

from callbacks.rewards.accuracy import ANSWER_READERS, PROBLEM_TYPES, AnswerReader, reasoning_accuracy
from callbacks.rewards.format import perception_format, reasoning_format, think_answer_format
from callbacks.rewards.judges import Judge, JudgeRequest, JudgeResult, RuleBasedJudge
from callbacks.rewards.length import (
    COMPLETION_LENGTH_RANGE,
    LENGTH_BONUS,
    PERCEPTION_LENGTH_RANGE,
    REASONING_LENGTH_RANGE,
    completion_length_rewards,
    length_reward,
)
from callbacks.rewards.parsing import parse_option_letter, solution_answer, video_r1_answer
from callbacks.rollouts import Rollouts


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


class RewardCallback(L.Callback):
    """One reward: a ``name`` ("reasoning/accuracy"), the ``process`` it feeds ("perception" or
    "reasoning") and the names of the rewards it reads (``depends_on``).

    Subclasses implement :meth:`score` (pure with respect to the run: rollouts in, one float per
    sample out), or :meth:`score_with_metrics` when they have extra metrics to log.
    ``needs_shuffled_frames`` asks the producer for ``rollouts.shuffled_completions``.
    """

    name: str = ""
    process: str = ""
    depends_on: tuple[str, ...] = ()
    needs_shuffled_frames: bool = False

    def score(self, rollouts: Rollouts) -> list[float]:
        raise NotImplementedError

    def score_with_metrics(self, rollouts: Rollouts) -> tuple[list[float], dict[str, float]]:
        """The values and any metrics beyond the mean reward (latency, failure counts...)."""
        return self.score(rollouts), {}

    def score_rollouts(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None,
                       rollouts: Rollouts) -> list[float]:
        """Score, store into ``rollouts.rewards`` / ``reward_process``, and log through ``pl_module`` when a
        ``trainer`` runs it (both None: score only)."""
        values, metrics = self.score_with_metrics(rollouts)
        rollouts.set_reward(self.name, values, self.process)
        if trainer is not None and pl_module is not None:
            metrics = {f"reward/{self.name}": _nanmean(rollouts.rewards[self.name]), **metrics}
            for key, value in metrics.items():
                if not math.isnan(value):
                    pl_module.log(key, float(value), batch_size=len(values))
        return rollouts.rewards[self.name]


def _ordered(callbacks: list[RewardCallback], available: set[str]) -> list[RewardCallback]:
    """Callbacks in an order where each runs after the rewards it depends on (stable otherwise)."""
    names = [cb.name for cb in callbacks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"score_all: several reward callbacks share the name(s) {duplicates}; names must be unique")
    for cb in callbacks:
        missing = [d for d in cb.depends_on if d not in names and d not in available]
        if missing:
            raise ValueError(
                f"score_all: {type(cb).__name__} ({cb.name!r}) needs reward(s) {missing}, which no configured "
                f"reward callback produces; configured: {names}"
            )
    done, order, remaining = set(available), [], list(callbacks)
    while remaining:
        ready = next((cb for cb in remaining if all(d in done for d in cb.depends_on)), None)
        if ready is None:
            raise ValueError(f"score_all: circular depends_on among {[cb.name for cb in remaining]}")
        order.append(ready)
        done.add(ready.name)
        remaining.remove(ready)
    return order


def reward_callbacks_of(trainer: L.Trainer) -> list[RewardCallback]:
    """Every :class:`RewardCallback` on the trainer, in configuration order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, RewardCallback)]


def score_all(trainer: L.Trainer | None, pl_module: L.LightningModule | None, rollouts: Rollouts,
              callbacks: list[RewardCallback] | None = None) -> dict[str, list[float]]:
    """Run every reward callback (``callbacks``, else those on ``trainer``) in dependency order.

    Returns ``rollouts.rewards``. Raises ``RuntimeError`` when no reward callback is configured and
    ``ValueError`` when a dependency is missing, circular, or two callbacks share a name.
    """
    if callbacks is None:
        if trainer is None:
            raise RuntimeError("score_all: pass the trainer or an explicit list of reward callbacks")
        callbacks = reward_callbacks_of(trainer)
    if not callbacks:
        raise RuntimeError(
            "score_all: no reward callback is configured. Add some to trainer.callbacks, e.g. "
            "callbacks.reward_callbacks.ReasoningAccuracyReward, ReasoningFormatReward, PerceptionFormatReward, "
            "PerceptionJudgeReward"
        )
    for cb in _ordered(callbacks, set(rollouts.rewards)):
        cb.score_rollouts(trainer, pl_module, rollouts)
    return rollouts.rewards


def needs_shuffled_frames(callbacks: list[Any]) -> bool:
    """Whether any callback asks the producer for completions on temporally shuffled frames."""
    return any(getattr(cb, "needs_shuffled_frames", False) for cb in callbacks)


def notify_rollouts_scored(trainer: L.Trainer, pl_module: L.LightningModule, rollouts: Rollouts) -> None:
    """Call ``on_rollouts_scored(trainer, pl_module, rollouts)`` on every trainer callback that has it."""
    for cb in trainer.callbacks:
        hook = getattr(cb, "on_rollouts_scored", None)
        if callable(hook):
            hook(trainer, pl_module, rollouts)


def solution_of(prompt: dict[str, Any]) -> str:
    """The ground truth of a prompt as a record's ``solution`` field holds it: the prompt's
    ``solution`` when the producer gives one (p2r does), else its ``answer`` (bare, or tagged) put
    inside ``<answer>`` tags."""
    if "solution" in prompt:
        return str(prompt["solution"])
    return f"<answer>{solution_answer(str(prompt.get('answer', '')))}</answer>"


class ReasoningAccuracyReward(RewardCallback):
    """Racc_R in [0, 1], by the prompt's problem type (``callbacks.rewards.accuracy``).

    By default exactly Video-R1's ``accuracy_reward``: only the first complete ``<answer>`` block of
    the completion counts (none: 0), multiple choice is exact string equality with the ground-truth
    letter, numerical needs the same use of "." / "," as the ground truth and equality at 2 decimals,
    OCR is 1 - WER, free-form the mean ROUGE-1/2/L F1 of ``rouge_score`` with stemming, regression
    1 - relative error. ``answer_reader="lenient"`` reads the answer tolerantly instead (see
    ``callbacks.rewards.accuracy``): it also scores text outside a finished answer block.

    The ground truth is the prompt's ``solution`` (read as Video-R1 reads it) or else its bare
    ``answer`` (see :func:`solution_of`). A ``solution`` with no complete ``<answer>`` block reads as
    the empty answer under Video-R1's rule; the callback warns once when it meets one.
    """

    name = "reasoning/accuracy"
    process = "reasoning"

    def __init__(self, answer_reader: AnswerReader = "video_r1") -> None:
        """
        Args:
            answer_reader: "video_r1" (Video-R1's accuracy_reward exactly) or "lenient" (also reads an
                unclosed answer, the whole completion without tags, option letters in phrases, numbers in text).
        """
        if answer_reader not in ANSWER_READERS:
            raise ValueError(f"{type(self).__name__}: answer_reader must be one of {ANSWER_READERS}, got {answer_reader!r}")
        self.answer_reader = answer_reader
        self._warned_untagged = False

    def score(self, rollouts: Rollouts) -> list[float]:
        return [self.accuracy(rollouts.prompt_of(i), c) for i, c in enumerate(rollouts.completions)]

    def accuracy(self, prompt: dict[str, Any], completion: str) -> float:
        """Racc_R of one completion of ``prompt`` (the temporal bonus scores shuffled-frame answers with it)."""
        if prompt.get("problem_type") not in PROBLEM_TYPES:
            raise ValueError(f"{type(self).__name__}: prompt {prompt.get('id')!r} has problem_type "
                             f"{prompt.get('problem_type')!r}, expected one of {PROBLEM_TYPES}")
        solution = solution_of(prompt)
        self._warn_untagged(prompt, solution)
        return reasoning_accuracy(completion, solution, prompt["problem_type"], prompt.get("options"), self.answer_reader)

    def _warn_untagged(self, prompt: dict[str, Any], solution: str) -> None:
        # The two readings differ only for a non-blank solution without a complete answer block.
        untagged = video_r1_answer(solution) != solution_answer(solution)
        if self.answer_reader != "video_r1" or self._warned_untagged or not untagged:
            return
        self._warned_untagged = True
        warnings.warn(
            f"{type(self).__name__}: the solution of prompt {prompt.get('id')!r} ({solution[:60]!r}) has no complete "
            "<answer>...</answer> block; Video-R1's rule reads its ground truth as '' (only an empty answer can "
            "score). Store solutions as <answer>X</answer>, or pass the bare answer without a solution.",
            stacklevel=2,
        )


class PerceptionFormatReward(RewardCallback):
    """Rformat_P: 1 when the completion opens with one well-formed observation block."""

    name = "perception/format"
    process = "perception"

    def score(self, rollouts: Rollouts) -> list[float]:
        return [perception_format(c) for c in rollouts.completions]


class ReasoningFormatReward(RewardCallback):
    """Rformat_R: 1 when the reasoning segment is one think block followed by one answer block."""

    name = "reasoning/format"
    process = "reasoning"

    def score(self, rollouts: Rollouts) -> list[float]:
        return [reasoning_format(c) for c in rollouts.completions]


class ThinkAnswerFormatReward(RewardCallback):
    """Video-R1's ``format_reward`` for its think/answer template (the GRPO / T-GRPO baselines): 1 when
    the whole completion is ``<think>...</think>``, optional whitespace, ``<answer>...</answer>``
    (``callbacks.rewards.format.think_answer_format``). It judges the think/answer trace, so it feeds
    the reasoning process, like :class:`ReasoningFormatReward`; plain GRPO sums every process anyway.
    """

    name = "reasoning/think_answer_format"
    process = "reasoning"

    def score(self, rollouts: Rollouts) -> list[float]:
        return [think_answer_format(c) for c in rollouts.completions]


class _LengthReward(RewardCallback):
    _lengths_field = ""

    def __init__(self, lmin: int, lmax: int) -> None:
        if lmin > lmax:
            raise ValueError(f"{type(self).__name__}: lmin {lmin} > lmax {lmax}")
        self.lmin = lmin
        self.lmax = lmax

    def score(self, rollouts: Rollouts) -> list[float]:
        lengths = getattr(rollouts, self._lengths_field)
        if lengths is None:
            raise ValueError(f"{type(self).__name__} needs rollouts.{self._lengths_field}; the producer did not fill it")
        accuracy, fmt = (rollouts.rewards[d] for d in self.depends_on)
        return [length_reward(a, f, n, self.lmin, self.lmax) for a, f, n in zip(accuracy, fmt, lengths)]


class PerceptionLengthReward(_LengthReward):
    """Rlen_P: 0.2 when the observation is judged sufficient, well formed and of [lmin, lmax] tokens."""

    name = "perception/length"
    process = "perception"
    depends_on = ("perception/accuracy", "perception/format")
    _lengths_field = "perception_token_lengths"

    def __init__(self, lmin: int = PERCEPTION_LENGTH_RANGE[0], lmax: int = PERCEPTION_LENGTH_RANGE[1]) -> None:
        """
        Args:
            lmin: fewest perception tokens (tags included) that earn the bonus.
            lmax: most perception tokens that earn the bonus.
        """
        super().__init__(lmin, lmax)


class ReasoningLengthReward(_LengthReward):
    """Rlen_R: 0.2 when the answer is (partly) right, well formed and the reasoning has [lmin, lmax] tokens."""

    name = "reasoning/length"
    process = "reasoning"
    depends_on = ("reasoning/accuracy", "reasoning/format")
    _lengths_field = "reasoning_token_lengths"

    def __init__(self, lmin: int = REASONING_LENGTH_RANGE[0], lmax: int = REASONING_LENGTH_RANGE[1]) -> None:
        """
        Args:
            lmin: fewest reasoning tokens (think + answer + EOS) that earn the bonus.
            lmax: most reasoning tokens that earn the bonus.
        """
        super().__init__(lmin, lmax)


class CompletionLengthReward(RewardCallback):
    """Video-R1's length control (T-GRPO's ``len_control``): when more than one sample of a group is
    correct (accuracy > ``correct_threshold``), each correct one whose whole completion has
    [lmin, lmax] tokens (end token included) gets ``bonus``. See
    :func:`callbacks.rewards.length.completion_length_rewards`."""

    name = "reasoning/completion_length"
    process = "reasoning"
    depends_on = ("reasoning/accuracy",)

    def __init__(
        self,
        lmin: int = COMPLETION_LENGTH_RANGE[0],
        lmax: int = COMPLETION_LENGTH_RANGE[1],
        bonus: float = LENGTH_BONUS,
        correct_threshold: float = 0.1,
    ) -> None:
        """
        Args:
            lmin: fewest completion tokens (end token included) that earn the bonus (Video-R1: 320).
            lmax: most completion tokens that earn the bonus (Video-R1: 512).
            bonus: reward of a correct completion in range (Video-R1: 0.2).
            correct_threshold: accuracy above which a sample counts as correct (Video-R1: 0.1).
        """
        if lmin > lmax:
            raise ValueError(f"CompletionLengthReward: lmin {lmin} > lmax {lmax}")
        self.lmin, self.lmax, self.bonus, self.correct_threshold = lmin, lmax, bonus, correct_threshold

    def score(self, rollouts: Rollouts) -> list[float]:
        if rollouts.completion_ids is None:
            raise ValueError("CompletionLengthReward needs rollouts.completion_ids; the producer did not fill it")
        lengths = [len(ids) for ids in rollouts.completion_ids]
        return completion_length_rewards(rollouts.rewards["reasoning/accuracy"], lengths, rollouts.group_size,
                                         self.lmin, self.lmax, self.bonus, self.correct_threshold)


def judge_answer_text(prompt: dict[str, Any]) -> str:
    """The correct answer as the judge reads it: for multiple choice the letter AND the option text
    ("B. a red circle"), since a bare letter means nothing without the options; else the answer."""
    answer = solution_answer(str(prompt.get("answer", "")))
    options = prompt.get("options") or []
    if prompt.get("problem_type") != "multiple choice" or not options:
        return answer
    letter = parse_option_letter(answer, len(options), options)
    if letter is None:
        return answer
    option = options[ord(letter) - ord("A")].strip()
    already = len(option) >= 2 and option[0].upper() == letter and option[1] in ".):"
    return option if already else f"{letter}. {option}"


class PerceptionJudgeReward(RewardCallback):
    """Racc_P: 1 when a judge deduces the correct answer from the observation alone, else 0.

    A failed verdict (timeout, server error, unparsable reply, record without facts for the rule
    judge) scores 0 under ``failure_policy="zero"``, or NaN under ``"drop_group"``, which tells the
    RL module to leave that sample's whole group out of the update. Failures never raise.
    Logs ``judge/failures``, ``judge/failure_rate``, ``judge/cache_hits`` and ``judge/latency_s``
    (mean over the requests actually sent).
    """

    name = "perception/accuracy"
    process = "perception"

    def __init__(
        self, judge: Judge, failure_policy: Literal["zero", "drop_group"] = "zero", use_facts: bool = True
    ) -> None:
        """
        Args:
            judge: the back-end that reads question, answer and observation (OpenAIChatJudge, HFTextJudge, RuleBasedJudge).
            failure_policy: what a failed verdict scores: "zero" (0.0) or "drop_group" (NaN: drop the group).
            use_facts: records that carry structured ground truth (facts["evidence"], e.g. the synthetic
                set) are judged by rule against it instead of by ``judge``; False sends every record to ``judge``.
        """
        if failure_policy not in ("zero", "drop_group"):
            raise ValueError(f"PerceptionJudgeReward: failure_policy must be 'zero' or 'drop_group', got {failure_policy!r}")
        self.judge = judge
        self.failure_policy = failure_policy
        self.use_facts = use_facts
        self._facts_judge = RuleBasedJudge()

    def _judge_all(self, requests: list[JudgeRequest]) -> list[JudgeResult | None]:
        """Route each request to the rule judge (has evidence, use_facts) or the configured judge."""
        has_facts = [self.use_facts and isinstance(r.facts, dict) and bool(r.facts.get("evidence")) for r in requests]
        results: list[JudgeResult | None] = [None] * len(requests)
        for judge, wanted in ((self._facts_judge, True), (self.judge, False)):
            idx = [i for i, f in enumerate(has_facts) if f == wanted]
            if not idx:
                continue
            try:
                got = judge.judge([requests[i] for i in idx])
            except Exception:  # Judge.judge never raises; a custom judge might
                got = []
            for i, result in zip(idx, got):
                results[i] = result
        return results

    def score(self, rollouts: Rollouts) -> list[float]:
        return self.score_with_metrics(rollouts)[0]

    def score_with_metrics(self, rollouts: Rollouts) -> tuple[list[float], dict[str, float]]:
        requests = []
        for i in range(len(rollouts)):
            prompt = rollouts.prompt_of(i)
            requests.append(JudgeRequest(question=str(prompt.get("question", "")), answer=judge_answer_text(prompt),
                                         observation=rollouts.observation(i), facts=prompt.get("facts")))
        results = self._judge_all(requests)
        failed_value = 0.0 if self.failure_policy == "zero" else math.nan
        values, failures, latencies, hits = [], 0, [], 0
        for i in range(len(requests)):
            result = results[i] if i < len(results) else None
            if result is None or result.score is None:
                failures += 1
                values.append(failed_value)
                continue
            values.append(float(result.score))
            hits += result.cached
            if result.latency_s > 0:
                latencies.append(result.latency_s)
        metrics = {
            "judge/failures": float(failures),
            "judge/failure_rate": failures / max(1, len(requests)),
            "judge/cache_hits": float(hits),
            "judge/latency_s": _nanmean(latencies) if latencies else math.nan,
        }
        return values, metrics


class TemporalBonusReward(RewardCallback):
    """Video-R1's T-GRPO temporal bonus, as a reasoning reward.

    Per group, answers are also sampled from temporally shuffled frames
    (``rollouts.shuffled_completions``, ``rollouts.shuffled_samples`` per prompt: Video-R1 samples
    G // 2; the producer fills it because ``needs_shuffled_frames``). When the ordered group's
    mean accuracy (over its G samples) is at least ``ratio`` x the shuffled group's (over its own), every
    ordered sample whose accuracy exceeds ``correct_threshold`` gets ``bonus``. As in Video-R1 the
    comparison is ``>=``, so a group where both means are 0 passes but has no correct sample to
    reward, and "correct" is accuracy > 0.1 (Video-R1's threshold). Video-R1 compares one prompt
    per device; we compare per group, which is the same for its batch of one prompt.
    Image prompts (``data_type == "image"``) get no bonus: shuffling one image changes nothing,
    and Video-R1 applies T-GRPO to videos only.
    """

    name = "reasoning/temporal"
    process = "reasoning"
    depends_on = ("reasoning/accuracy",)
    needs_shuffled_frames = True

    def __init__(
        self, bonus: float = 0.3, ratio: float = 0.8, correct_threshold: float = 0.1,
        answer_reader: AnswerReader = "video_r1",
    ) -> None:
        """
        Args:
            bonus: reward added to each correct answer of a group that passes the temporal test.
            ratio: the group passes when its mean accuracy >= ratio x the shuffled-frame group's.
            correct_threshold: accuracy above which an answer counts as correct.
            answer_reader: how shuffled-frame answers are read; set it as on ReasoningAccuracyReward.
        """
        self._shuffled_accuracy = ReasoningAccuracyReward(answer_reader)
        self.bonus = bonus
        self.ratio = ratio
        self.correct_threshold = correct_threshold

    def score(self, rollouts: Rollouts) -> list[float]:
        return self.score_with_metrics(rollouts)[0]

    def score_with_metrics(self, rollouts: Rollouts) -> tuple[list[float], dict[str, float]]:
        g = rollouts.group_size
        accuracy = rollouts.rewards["reasoning/accuracy"]
        videos = [p.get("data_type", "video") != "image" for p in rollouts.prompts]
        if rollouts.shuffled_completions is None:
            if any(videos):
                raise ValueError("TemporalBonusReward needs rollouts.shuffled_completions for video prompts "
                                 "(the producer must honour needs_shuffled_frames)")
            return [0.0] * len(rollouts), {"temporal/pass_rate": math.nan}
        values, passed, k = [0.0] * len(rollouts), [], rollouts.shuffled_samples
        for b, is_video in enumerate(videos):
            if not is_video:
                continue
            prompt = rollouts.prompts[b]
            ordered = accuracy[b * g : (b + 1) * g]
            shuffled = [self._shuffled_accuracy.accuracy(prompt, c) for c in rollouts.shuffled_completions[b * k : (b + 1) * k]]
            ok = sum(ordered) / g >= self.ratio * sum(shuffled) / k
            passed.append(ok)
            if ok:
                for i, acc in enumerate(ordered):
                    if acc > self.correct_threshold:
                        values[b * g + i] = self.bonus
        return values, {"temporal/pass_rate": sum(passed) / len(passed) if passed else math.nan}
