"""Rules that lmms-eval 0.7.3 shares between the video tasks p2r reproduces.

- :func:`strip_reasoning_tags`: what lmms-eval's evaluator does to every output before a task
  sees it. Its command line defaults ``--reasoning_tags`` to ``<think>…</think>`` and
  ``<analysis>…</analysis>``: each complete block is cut out (first opening tag to the next
  closing tag, repeatedly); if a closing tag is then left without any opening tag (a chat
  template that pre-fills ``<think>``), only the text after the LAST closing tag is kept; the
  result is stripped of surrounding whitespace. Matching is case-sensitive and an unclosed
  opening tag is left as it is. ``<observation>`` is not a reasoning tag there: it stays.
- :func:`extract_mcq_answer`: lmms-eval's shared multiple-choice reader
  (``tasks/_task_utils/mcq_extract.py``), used by VideoMMMU and Video-MME. Only the choice
  letters as given (capitals) are looked for; each way a letter can appear has a priority, and
  the highest-priority way wins, the LAST position breaking ties within a way.

Both are written from lmms-eval's rules and checked against hand-worked cases
(``tests/evaluation/test_lmms_eval.py``); lmms-eval is never imported.
"""

from __future__ import annotations

from typing import Any, Callable

# A judge: (chat messages, request settings) -> the reply text, or None when there is no reply.
Ask = Callable[[list[dict[str, str]], dict[str, Any]], "str | None"]

DEFAULT_REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning_tags(text: str, tag_pairs: tuple[tuple[str, str], ...] = DEFAULT_REASONING_TAGS) -> str:
    """``text`` with its reasoning blocks removed, as lmms-eval's evaluator removes them.

    >>> strip_reasoning_tags("<think>it is red</think> B")
    'B'
    >>> strip_reasoning_tags("so it is red</think>B")
    'B'
    >>> strip_reasoning_tags("<observation>a cat</observation><think>so</think><answer>B</answer>")
    '<observation>a cat</observation><answer>B</answer>'
    """
    for opening, closing in tag_pairs:
        while opening in text and closing in text:
            start = text.find(opening)
            end = text.find(closing, start)
            if end == -1:  # every closing tag comes before the first opening one
                break
            text = text[:start] + text[end + len(closing):]
        if closing in text and opening not in text:
            text = text.rpartition(closing)[2]
    return text.strip()


# Answer phrases after which the first occurrence of a choice letter counts (lmms-eval's list,
# searched in the lower-cased text, the letter in the original text).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
DEFAULT_CHOICES = ("A", "B", "C", "D", "E", "F", "G", "H")
# Priority of each way a letter can appear (higher wins).
_START, _END, _PHRASE, _PARENTHESES, _PERIOD, _COLON, _RIGHT_PAREN, _SPACE, _ANYWHERE = 10, 9, 7, 6, 5, 4, 3, 2, 0
# Characters peeled off both ends, one character kind after the other, in this order.
_PEELED = (",", ".", "!", "?", ";", ":", "'", '"')


def extract_mcq_answer(response: str, choices: list[str] | tuple[str, ...] | None = None) -> str:
    """The choice letter lmms-eval reads from ``response``; ``""`` when it finds none.

    Ways, by priority: the text starts with the letter (not followed by a letter) 10; ends with it
    (not preceded by a letter) 9; the letter after an answer phrase ("the answer is ...") 7;
    ``(X)`` 6; ``X.`` 5; ``X:`` 4; ``X)`` 3; ``X`` followed by a space 2; and only when nothing
    else matched, the letter anywhere 0. Lower-case letters never count.

    >>> extract_mcq_answer("The correct answer is (B).")
    'B'
    >>> extract_mcq_answer("b") , extract_mcq_answer("a dog")
    ('', '')
    >>> extract_mcq_answer("A dog runs. So C.")
    'A'
    """
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list(DEFAULT_CHOICES)
    core = response.strip()
    for char in _PEELED:
        core = core.strip(char)
    padded = f" {core} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for letter in letters:
        for pattern, priority in ((f"({letter})", _PARENTHESES), (f"{letter}.", _PERIOD), (f"{letter}:", _COLON),
                                  (f"{letter})", _RIGHT_PAREN), (f"{letter} ", _SPACE)):
            if pattern in padded:
                found.append((priority, padded.rfind(pattern), letter))
    lowered = padded.lower()
    for phrase in ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at == -1:
            continue
        for letter in letters:
            position = padded.find(letter, at + len(phrase))
            if position != -1:
                found.append((_PHRASE, position, letter))
    bare = padded.strip()
    for letter in letters:
        if bare.startswith(letter) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((_START, 0, letter))
        if bare.endswith(letter) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((_END, len(padded) - 1, letter))
    if not found:
        found = [(_ANYWHERE, padded.rfind(letter), letter) for letter in letters if letter in padded]
    if not found:
        return ""
    # Highest priority, then the latest position; equal keys keep the order they were found in.
    best = found[0]
    for candidate in found[1:]:
        if candidate[:2] > best[:2]:
            best = candidate
    return best[2]


def option_letters(count: int) -> list[str]:
    """The first ``count`` capital letters: the choices of a question with ``count`` options."""
    return [chr(ord("A") + i) for i in range(count)]
