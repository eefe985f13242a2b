"""TempCompass as lmms-eval 0.7.3 runs it: four tasks, one per answer format
(``tempcompass_multi_choice``, ``tempcompass_yes_no``, ``tempcompass_caption_matching``,
``tempcompass_captioning``; dataset ``lmms-eval/TempCompass``, configs ``multi-choice``,
``yes_no``, ``caption_matching``, ``captioning``), one figure per format and none for the group.

Rows: ``video_id`` (the video is ``videos/<video_id>.mp4`` under lmms-eval's ``tempcompass``
cache folder), ``question`` (options included), ``answer``, ``dim`` (the temporal aspect: action,
speed, direction, order, attribute_change); captioning rows add ``mc_question`` and ``mc_answer``.

- Prompt: the question, then "\\nPlease directly give the best option:" (multi-choice, caption
  matching), "\\nPlease answer yes or no:" (yes/no), nothing (captioning). Greedy; the task sets no
  token limit, so lmms-eval's Qwen2.5-VL chat model (what ``--model qwen2_5_vl`` runs) allows 128.
- multi-choice: right when the output equals the answer, or is a bare letter A-D, or starts with
  "X." or "X)", and that letter is the answer's first character; anything else goes to the judge.
- yes_no: the lower-cased output starting with "yes" / "no" (so "not sure" reads "no") against
  the answer; anything else goes to the judge.
- caption_matching: the output equal to an option line, to an option's sentence (also after
  "X) "), or to an option's label ("Caption A", "A", also with dots removed), the last such match
  winning; right when it is the answer line, its label or its sentence; no match goes to the judge.
- captioning: always the judge: it answers ``mc_question`` from the output (the caption) and the
  format is right when its answer's letter is the truth's and it names exactly one option.
- The judge is lmms-eval's gpt-3.5-turbo-1106 prompt; p2r sends it to the adapter's configured
  OpenAI-compatible server. Without one, or when its reply cannot be read, the question counts as
  wrong (what lmms-eval does when its judge fails) and is counted under ``not_judged``.
- Figure per format (``avg_accuracy``, percent): rated-correct / all questions of the format;
  also per ``dim`` (``<dim>_accuracy``).
"""

from __future__ import annotations

from typing import Any

from callbacks.evaluation import Scored
from p2r.evaluation.lmms_eval.common import Ask

FORMATS = {"multi-choice": "tempcompass_multi_choice", "yes_no": "tempcompass_yes_no",
           "caption_matching": "tempcompass_caption_matching", "captioning": "tempcompass_captioning"}
POST_PROMPTS = {"multi-choice": "\nPlease directly give the best option:", "yes_no": "\nPlease answer yes or no:",
                "caption_matching": "\nPlease directly give the best option:", "captioning": ""}
MAX_NEW_TOKENS = 128  # lmms-eval's Qwen2.5-VL chat model (what --model qwen2_5_vl runs) when a task sets none
CACHE_DIR = "tempcompass"

JUDGE_SYSTEM = "You are an AI assistant for question answering."
JUDGE_SETTINGS = {"max_tokens": 128, "temperature": 1.0, "top_p": 1, "presence_penalty": 1}
JUDGE_ATTEMPTS = 11  # lmms-eval tries once and retries 10 times on an unreadable reply
_JUDGE_INTRO = {"multi-choice": "a multi-choice question", "yes_no": "a Yes/No question",
                "caption_matching": "a caption matching question"}
_JUDGE_LABEL = {"multi-choice": "Multi-Choice Question", "yes_no": "Yes/No Question",
                "caption_matching": "Caption Matching Question"}
