"""Reasoning accuracy Racc_R by problem type (METHOD.md, "PA-GRPO"), in [0, 1].

Two answer readers, picked by :data:`AnswerReader`:

``"video_r1"`` (the default) gives exactly the values of Video-R1's ``accuracy_reward``
(tulerfeng/Video-R1, ``src/r1-v/src/open_r1/grpo.py``), its edge cases included:

- the answer is :func:`~callbacks.rewards.parsing.video_r1_answer` of the completion (first
  complete lower-case ``<answer>`` block, stripped; ``""`` without one), and the ground truth is the
  same reading of the ``solution``: a solution without a complete block reads as ``""``, so against
  it an empty answer scores 1 on multiple choice and OCR;
- multiple choice: 1 when the two stripped strings are equal (case-sensitive: "b" and "B." score 0);
- numerical: 0 when exactly one side contains "." or ","; else both are read by
  :func:`video_r1_number` (commas deleted, then Python's ``float``, so "1,000" is 1000, "1e3",
  " 7", "nan" and "inf" parse) and compared after ``round(x, 2)`` (so NaN never matches);
- OCR: 1 - word error rate (:func:`word_error_rate`: whitespace-split words, case-sensitive,
  edit distance over ``max(1, reference words)``), clipped to [0, 1]; an empty reference gives 1
  only to an empty answer;
- free-form: mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measure from the ``rouge_score`` package with
  ``use_stemmer=True`` (lower-cased ``[a-z0-9]`` tokens, Porter stems of tokens over 3 characters;
  ROUGE-2 of a one-word text is 0, so an exact one-word answer scores 2/3, and text with no such
  tokens, e.g. Chinese, scores 0), clipped to [0, 1];
- regression: 1 - min(1, max(0, (|pred - gt| + 1e-9) / (|gt| + 1e-9))) on :func:`video_r1_number`
  values, so a ground truth of 0 always scores 0 (the exact answer included), and a NaN relative
  error (a "nan" answer, or "inf" against "inf") scores 1: ``max(0.0, nan)`` is 0.0;
- an unparsable number, any exception, and a problem type other than the five exact strings
  (e.g. "ocr") score 0.

Video-R1 scores one call with the problem type of its first sample; a call there holds the G
answers of one prompt (``per_device_train_batch_size 1``), so that equals scoring each sample by
its own prompt's type, which is what we do.

``"lenient"`` is p2r's tolerant reading, an explicit choice that is never the default: the answer
is :func:`~callbacks.rewards.parsing.lenient_answer` (last block, else the text after an unclosed
``<answer>``, else the WHOLE completion, so reasoning text outside a finished answer can score);
multiple choice compares the option letters :func:`~callbacks.rewards.parsing.parse_option_letter`
finds ("(b)", "The answer is B", an option's text); numerical and regression read the first
number in the text with :func:`~callbacks.rewards.parsing.parse_number` ("about 3.5 m", "three")
without the decimal-point rule; the metrics themselves (2-decimal equality, 1 - WER, ROUGE with
stemming, the regression formula) are Video-R1's. Its problem type is matched case-insensitively
and an unknown type raises ``ValueError``.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Callable, Literal

from callbacks.rewards.parsing import lenient_answer, parse_number, parse_option_letter, video_r1_answer

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
AnswerReader = Literal["video_r1", "lenient"]
ANSWER_READERS: tuple[str, ...] = ("video_r1", "lenient")


def video_r1_number(text: str) -> float | None:
    """Video-R1's ``normalize_number``: every comma deleted, then Python's ``float``; ``None`` when
    that fails.

    >>> video_r1_number("1,000.5"), video_r1_number(" 3. "), video_r1_number("3 m")
    (1000.5, 3.0, None)
    """
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _has_decimal_mark(text: str) -> bool:
    return "." in text or "," in text


def exact_match_accuracy(prediction: str, truth: str) -> float:
    """Multiple choice as Video-R1 scores it: 1 when the stripped strings are equal, else 0.

    >>> exact_match_accuracy(" B ", "B"), exact_match_accuracy("b", "B"), exact_match_accuracy("B.", "B")
    (1.0, 0.0, 0.0)
    """
    return 1.0 if prediction.strip() == truth.strip() else 0.0


def decimal_rule_accuracy(prediction: str, truth: str) -> float:
    """Numerical as Video-R1 scores it: 0 unless both or neither text holds "." or ","; then 1 when
    both read as numbers (:func:`video_r1_number`) equal after rounding to 2 decimals.

    >>> decimal_rule_accuracy("3.0", "3"), decimal_rule_accuracy("1000", "1,000"), decimal_rule_accuracy("3.004", "3.0")
    (0.0, 0.0, 1.0)
    """
    if _has_decimal_mark(truth) != _has_decimal_mark(prediction):
        return 0.0
    return rounded_equality(video_r1_number(prediction), video_r1_number(truth))


def rounded_equality(got: float | None, want: float | None) -> float:
    """1 when both numbers exist and are equal after Python's ``round(x, 2)``, else 0."""
    if got is None or want is None:
        return 0.0
    return 1.0 if round(want, 2) == round(got, 2) else 0.0


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two token sequences (substitution, insertion, deletion cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_token in enumerate(reference, start=1):
        current = [i]
        for j, hyp_token in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_token != hyp_token)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Video-R1's WER: word edit distance over ``max(1, reference words)``; words are split on
    whitespace and case-sensitive. May exceed 1; an empty reference gives the hypothesis' word count.

    >>> word_error_rate("the cat sat", "the cat sat down"), word_error_rate("", "two words")
    (0.3333333333333333, 2.0)
    """
    ref, hyp = reference.split(), hypothesis.split()
    return edit_distance(ref, hyp) / max(1, len(ref))


def ocr_accuracy(prediction: str, truth: str) -> float:
    """1 - word error rate, clipped to [0, 1].

    >>> ocr_accuracy("EXIT 12", "EXIT 12"), ocr_accuracy("EXIT", "EXIT 12"), ocr_accuracy("", "")
    (1.0, 0.5, 1.0)
    """
    return max(0.0, min(1.0, 1 - word_error_rate(truth, prediction)))


@cache
def _rouge_scorer() -> Any:
    # Imported on first use: rouge_score loads nltk, about 2 s, which no other reward needs.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def free_form_accuracy(prediction: str, truth: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measure (``rouge_score``, Porter stemming), clipped to [0, 1].

    >>> free_form_accuracy("Running dogs", "runs dog")  # both stem to "run dog"
    1.0
    >>> round(free_form_accuracy("cat", "cat"), 4)  # no bigram on either side: ROUGE-2 is 0
    0.6667
    """
    scores = _rouge_scorer().score(truth, prediction)
    mean = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3
    return max(0.0, min(1.0, mean))


