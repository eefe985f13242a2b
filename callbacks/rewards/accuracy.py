"""Reasoning accuracy Racc_R by problem type (METHOD.md, "PA-GRPO"), each in [0, 1].

All scores read the text inside the model's ``<answer>`` (see ``parsing.extract_answer``); the
ground truth may be given bare or as ``<answer>...</answer>`` (the records' ``solution``).
Choices where METHOD.md is silent:

- numerical: both sides are rounded to 2 decimals with Python's ``round`` and compared, as
  Video-R1 does; an unreadable number on either side scores 0;
- OCR: words are whitespace-separated and case-sensitive (OCR asks for the exact text); an empty
  reference scores 1 only against an empty prediction;
- free-form: tokens are the lower-cased ``\\w+`` words; a ROUGE order that neither side can form
  (ROUGE-2 of one-word texts) is left out of the mean instead of counting as 0, so an exact
  one-word answer scores 1 (Video-R1's rouge_score gives it 2/3);
- regression: when the ground truth is 0 the relative error is undefined; the absolute error is
  used instead, 1 - min(1, |pred|), so the score stays smooth around 0.
"""

from __future__ import annotations

import re
from collections import Counter

from callbacks.rewards.parsing import extract_answer, parse_number, parse_option_letter

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


def multiple_choice_accuracy(prediction: str, truth: str, options: list[str] | None = None) -> float:
    """1 when the predicted option letter equals the true one, else 0.

    >>> multiple_choice_accuracy("The answer is (b).", "B")
    1.0
    >>> multiple_choice_accuracy("red circle", "A", ["A. red circle", "B. blue square"])
    1.0
    """
    num_options = len(options) if options else None
    want = parse_option_letter(truth, num_options, options)
    got = parse_option_letter(prediction, num_options, options)
    return 1.0 if want is not None and got == want else 0.0


def numerical_accuracy(prediction: str, truth: str) -> float:
    """1 when both numbers agree at 2 decimals, else 0.

    >>> numerical_accuracy("about 3.001 m", "3")
    1.0
    >>> numerical_accuracy("3.1", "3")
    0.0
    """
    got, want = parse_number(prediction), parse_number(truth)
    if got is None or want is None:
        return 0.0
    return 1.0 if round(got, 2) == round(want, 2) else 0.0


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
    """Word-level edit distance divided by the number of reference words (may exceed 1).

    >>> word_error_rate("the cat sat", "the cat sat down")
    0.3333333333333333
    """
    ref, hyp = reference.split(), hypothesis.split()
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)


def ocr_accuracy(prediction: str, truth: str) -> float:
    """1 - word error rate, clipped to [0, 1].

    >>> ocr_accuracy("EXIT 12", "EXIT 12")
    1.0
    >>> ocr_accuracy("EXIT", "EXIT 12")
    0.5
    """
    return min(1.0, max(0.0, 1.0 - word_error_rate(truth, prediction)))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _f1(overlap: float, n_prediction: int, n_reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_prediction, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_n_f1(prediction: list[str], reference: list[str], n: int) -> float | None:
    """ROUGE-N F1 over clipped n-gram counts; ``None`` when neither side has an n-gram."""
    pred = Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    if not pred and not ref:
        return None
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: list[str], reference: list[str]) -> float | None:
    """ROUGE-L F1 (LCS-based); ``None`` when both sides are empty."""
    if not prediction and not reference:
        return None
    return _f1(longest_common_subsequence(prediction, reference), len(prediction), len(reference))


def free_form_accuracy(prediction: str, truth: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 on lower-cased words (undefined orders left out).

    >>> free_form_accuracy("The dog runs", "the dog runs")
    1.0
    >>> round(free_form_accuracy("a dog runs fast", "the dog runs"), 4)
    0.5143
    """
    pred, ref = _words(prediction), _words(truth)
    scores = [s for s in (rouge_n_f1(pred, ref, 1), rouge_n_f1(pred, ref, 2), rouge_l_f1(pred, ref)) if s is not None]
    return sum(scores) / len(scores) if scores else 1.0


def regression_accuracy(prediction: str, truth: str) -> float:
    """1 - min(1, |pred - gt| / |gt|); with gt = 0, 1 - min(1, |pred|); 0 when unreadable.

    >>> regression_accuracy("7.5", "10")
    0.75
    >>> regression_accuracy("0.25", "0")
    0.75
    """
    got, want = parse_number(prediction), parse_number(truth)
    if got is None or want is None:
        return 0.0
    error = abs(got - want) / abs(want) if want != 0 else abs(got)
    return 1.0 - min(1.0, error)


_BY_TYPE = {
    "numerical": numerical_accuracy,
    "ocr": ocr_accuracy,
    "free-form": free_form_accuracy,
    "regression": regression_accuracy,
}


def reasoning_accuracy(completion: str, answer: str, problem_type: str, options: list[str] | None = None) -> float:
    """Racc_R of one completion: its ``<answer>`` text scored against ``answer`` by ``problem_type``.

    ``problem_type`` is matched case-insensitively; an unknown type is a data error and raises
    ``ValueError`` (the completion text itself never makes this raise).

    >>> reasoning_accuracy("<observation>x</observation><think>y</think><answer>B</answer>", "<answer>B</answer>", "multiple choice")
    1.0
    """
    kind = problem_type.strip().lower()
    prediction, truth = extract_answer(completion), extract_answer(answer)
    if kind == "multiple choice":
        return multiple_choice_accuracy(prediction, truth, options)
    if kind not in _BY_TYPE:
        raise ValueError(f"unknown problem_type {problem_type!r}, expected one of {PROBLEM_TYPES}")
    return _BY_TYPE[kind](prediction, truth)
