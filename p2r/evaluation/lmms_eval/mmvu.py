"""MMVU as lmms-eval 0.7.3 runs it (task ``mmvu_val``, dataset ``lmms-eval/MMVU``, validation split:
multiple-choice and open questions alike; the paper's MMVU figure is another protocol's).

Rows: ``id``, ``question``, ``choices`` (a mapping ``A``..``E`` to option texts), ``answer`` (a
letter, or the open answer), ``question_type`` (``multiple-choice`` or open), ``video_path``
(``<discipline>/<file>`` under lmms-eval's ``mmvu`` cache folder; the discipline is the category).

- Prompt: lmms-eval's fixed text, "Question:" + question, the five options as "A: ...", the line
  "Visual Information: processed video" and "Do not generate any intermediate reasoning process.
  Answer directly with the option letter from the given choices." (open questions: "Directly
  output the final answer."). 1,024 new tokens at temperature 0.7: lmms-eval's Qwen2.5-VL model
  samples whenever the task's temperature is above 0, and this task's YAML sets 0.7.
- Multiple choice (rules only, never a judge): correct when the first standalone letter A-E
  (either case, so an article "a" reads as A) is the answer; or the answer letter stands alone
  anywhere (either case); or the answer option's text is inside the output; or the answer letter
  appears anywhere (as a substring, either case) together with a word of more than two characters
  from the answer option's text.
- Open questions: six text rules (equal or contained either way after lower-casing and
  whitespace folding, first numbers within 0.01, all longer answer words present for 2-5-word
  answers, the same O(...) notation); when they all fail, lmms-eval asks a GPT judge. p2r asks the
  judge configured on the adapter (an OpenAI-compatible server); without one, or when it fails,
  the question counts as wrong (what lmms-eval does when its judge fails) and is counted under
  ``not_judged`` in the results.
- Figure (``accuracy``, percent): correct / answered over the questions whose discipline is in
  lmms-eval's discipline table (others are left out), and per field (Science, Engineering,
  Healthcare, Humanities_and_Social_Science).
"""

from __future__ import annotations

import re
import string
from typing import Any

from callbacks.evaluation import Scored
from p2r.evaluation.lmms_eval.common import Ask, strip_reasoning_tags

MAX_NEW_TOKENS = 1024
TEMPERATURE = 0.7
CACHE_DIR = "mmvu"

MC_TEMPLATE = """
Question:{question}
A: {a}
B: {b}
C: {c}
D: {d}
E: {e}
Visual Information: processed video
Do not generate any intermediate reasoning process. Answer directly with the option letter from the
given choices.
"""
OPEN_TEMPLATE = """
Question:{question}
Visual Information: processed video
Do not generate any intermediate reasoning process. Directly output the final answer.
"""
JUDGE_TEMPLATE = """You are a strict evaluator assessing answer correctness. You must output 1 for fully correct answers and 0 for any other case.

# Evaluation Rules for Open-Ended Questions
- The model prediction may contain reasoning, focus on extracting the final answer.
- Score 1 if the prediction matches the answer semantically, even if in different format.
- For mathematical notation, treat equivalent forms as correct (e.g., O(n²) = O(n^2), n² = n^2).
- Score 0 for partially correct answers or answers with extra incorrect information.
- Ignore minor differences in formatting, capitalization, or spacing.
- Treat numerical answers as correct if they match within reasonable precision.
- For questions requiring units, both value and unit must be correct.

Return only "1" or "0" with no additional text or formatting.

Question: {question}
Correct Answer: {ground_truth}
Model Prediction: {prediction}"""
JUDGE_SETTINGS = {"temperature": 0.0, "max_tokens": 1024}  # lmms-eval's OpenAIVerifier defaults
# lmms-eval's verification pipeline strips these from the prediction before the judge sees it.
JUDGE_STRIPPED_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))

FIELDS = {
    "Biology": "Science", "Chemistry": "Science", "Modern_Physics": "Science", "Astronomy": "Science",
    "Geography": "Science", "Materials_Science": "Science", "Neurobiology": "Science", "Electromagnetism": "Science",
    "Thermodynamics": "Science", "Mechanics": "Science", "Civil_Engineering": "Engineering",
    "Electrical_Engineering": "Engineering", "Mechanical_Engineering": "Engineering",
    "Biomedical_Engineering": "Engineering", "Electronics_and_Communication": "Engineering",
    "Computer_Science": "Engineering", "Clinical_Medicine": "Healthcare", "Basic_Medicine": "Healthcare",
    "Preventive_Medicine": "Healthcare", "Pharmacy": "Healthcare", "Dentistry": "Healthcare",
    "Art": "Humanities_and_Social_Science", "Literature": "Humanities_and_Social_Science",
    "History": "Humanities_and_Social_Science", "Law": "Humanities_and_Social_Science",
    "Economics": "Humanities_and_Social_Science", "Management": "Humanities_and_Social_Science",
}
SUPERSCRIPTS = {"²": "^2", "³": "^3", "¹": "^1", "⁰": "^0", "⁴": "^4", "⁵": "^5", "⁶": "^6", "⁷": "^7", "⁸": "^8", "⁹": "^9"}



def is_multiple_choice(row: dict[str, Any]) -> bool:
    return row["question_type"] == "multiple-choice"


def prompt(row: dict[str, Any]) -> str:
    """The user text lmms-eval sends."""
    if not is_multiple_choice(row):
        return OPEN_TEMPLATE.format(question=row["question"])
    c = row["choices"]
    return MC_TEMPLATE.format(question=row["question"], a=c["A"], b=c["B"], c=c["C"], d=c["D"], e=c["E"])


