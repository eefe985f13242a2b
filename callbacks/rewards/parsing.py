"""Read a model's answer text: the ``<answer>`` block, an option letter, a number.

Each reading rule has exactly one home, here (``p2r`` imports them; ``callbacks`` never imports
``p2r``):

- :func:`video_r1_answer`: Video-R1's ``extract_answer`` (``src/r1-v/src/open_r1/grpo.py`` and
  ``src/eval_bench.py``): the FIRST complete ``<answer>...</answer>``, tags in lower case, its
  inner text stripped; ``""`` when there is no complete block. The default reasoning reward reads
  both the completion and the ground-truth ``solution`` this way.
- :func:`eval_bench_answer`: Video-R1's evaluation reading (``src/eval_bench.py``): that block, else
  the whole output.
- :func:`solution_answer`: the ground truth a record's ``solution`` holds: Video-R1's block when
  there is one, else the whole solution (a record may store a bare answer).
- :func:`lenient_answer`: p2r's tolerant reader (the LAST block, any tag case; else the text after
  an unclosed ``<answer>``; else the whole text), used by the ``lenient`` reasoning reward and
  p2r's own evaluation reading. It credits text outside a finished answer block, so it is never the
  training default.
- :func:`parse_option_letter` and :func:`parse_number`: the lenient readers of a letter and a number
  inside answer text.

Every function here accepts any string and never raises; a text it cannot read gives ``None``
or ``""``, which the accuracy rewards score as wrong.
"""

from __future__ import annotations

import math
import re

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Video-R1's pattern, searched with DOTALL and no IGNORECASE: the lazy group with \s* on both
# sides ends at the first "</answer>" after the first "<answer>" that has one.
_VIDEO_R1_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def extract_tag(text: str, tag: str) -> str | None:
    """Inner text of the LAST complete ``<tag>...</tag>`` block, stripped; ``None`` if there is none.

    >>> extract_tag("<think> a </think><think> b </think>", "think")
    'b'
    """
    blocks = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL | re.IGNORECASE)
    return blocks[-1].strip() if blocks else None


def video_r1_answer(text: str) -> str:
    """Video-R1's answer: the inner text of the FIRST complete ``<answer>...</answer>``, stripped;
    ``""`` when there is none (no tag, an unclosed tag, or tags in another case).

    A nested opening tag stays in the answer, since the block starts at the first ``<answer>``.

    >>> video_r1_answer("<think>3 red, 2 blue</think> <answer> 5 </answer>")
    '5'
    >>> video_r1_answer("<answer>A</answer> no, <answer>D</answer>")
    'A'
    >>> video_r1_answer("<think>so</think><answer>C"), video_r1_answer("B"), video_r1_answer("<Answer>B</Answer>")
    ('', '', '')
    >>> video_r1_answer("<answer>a <answer>b</answer>")
    'a <answer>b'
    """
    match = _VIDEO_R1_ANSWER.search(text)
    return match.group(1).strip() if match else ""


def eval_bench_answer(output: str) -> str:
    """Video-R1's ``src/eval_bench.py`` reading of a model output: :func:`video_r1_answer` (the
    training reward's reading), or the whole output when that is empty. The training reward has no
    such fallback.

    >>> eval_bench_answer("<think>so</think><answer> B </answer>"), eval_bench_answer("B")
    ('B', 'B')
    >>> eval_bench_answer("<answer></answer>x"), eval_bench_answer("<answer>C")
    ('<answer></answer>x', '<answer>C')
    """
    return video_r1_answer(output) or output


def solution_answer(solution: str) -> str:
    """The ground-truth answer a record's ``solution`` holds: :func:`video_r1_answer` of it when it
    has a complete block, else the whole solution stripped (a bare answer such as ``"B"``).

    >>> solution_answer("<answer> B </answer>"), solution_answer(" B "), solution_answer("<answer>B")
    ('B', 'B', '<answer>B')
    """
    match = _VIDEO_R1_ANSWER.search(solution)
    return match.group(1).strip() if match else solution.strip()