# lmms-eval writes its judge prompts as indented triple-quoted strings with line continuations, so
# each continued line's indentation stays inside the text: 8 spaces in the Correct/Incorrect prompt,
# 4 in the captioning one (whose blank lines are empty).
_JUDGE_SENTENCES = (
    "You will receive {what}, the ground-truth answer and the prediction from a question answering (QA) model. ",
    "Your task is to determine whether QA model prediction is correct, based on the question and ground-truth answer. ",
    'If the prediction is correct, respond "Correct". If the prediction is incorrect, respond "Incorrect".',
)
_CAPTIONING_LINES = (
    "You will receive a video description and a multi-choice question. Your task is to choose the correct answer "
    "and briefly explain the reason why you choose the answer.     If none of the choice candidates are correct or "
    'the video description lacks enough information to answer the question, just answer "None of the choices are '
    'correct".     Please organize your response in this format:',
    "```", "Reasoning: [Your reason to obtain the answer]", "Answer: [Your answer]", "```", "",
    "Here are some examples of video description, multi-choice question and the expected answer:", "```",
    "Video Description: A person is palying football.", "Multi-Choice Question:",
    "What is the person doing in the video?", "A. cooking", "B. palying football", "C. playing basketball",
    "D. reading book", "Reasoning: The video description mentions that the person is playing football.",
    "Answer: B. palying football", "",
    "Video Description: A bird is flying clockwise.", "Multi-Choice Question:", "In which direction is the bird flying?",
    "A. backwark", "B. counter-clockwise", "C. clockwise", "D. downward",
    "Reasoning: The video description mentions that the bird is flying clockwise", "Answer: C. clockwise", "",
    "Video Description: An air balloon is inflating.", "Multi-Choice Question:", "What is happening to the air balloon?",
    "A. exploding", "B. getting smaller", "C. flying",
    "Reasoning: The video description mentions that the air balloon is inflating, while none of the coices can be "
    "explained as inflating.",
    "Answer: None of the choices are correct", "```",
)
CAPTIONING_PROMPT = "\n" + "\n".join("    " + line if line else "" for line in _CAPTIONING_LINES) + "\n    "



def prompt(row: dict[str, Any], form: str) -> str:
    """The user text lmms-eval sends for a question of format ``form``."""
    return f"{row['question']}{POST_PROMPTS[form]}"


def _judge_prompt(row: dict[str, Any], output: str, form: str) -> str:
    base = "\n" + "".join("        " + part for part in _JUDGE_SENTENCES).format(what=_JUDGE_INTRO[form]) + "\n        "
    return f"{base}\n{_JUDGE_LABEL[form]}:\n{row['question']}\nGround-Truth Answer: {row['answer']}\nModel Prediction: {output}"


def rating_of(reply: str) -> int | None:
    """lmms-eval's reading of a Correct/Incorrect reply; None when it names neither (a retry there)."""
    if "Correct" not in reply and "Incorrect" not in reply:
        return None
    if reply.startswith("Correct"):
        return 1
    if reply.startswith("Incorrect"):
        return 0
    return 1 if "Incorrect" not in reply else 0


def _ask_rating(ask: Ask | None, text: str) -> int | None:
    """The judge's rating; None when there is no judge, it does not answer, or never names a rating."""
    if ask is None:
        return None
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}]
    for _ in range(JUDGE_ATTEMPTS):
        reply = ask(messages, JUDGE_SETTINGS)
        if reply is None:  # the client has already retried the transport: give up on this question
            return None
        rating = rating_of(reply.strip())
        if rating is not None:
            return rating
    return None


def multi_choice_rating(row: dict[str, Any], output: str) -> int | None:
    """The hand-written rules of the multi-choice format; None when they do not apply."""
    answer = row["answer"]
    if output == answer:
        return 1
    if output in ("A", "B", "C", "D"):
        return int(output == answer[0])
    if output[:2] in ("A.", "B.", "C.", "D."):
        return int(output.split(".")[0] == answer[0])
    if output[:2] in ("A)", "B)", "C)", "D)"):
        return int(output.split(")")[0] == answer[0])
    return None