def judge_question(row: dict[str, Any]) -> str:
    """The question as the judge sees it (``Question: ...``, with the options for multiple choice)."""
    if not is_multiple_choice(row):
        return f"Question: {row['question']}"
    c = row["choices"]
    return f"Question: {row['question']}\nA: {c['A']}\nB: {c['B']}\nC: {c['C']}\nD: {c['D']}\nE: {c['E']}"


def _superscripts_to_carets(text: str) -> str:
    for sup, caret in SUPERSCRIPTS.items():
        text = text.replace(sup, caret)
    return text


def multiple_choice_correct(row: dict[str, Any], output: str) -> bool:
    """lmms-eval's MMVU multiple-choice rules (see module doc)."""
    prediction, answer = str(output).strip(), str(row["answer"]).strip()
    first = re.search(r"\b([A-E])\b", prediction, re.IGNORECASE)
    if first and first.group(1).upper() == answer.upper():
        return True
    if answer.upper() in prediction.upper() and re.search(rf"\b{re.escape(answer)}\b", prediction, re.IGNORECASE):
        return True
    choices = row.get("choices") or {}
    if answer in choices:
        option = choices[answer].strip().lower()
        lowered = prediction.lower()
        if option in lowered:
            return True
        if answer.upper() in prediction.upper():
            words = [w.strip(string.punctuation) for w in option.split() if len(w.strip(string.punctuation)) > 2]
            if words and any(word in lowered for word in words):
                return True
    return False


def open_rules_correct(row: dict[str, Any], output: str) -> bool:
    """lmms-eval's six text rules for an open answer (see module doc)."""
    prediction = _superscripts_to_carets(str(output).strip().lower())
    answer = _superscripts_to_carets(str(row["answer"]).strip().lower())
    pred_clean, answer_clean = " ".join(prediction.split()), " ".join(answer.split())
    if pred_clean == answer_clean or answer_clean in pred_clean or pred_clean in answer_clean:
        return True
    pred_numbers, answer_numbers = re.findall(r"\d+\.?\d*", prediction), re.findall(r"\d+\.?\d*", answer)
    if pred_numbers and answer_numbers and abs(float(answer_numbers[0]) - float(pred_numbers[0])) < 0.01:
        return True
    answer_words = [w.strip(string.punctuation) for w in answer_clean.split() if w.strip(string.punctuation)]
    pred_words = [w.strip(string.punctuation) for w in pred_clean.split() if w.strip(string.punctuation)]
    if 2 <= len(answer_words) <= 5 and all(word in pred_words for word in answer_words if len(word) > 2):
        return True
    pred_o = re.search(r"O\s*\([^)]+\)", pred_clean, re.IGNORECASE)
    answer_o = re.search(r"O\s*\([^)]+\)", answer_clean, re.IGNORECASE)
    return bool(pred_o and answer_o and _superscripts_to_carets(pred_o.group(0).lower())
                == _superscripts_to_carets(answer_o.group(0).lower()))


def judge_says_correct(reply: str) -> bool:
    """lmms-eval's reading of a binary judge reply: "incorrect"/"not_attempted" no, "correct" yes,
    else yes when it contains "correct", "yes", "true" or "1"."""
    upper = reply.strip().upper()
    if "INCORRECT" in upper or "NOT_ATTEMPTED" in upper:
        return False
    if "CORRECT" in upper:
        return True
    lower = reply.strip().lower()
    return any(sign in lower for sign in ("correct", "yes", "true", "1", "[1]"))


def category(row: dict[str, Any]) -> str:
    """The discipline: the folder of the video."""
    return str(row["video_path"]).split("/")[-2]


def score(row: dict[str, Any], output: str, ask: Ask | None) -> Scored:
    """Rules first; an open question they reject goes to the judge ``ask`` (None, or no reply: not judged)."""
    multiple_choice = is_multiple_choice(row)
    judged: bool | None = None  # None: the rules decided
    if multiple_choice:
        correct = multiple_choice_correct(row, output)
        first = re.search(r"\b([A-E])\b", output)
        parsed = first.group(1) if first else "N/A"
    else:
        correct = open_rules_correct(row, output)
        parsed = output
        if not correct:
            text = JUDGE_TEMPLATE.format(question=judge_question(row), ground_truth=str(row["answer"]),
                                         prediction=strip_reasoning_tags(output, JUDGE_STRIPPED_TAGS))
            reply = ask([{"role": "user", "content": text}], JUDGE_SETTINGS) if ask else None
            judged = reply is not None
            correct = judged and judge_says_correct(reply)
    details = {"discipline": category(row), "judged": judged}
    return Scored(parsed, 1.0 if correct else 0.0, "accuracy", row["answer"], details)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """lmms-eval's ``accuracy`` (percent) and the per-field accuracies."""
    counts = {field: [0, 0] for field in sorted(set(FIELDS.values()))}  # field -> [correct, answered]
    for row in rows:
        field = FIELDS.get(row["details"]["discipline"])
        if field is not None:
            counts[field][0] += int(row["score"] == 1.0)
            counts[field][1] += 1
    correct, answered = sum(c for c, _ in counts.values()), sum(n for _, n in counts.values())
    return {
        "figure": 100 * correct / answered if answered else 0,
        "units": "percent",
        "metric": "accuracy",
        "categories": {field: 100 * c / n if n else 0 for field, (c, n) in counts.items()},
        "not_judged": sum(1 for row in rows if row["details"].get("judged") is False),
        "left_out": sum(1 for row in rows if row["details"]["discipline"] not in FIELDS),
    }


def video_path(row: dict[str, Any]) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``)."""
    return f"{CACHE_DIR}/{row['video_path']}"
