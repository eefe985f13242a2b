"""Format rewards Rformat_P and Rformat_R (METHOD.md), and Video-R1's think/answer format; each 0 or 1.

METHOD.md says only "the perception text is inside <observation>...</observation>" and "a
<think>...</think> trace is followed by <answer>...</answer>". How strict is our choice, made so
that each process is judged on its own segment (``callbacks.segments``) and the template order
observation -> think -> answer is the only one that scores on both:

- perception: the completion holds exactly one opening and one closing observation tag, in that
  order, with non-blank text between them and no other tag inside, and no think or answer tag
  before it. Plain text before ``<observation>`` is reasoning text (METHOD.md) and costs the
  reasoning format only: Rformat_P judges the perception text, and its advantage trains the
  perception tokens, which did not write that text;
- reasoning: the reasoning segment (the completion with its perception blocks cut out) is exactly
  ``<think>T</think> <answer>A</answer>``, only whitespace around and between, T and A non-blank
  and tag-free, one think and one answer. Stray text before ``<think>`` or after ``</answer>`` is
  reasoning text (METHOD.md) and breaks the reasoning format, as in Video-R1's fullmatch rule.

Tags must be written in lower case here (the template's spelling), while the segment splitter
accepts any case: a ``<Think>`` costs the format reward.

:func:`think_answer_format` is a different rule, Video-R1's ``format_reward`` for its own
think/answer template (``src/r1-v/src/open_r1/grpo.py``), for the GRPO / T-GRPO baselines: the WHOLE
completion must match ``<think>.*?</think>\\s*<answer>.*?</answer>`` (``re.fullmatch``, DOTALL,
case-sensitive). So nothing may come before ``<think>`` or after the final ``</answer>``, not even
whitespace or a newline; empty think and answer blocks pass; and because the lazy groups may
stretch across tags, extra blocks pass as long as the text opens with ``<think>`` and ends with
``</answer>`` (``<think>a</think><answer>b</answer><answer>c</answer>`` scores 1).
"""

from __future__ import annotations

import re

from callbacks.segments import reasoning_text

_ANY_TAG = re.compile(r"</?(?:observation|think|answer)>", re.IGNORECASE)
_OBSERVATION_OPEN = re.compile(r"<observation>", re.IGNORECASE)
_OBSERVATION_CLOSE = re.compile(r"</observation>", re.IGNORECASE)
_OBSERVATION = re.compile(r"<observation>(.*?)</observation>", re.DOTALL)
_REASONING_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_REASONING = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_VIDEO_R1_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _clean(inner: str) -> bool:
    return bool(inner.strip()) and not _ANY_TAG.search(inner)


def perception_format(completion: str) -> float:
    """1 when the completion has one well-formed, non-empty observation block before any think or
    answer tag, else 0.

    >>> perception_format("<observation>A red ball.</observation><think>x</think><answer>A</answer>")
    1.0
    >>> perception_format("Sure. <observation>A red ball.</observation>")  # the stray text is reasoning's
    1.0
    >>> perception_format("<think>x</think><observation>A red ball.</observation>")
    0.0
    """
    if len(_OBSERVATION_OPEN.findall(completion)) != 1 or len(_OBSERVATION_CLOSE.findall(completion)) != 1:
        return 0.0
    match = _OBSERVATION.search(completion)
    if match is None or _REASONING_TAG.search(completion, 0, match.start()):
        return 0.0
    return 1.0 if _clean(match.group(1)) else 0.0


def reasoning_format(completion: str) -> float:
    """1 when the reasoning segment is exactly one think block followed by one answer block, else 0.

    >>> reasoning_format("<observation>o</observation>\\n<think>t</think>\\n<answer>B</answer>")
    1.0
    >>> reasoning_format("<think>t</think><answer>B</answer> Hope this helps!")
    0.0
    """
    match = _REASONING.fullmatch(reasoning_text(completion))
    return 1.0 if match and _clean(match.group(1)) and _clean(match.group(2)) else 0.0


def think_answer_format(completion: str) -> float:
    """Video-R1's format reward: 1 when the whole completion is a think block, optional whitespace
    and an answer block (``re.fullmatch``), else 0.

    >>> think_answer_format("<think>t</think>\\n<answer>B</answer>"), think_answer_format("<think>t</think><answer>B</answer>\\n")
    (1.0, 0.0)
    >>> think_answer_format("<observation>o</observation><think>t</think><answer>B</answer>")
    0.0
    """
    return 1.0 if _VIDEO_R1_FORMAT.fullmatch(completion) else 0.0