def relative_accuracy(got: float | None, want: float | None) -> float:
    """Video-R1's regression score: 1 - min(1, max(0, (|got - want| + 1e-9) / (|want| + 1e-9))); 0 when
    either number is missing. The clip order is Video-R1's, so a NaN relative error scores 1.

    >>> round(relative_accuracy(7.5, 10.0), 6), relative_accuracy(0.0, 0.0), relative_accuracy(float("nan"), 10.0)
    (0.75, 0.0, 1.0)
    """
    if got is None or want is None:
        return 0.0
    relative_error = (abs(got - want) + 1e-9) / (abs(want) + 1e-9)
    return 1 - min(1.0, max(0.0, relative_error))


def regression_accuracy(prediction: str, truth: str) -> float:
    """Regression as Video-R1 scores it: :func:`relative_accuracy` of the :func:`video_r1_number` values.

    >>> round(regression_accuracy("1,250", "1000"), 6)
    0.75
    """
    return relative_accuracy(video_r1_number(prediction), video_r1_number(truth))


_VIDEO_R1_BY_TYPE: dict[str, Callable[[str, str], float]] = {
    "multiple choice": exact_match_accuracy,
    "numerical": decimal_rule_accuracy,
    "OCR": ocr_accuracy,
    "free-form": free_form_accuracy,
    "regression": regression_accuracy,
}


def video_r1_accuracy(completion: str, solution: str, problem_type: str) -> float:
    """Video-R1's ``accuracy_reward`` of one completion (see the module docstring); never raises.

    >>> video_r1_accuracy("<think>B or C</think><answer>B</answer>", "<answer>B</answer>", "multiple choice")
    1.0
    >>> video_r1_accuracy("<think>it is B</think><answer>B", "<answer>B</answer>", "multiple choice")
    0.0
    """
    try:
        score = _VIDEO_R1_BY_TYPE.get(problem_type)
        return score(video_r1_answer(completion), video_r1_answer(solution)) if score else 0.0
    except Exception:  # Video-R1 scores any failure 0
        return 0.0


def lenient_accuracy(completion: str, solution: str, problem_type: str, options: list[str] | None = None) -> float:
    """p2r's tolerant reading (see the module docstring), scored with Video-R1's metrics.

    >>> lenient_accuracy("The answer is (b).", "B", "multiple choice")
    1.0
    >>> lenient_accuracy("<think>so</think><answer>about 3.001 m", "<answer>3</answer>", "numerical")
    1.0
    """
    kind = problem_type.strip().lower()
    prediction, truth = lenient_answer(completion), lenient_answer(solution)
    if kind == "multiple choice":
        num_options = len(options) if options else None
        want = parse_option_letter(truth, num_options, options)
        return 1.0 if want is not None and parse_option_letter(prediction, num_options, options) == want else 0.0
    if kind == "numerical":
        return rounded_equality(parse_number(prediction), parse_number(truth))
    if kind == "ocr":
        return ocr_accuracy(prediction, truth)
    if kind == "free-form":
        return free_form_accuracy(prediction, truth)
    if kind == "regression":
        return relative_accuracy(parse_number(prediction), parse_number(truth))
    raise ValueError(f"unknown problem_type {problem_type!r}, expected one of {PROBLEM_TYPES}")


def reasoning_accuracy(
    completion: str, solution: str, problem_type: str, options: list[str] | None = None,
    answer_reader: AnswerReader = "video_r1",
) -> float:
    """Racc_R of one completion against the ground-truth ``solution`` (a record's ``solution`` field,
    ``<answer>X</answer>``), by ``answer_reader``: Video-R1's exact reward, or the lenient reading.

    ``options`` is read by the lenient reader only.

    >>> reasoning_accuracy("<observation>x</observation><think>y</think><answer>B</answer>", "<answer>B</answer>", "multiple choice")
    1.0
    >>> reasoning_accuracy("I think it is B.", "<answer>B</answer>", "multiple choice", answer_reader="lenient")
    1.0
    """
    if answer_reader == "video_r1":
        return video_r1_accuracy(completion, solution, problem_type)
    if answer_reader == "lenient":
        return lenient_accuracy(completion, solution, problem_type, options)
    raise ValueError(f"unknown answer_reader {answer_reader!r}, expected one of {ANSWER_READERS}")