def yes_no_rating(row: dict[str, Any], output: str) -> int | None:
    """"yes"/"no" from the start of the lower-cased output; None when it starts with neither."""
    lowered = output.lower()
    reading = "yes" if lowered.startswith("yes") else "no" if lowered.startswith("no") else None
    return None if reading is None else int(reading == row["answer"])


def caption_matching_rating(row: dict[str, Any], output: str) -> int | None:
    """Word-matching rules of the caption-matching format; None when the output matches no option."""
    lines = row["question"].split("\n")[1:]
    sentences = [line.split(": ")[1] for line in lines]
    labels = [line.split(": ")[0] for line in lines]
    labels += [label.replace("Sentence ", "").replace("Option ", "").replace("Caption ", "") for label in labels]
    chosen = None
    for line in lines:
        if line == output:
            chosen = line
    for sentence in sentences:
        if sentence == output or (") " in output and sentence == output.split(") ")[1]):
            chosen = sentence
    for label in labels:
        if label == output or label == output.replace(".", ""):
            chosen = label
    if chosen is None:
        return None
    answer = row["answer"]
    return int(chosen == answer or chosen == answer.split(":")[0] or chosen == answer.split(": ")[1]
               or chosen == answer.split(": ")[0].split()[1])


def captioning_rating(judge_answer: str, truth: str) -> int:
    """Whether the judge's answer (from the caption) is the truth: same "X" before ". " and exactly
    one "A."/"B."/"C."/"D." in it."""
    named = sum(judge_answer.count(prefix) for prefix in ("A.", "B.", "C.", "D."))
    return int(judge_answer.split(". ")[0] == truth.split(". ")[0] and named == 1)


def _captioning_answer(reply: str) -> str:
    answer = None
    for line in reply.split("\n"):
        line = line.strip()
        if "Answer" in line:
            answer = line.replace("Answer:", "").strip()
    return reply if answer is None else answer


def score(row: dict[str, Any], output: str, form: str, ask: Ask | None) -> Scored:
    """One output rated (1 right, 0 wrong); ``details`` say whether a judge had to decide and did."""
    judged: bool | None = None
    if form == "captioning":
        text = f"{CAPTIONING_PROMPT}\nVideo Description:{output}\nMulti-Choice Question:\n{row['mc_question']}\nAnswer:"
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}]
        reply = (ask(messages, JUDGE_SETTINGS) or "").strip() if ask else ""
        judged = bool(reply)  # lmms-eval rates an empty or failed reply -1: never right
        rating = captioning_rating(_captioning_answer(reply), row["mc_answer"]) if reply else 0
        truth = row["mc_answer"]
    else:
        rules = {"multi-choice": multi_choice_rating, "yes_no": yes_no_rating,
                 "caption_matching": caption_matching_rating}[form]
        rating = rules(row, output)
        if rating is None:
            rating = _ask_rating(ask, _judge_prompt(row, output, form))
            judged = rating is not None
            rating = rating or 0
        truth = row["answer"]
    return Scored(output, float(rating == 1), "accuracy", truth, {"format": form, "dim": row["dim"], "judged": judged})


def format_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``avg_accuracy`` and ``<dim>_accuracy`` (percent) of one format's rows."""
    def percent(subset: list[dict[str, Any]]) -> float:
        return sum(1 for row in subset if row["score"] == 1.0) / len(subset) * 100

    dims = sorted({row["details"]["dim"] for row in rows})
    return {
        "figure": percent(rows) if rows else 0,
        "categories": {f"{dim}_accuracy": percent([r for r in rows if r["details"]["dim"] == dim]) for dim in dims},
        "not_judged": sum(1 for row in rows if row["details"]["judged"] is False),
    }


def video_path(row: dict[str, Any]) -> str:
    """The video under lmms-eval's cache root (``$HF_HOME``)."""
    return f"{CACHE_DIR}/videos/{row['video_id']}.mp4"
