"""VideoMMMU as lmms-eval 0.7.3 runs it: three tasks, one per track (``video_mmmu_perception``,
``video_mmmu_comprehension``, ``video_mmmu_adaptation``; dataset ``lmms-eval/VideoMMMU``,
configs ``Perception``, ``Comprehension``, ``Adaptation``). lmms-eval prints one figure per track
and none for the group.

Rows: ``id`` (``<split>_<Subject>_<n>``; the video is ``<id>.mp4`` in the subject's discipline
folder), ``question``, ``options`` (a list), ``answer`` (a letter, or the open answer),
``question_type`` (``multiple-choice`` or open).

- Prompt, Perception and Comprehension: the question, the lettered options ("A. ..." unless every
  option already starts with its "X."), then "\\nPlease ignore the Quiz question in last frame of
  the video.". Adaptation, multiple choice: "You should watch and learn the video content. Then
  apply what you learned to answer the following multi-choice question. The image for this
  question is at the end of the video.\\n", the question and the options; open questions the same
  with "open-ended question" and no options. Greedy, 1,024 new tokens.
- Multiple choice: :func:`~p2r.evaluation.lmms_eval.common.extract_mcq_answer` over the option
  letters ("No Answer Found." when it reads none), exact match with ``answer``.
- Other questions: MMMU's open-answer reader (the key sub-responses after phrases such as "is ",
  "so ", "answer ", the numbers in them, normalised: numbers rounded to 2 places, text
  lower-cased) and correct when a normalised answer string is inside a normalised prediction
  string, or a predicted number equals the answer's. An empty output is an "API Error" and is left
  out of the track's figure altogether.
- Figure per track (``mmmu_acc``, a fraction rounded to 5 places): per subject accuracy, then the
  question-weighted mean over subjects (subjects in order of first appearance).
"""

from __future__ import annotations

import re
from typing import Any

from callbacks.evaluation import Scored
from p2r.evaluation.lmms_eval.common import extract_mcq_answer, option_letters

TRACKS = {"Perception": "video_mmmu_perception", "Comprehension": "video_mmmu_comprehension",
          "Adaptation": "video_mmmu_adaptation"}
PRE_PROMPT = "You should watch and learn the video content. Then apply what you learned to "
MCQ_PROMPT = "answer the following multi-choice question. The image for this question is at the end of the video.\n"
OPEN_PROMPT = "answer the following open-ended question. The image for this question is at the end of the video.\n"
IGNORE_QUIZ = "\nPlease ignore the Quiz question in last frame of the video."
MAX_NEW_TOKENS = 1024
NO_ANSWER = "No Answer Found."
API_ERROR = "API Error"
CACHE_DIR = "video_mmmu"