def lenient_answer(text: str) -> str:
    """The tolerant reader: the text inside the LAST ``<answer>...</answer>`` (any tag case),
    stripped; when the text was cut inside its final answer (``<answer>B`` with no closing tag), the
    text after the last ``<answer>``; else the whole text stripped.

    >>> lenient_answer("<answer>A</answer> no, <ANSWER> D </ANSWER>")
    'D'
    >>> lenient_answer("<think>so</think><answer>C"), lenient_answer(" The answer is B ")
    ('C', 'The answer is B')
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    opens = list(_ANSWER_OPEN.finditer(text))
    if opens:
        return text[opens[-1].end():].strip()
    return text.strip()


# --- option letters ----------------------------------------------------------------------------
# A letter alone, possibly wrapped: "B", "(b)", "[C]", "**D**", "B.", "b)".
_ALONE = re.compile(r"^[\s(\[{*_\"'`]*([A-Za-z])[\s)\]}*_\"'`.:;,!]*$")
# A leading letter with a separator, then text: "B. text", "B: text", "B) text", "(B) text".
_LEADING = re.compile(r"^[\s*_]*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.:)])(?=\s|$|\*)")
# "answer is B", "answer: b", "answer would be (C)", "answer is option D".
_ANSWER_PHRASE = re.compile(
    r"\banswer\b[\s*_]*(?:is|would be|should be|must be|will be|=|:|-)?[\s*_]*(?:option|choice|letter)?"
    r"[\s*_]*(\(|\[)?([A-Za-z])(?(1)[)\]])(?![A-Za-z0-9'])",
    re.IGNORECASE,
)
# "Option C", "choice (b)", "option: D".
_OPTION_PHRASE = re.compile(
    r"\b(?:option|choice)\b[\s*_]*:?[\s*_]*(\(|\[)?([A-Za-z])(?(1)[)\]])(?![A-Za-z0-9'])",
    re.IGNORECASE,
)
# A capital letter standing alone as a word ("B is correct"); not "I'm", "A's", "U.S.".
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])(?!\.[A-Za-z])")
_WORD_AFTER = re.compile(r"\s+[a-z]")


def _allowed(num_options: int | None) -> str:
    if num_options is None or num_options <= 0:
        return OPTION_LETTERS
    return OPTION_LETTERS[: min(num_options, len(OPTION_LETTERS))]


def _plain_letter_ok(text: str, match: re.Match, group: int, bracketed: bool) -> bool:
    """A lower-case letter counts only when it cannot be a word: wrapped in brackets, or followed
    by nothing / punctuation ("answer: b", "answer is b."), never by another word ("answer is a car")."""
    letter = match.group(group)
    if letter.isupper() or bracketed:
        return True
    rest = text[match.end(group):]
    return not _WORD_AFTER.match(rest)


def _normalise_option_text(text: str) -> str:
    words = re.findall(r"\w+", text.lower())
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def _match_option_text(text: str, options: list[str], allowed: str) -> str | None:
    """The letter whose option text equals the answer text (case, punctuation, a leading article
    and an existing "A." prefix ignored), when exactly one option matches."""
    target = _normalise_option_text(text)
    if not target:
        return None
    hits = []
    for letter, option in zip(allowed, options):
        body = re.sub(r"^\s*[(\[]?[A-Za-z][.):\]]\s+", "", option)
        if _normalise_option_text(body) == target or _normalise_option_text(option) == target:
            hits.append(letter)
    return hits[0] if len(hits) == 1 else None


def parse_option_letter(text: str, num_options: int | None = None, options: list[str] | None = None) -> str | None:
    """The option letter a model's answer names, upper-case; ``None`` when it names none or is ambiguous.

    Tiers, first hit wins (letters beyond ``num_options`` never count):

    1. the whole text is one letter, maybe wrapped: ``"B"``, ``"b"``, ``"(B)"``, ``"**C**"``, ``"B."``;
    2. the text opens with a letter and a separator: ``"B. red"``, ``"B: red"``, ``"B) red"``, ``"(B) red"``;
    3. an answer phrase: ``"The answer is B"``, ``"answer: b"``, ``"answer is option (C)"``; the LAST
       one wins, since a model that corrects itself ends with its final choice;
    4. an option phrase: ``"Option C"``, ``"choice (d)"``; all of them must name the same letter;
    5. the answer text equals exactly one option's text (needs ``options``): ``"red circle"``;
    6. capital letters standing alone as words (``"I think B fits"``); all must agree, so listing
       every letter (``"A B C D"``) gets ``None`` rather than a lucky hit;
    7. last resort: a text opening with the article-like ``"A "`` (``"A red circle moves"``) gives ``A``.

    In tiers 3-4 a lower-case letter counts only when it cannot be a word (``"answer: b"``, not
    ``"the answer is a car"``). In tier 6 the capitals ``A`` and ``I`` followed by a lower-case word
    are read as the article and the pronoun and skipped, which is why ``"A red circle moves"``
    reaches tier 7 only when nothing else in the text names an option.

    >>> parse_option_letter("(B) The ball")
    'B'
    >>> parse_option_letter("The answer is c.")
    'C'
    >>> parse_option_letter("A red circle moves left, so the answer is D")
    'D'
    >>> parse_option_letter("E", num_options=4) is None
    True
    """
    text = text.strip()
    if not text:
        return None
    allowed = _allowed(num_options)

    match = _ALONE.match(text)
    if match:
        letter = match.group(1).upper()
        return letter if letter in allowed else None

    match = _LEADING.match(text)
    if match:
        letter = next(g for g in match.groups() if g).upper()
        if letter in allowed:
            return letter

    found = [
        m.group(2).upper() for m in _ANSWER_PHRASE.finditer(text)
        if _plain_letter_ok(text, m, 2, m.group(1) is not None) and m.group(2).upper() in allowed
    ]
    if found:
        return found[-1]

    found = [
        m.group(2).upper() for m in _OPTION_PHRASE.finditer(text)
        if _plain_letter_ok(text, m, 2, m.group(1) is not None) and m.group(2).upper() in allowed
    ]
    if found:
        return found[0] if len(set(found)) == 1 else None

    if options:
        letter = _match_option_text(text, options, allowed)
        if letter:
            return letter

    found = []
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter in "AI" and _WORD_AFTER.match(text[m.end():]):
            continue
        if letter in allowed:
            found.append(letter)
    if found:
        return found[0] if len(set(found)) == 1 else None

    if text.startswith("A ") and "A" in allowed:
        return "A"
    return None


# --- numbers -----------------------------------------------------------------------------------
_DIGITS = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-+\u2212]))?(?<![\d.,])"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d*)?|(?P<bare>\.\d+))"
    r"(?P<exp>[eE][-+]?\d+)?"
)
_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_WORD = r"\b(?:%s)\b" % "|".join((*_UNITS, *_TENS, "hundred"))
# A run of number words joined by spaces, hyphens or "and": "two hundred and five", "twenty-one".
_WORD_RUN = re.compile(rf"{_WORD}(?:(?:\s+and\s+|\s+|-){_WORD})*", re.IGNORECASE)


def _words_value(run: str) -> float:
    """Value of the longest prefix of a run of number words that reads as one number.

    "two hundred and five" -> 205, "twenty-one" -> 21, "one two" -> 1 (two numbers: the first).
    """
    hundreds, part, state = 0, 0, "start"
    for word in re.split(r"[\s-]+", run.lower()):
        if word == "and":
            continue
        if word == "hundred":
            if state == "start":
                hundreds, state = 100, "hundred"
            elif state in ("unit", "tens") and hundreds == 0:
                hundreds, part, state = part * 100, 0, "hundred"
            else:
                break
        elif word in _TENS:
            if state not in ("start", "hundred"):
                break
            part, state = part + _TENS[word], "tens"
        else:
            value = _UNITS[word]
            if state in ("start", "hundred"):
                part, state = part + value, "unit"
            elif state == "tens" and 1 <= value <= 9:
                part, state = part + value, "unit"
            else:
                break
    return float(hundreds + part)


def _digits_value(match: re.Match) -> float | None:
    integer = (match.group("int") or "0").replace(",", "")
    frac = match.group("frac") or match.group("bare") or ""
    text = integer + (frac if frac != "." else "") + (match.group("exp") or "")
    value = float(text)
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """The first number in ``text``: digits or number words, whichever comes first; ``None`` if none.

    Reads signs ("-3", "\u22123"), decimals ("2.5", ".5", "3."), thousands commas ("1,234"; a comma
    not followed by exactly three digits ends the number, so "3,4" reads 3), exponents ("1e3")
    and number words from zero to the hundreds ("twenty-one", "two hundred and five"; "a hundred"
    reads 100 from "hundred"). Fractions ("3/4") read as their numerator: they are rare in Video-R1
    answers and "12/05" is as likely a date. A sign counts only when it does not follow a word
    or a bracket ("frames 3-4" reads 3, not -4). Non-finite values ("1e999") give ``None``.

    >>> parse_number("About 1,250.5 metres")
    1250.5
    >>> parse_number("There are twenty-one cars, not 20")
    21.0
    >>> parse_number("none") is None
    True
    """
    digit_match = _DIGITS.search(text)
    word_match = _WORD_RUN.search(text)
    if word_match and (digit_match is None or word_match.start() < digit_match.start()):
        return _words_value(word_match.group(0))
    if digit_match:
        return _digits_value(digit_match)
    return None


# --- what a reasoning trace concludes (the think-answer mismatch analysis) ----------------------
# "B is correct", "(C) is the right one", "D seems the best": a letter followed by a verdict.
_LETTER_VERDICT = re.compile(
    r"(?<![A-Za-z0-9'])[(\[]?([A-Z])[)\]]?\s+(?:is|seems|appears|would be|must be)\s+(?:to be\s+)?(?:the\s+)?"
    r"(?:correct|right|best|most\b|answer)"
)
# A capital letter in brackets: "(B)", "[C]".
_BRACKETED = re.compile(r"[(\[]([A-Z])[)\]]")


def last_committed_letter(text: str, num_options: int | None = None) -> str | None:
    """The option letter a reasoning text finally commits to, upper-case; ``None`` when it commits to none.

    Two tiers, and within a tier the match that ENDS LAST in the text wins (a trace that weighs
    options ends with its choice):

    1. explicit commitments: an answer phrase (``"the answer is B"``, ``"answer: (c)"``, read as
       :func:`parse_option_letter` reads them) or a letter with a verdict (``"B is correct"``,
       ``"(C) seems the best"``);
    2. mentions: an option phrase (``"option B"``, ``"choice (d)"``) or a capital in brackets
       (``"(B)"``).

    A bare capital (``"A man walks"``) and an option's text are never read: in a reasoning trace
    they are too often articles, enumerations or descriptions. Letters beyond ``num_options``
    never count.

    >>> last_committed_letter("Option A is red, option C is blue. The ball is blue, so the answer is C. Not (A).")
    'C'
    >>> last_committed_letter("(A) red and (B) blue: the ball looks blue")
    'B'
    >>> last_committed_letter("A man walks to the left.") is None
    True
    """
    allowed = _allowed(num_options)
    tiers: list[list[tuple[int, str]]] = [[], []]
    for m in _ANSWER_PHRASE.finditer(text):
        if _plain_letter_ok(text, m, 2, m.group(1) is not None):
            tiers[0].append((m.end(2), m.group(2).upper()))
    tiers[0] += [(m.end(1), m.group(1)) for m in _LETTER_VERDICT.finditer(text)]
    for m in _OPTION_PHRASE.finditer(text):
        if _plain_letter_ok(text, m, 2, m.group(1) is not None):
            tiers[1].append((m.end(2), m.group(2).upper()))
    tiers[1] += [(m.end(1), m.group(1)) for m in _BRACKETED.finditer(text)]
    for found in tiers:
        found = [(end, letter) for end, letter in found if letter in allowed]
        if found:
            return max(found)[1]
    return None


def last_number(text: str) -> float | None:
    """The last number in ``text`` (digits or a run of number words, as :func:`parse_number` reads
    them), by where it ends; the word ``one`` alone is skipped (it is mostly a pronoun: "the red
    one"). ``None`` if there is none.

    >>> last_number("3 chairs and 2 tables, so 5 pieces of furniture")
    5.0
    >>> last_number("There are twenty-one cars; the red one is first")
    21.0
    """
    found: list[tuple[int, float]] = []
    for m in _DIGITS.finditer(text):
        value = _digits_value(m)
        if value is not None:
            found.append((m.end(), value))
    for m in _WORD_RUN.finditer(text):
        if m.group(0).lower() != "one":
            found.append((m.end(), _words_value(m.group(0))))
    return max(found)[1] if found else None