SUBJECT_FOLDERS = {
    "Art": ("Art", "Art_Theory", "Design", "Music"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Humanities": ("History", "Literature", "Sociology", "Psychology"),
    "Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                    "Energy_and_Power", "Materials", "Mechanical_Engineering"),
    "Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                 "Public_Health"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
}
DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
# Phrases after which an open answer usually follows; "=" also counts in the last sub-response.
KEY_PHRASES = (
    "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", "are ", "in total ", "total ",
    "identify ", "recognize ", "calculated as ", "counted as ", "measured as ", "observed as ", "concluded as ",
    "found to be ", "equals ", "determined to be ", "number of ", "value is ", "adds up to ", "have ", "has ",
)
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def format_options(options: list[str]) -> str:
    """Options one per line, "A. text", unless every option already starts with its own "X."."""
    letters = option_letters(len(options))
    if all(option.startswith(f"{letter}.") for option, letter in zip(options, letters)):
        return "\n".join(options)
    return "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))


def prompt(row: dict[str, Any], track: str) -> str:
    """The user text lmms-eval sends for a question of ``track``."""
    if track != "Adaptation":
        return f"{row['question']}\n{format_options(row['options'])}{IGNORE_QUIZ}"
    if row["question_type"] == "multiple-choice":
        return f"{PRE_PROMPT}{MCQ_PROMPT}{row['question']}\n{format_options(row['options'])}"
    return f"{PRE_PROMPT}{OPEN_PROMPT}{row['question']}"


def subject(row_id: str) -> str:
    """The subject in an id ``<split>_<Subject>_<n>``; raises on another shape (lmms-eval does too).

    >>> subject("validation_Art_Theory_12")
    'Art_Theory'
    """
    head = row_id.split("_")[0]
    match = re.search(rf"^{head}_(.+?)_\d+$", row_id)
    if not match:
        raise ValueError(f"VideoMMMU id {row_id!r} is not <split>_<Subject>_<number>")
    return match.group(1)


def normalize(text: str) -> list[str | float]:
    """MMMU's normal form: a number (commas dropped) rounded to 2 places, else the lower-cased text;
    a single character is padded to " x" and "x " so that it never matches inside a word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers(text: str) -> list[str]:
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def _key_responses(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    # MMMU splits at ". " before a capital too, but the text is lower-cased by then: lines only.
    parts = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for index, part in enumerate(parts):
        phrases = KEY_PHRASES + (("=",) if index == len(parts) - 1 else ())
        shortest = None
        for phrase in phrases:
            if phrase not in part:
                continue
            tail = part.split(phrase)[-1].strip()
            if not shortest or len(tail) < len(shortest):  # an empty tail is replaced by the next one found
                shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [text]


def parse_open(response: str) -> list[str | float] | str:
    """The normalised candidate answers of an open response; ``"API Error"`` for an empty one."""
    if response in ("", API_ERROR):
        return API_ERROR
    keys = _key_responses(response)
    candidates = list(keys)
    for key in keys:
        candidates += _numbers(key)
    normalised = []
    for candidate in candidates:
        normalised += normalize(candidate)
    return list(dict.fromkeys(normalised))


def open_correct(answer: str | list[str], predictions: list[str | float]) -> bool:
    """A normalised answer string inside a predicted string, or a predicted number among the answers."""
    answers: list[str | float] = []
    for one in answer if isinstance(answer, list) else [answer]:
        answers += normalize(one)
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(a, str) and a in prediction for a in answers):
                return True
        elif prediction in answers:
            return True
    return False


def score(row: dict[str, Any], output: str, track: str) -> Scored:
    """One output scored; ``details`` carry what the track figure needs (subject, API Error)."""
    kind = row.get("question_type", "None")
    answer = row["answer"]
    if kind == "multiple-choice":
        parsed: Any = extract_mcq_answer(output, option_letters(len(row["options"]))) or NO_ANSWER
    else:
        parsed = parse_open(output)
    if parsed == API_ERROR:
        correct = False
    elif kind in ("multiple-choice", "perception"):
        correct = parsed in answer if isinstance(answer, list) else parsed == answer
    else:
        correct = open_correct(answer, parsed)
    details = {"track": track, "subject": subject(str(row["id"])), "api_error": parsed == API_ERROR}
    # lmms-eval's aggregation drops "API Error" lines (an empty open answer, or that literal text):
    # no score, so they are counted as left out, not as wrong answers.
    return Scored(parsed, None if parsed == API_ERROR else 1.0 if correct else 0.0, "accuracy", answer, details)


def track_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One track's ``mmmu_acc`` and its per-subject and per-domain accuracies (fractions, 5 places)."""
    subjects: dict[str, list[float]] = {}
    for row in rows:
        if not row["details"]["api_error"]:
            subjects.setdefault(row["details"]["subject"], []).append(float(row["score"]))
    accuracy = {name: sum(1 for s in scores if s == 1.0) / len(scores) for name, scores in subjects.items()}

    def weighted(names: list[str]) -> float:
        total, count = 0.0, 0
        for name in names:
            total += accuracy[name] * len(subjects[name])
            count += len(subjects[name])
        return total / count if count else 0

    categories: dict[str, float] = {}
    for domain, members in DOMAINS.items():
        present = [name for name in members if name in accuracy]
        categories[f"Overall-{domain}"] = round(weighted(present), 5)
        categories.update({name: round(accuracy[name], 5) for name in present})
    return {"figure": round(weighted(list(accuracy)), 5), "categories": categories,
            "n_api_error": sum(1 for row in rows if row["details"]["api_error"])}


def video_path(row: dict[str, Any]) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``), as its ``doc_to_visual`` finds it."""
    name = subject(str(row["id"]))
    for folder, names in SUBJECT_FOLDERS.items():
        if name in names:
            return f"{CACHE_DIR}/{folder}/{row['id']}.mp4"
    raise ValueError(f"VideoMMMU row {row['id']!r}: subject {name!r} is in none of lmms-eval's folders")
