"""Split a completion into its perception and reasoning segments (METHOD.md, "Output template").

Perception P is every ``<observation>...</observation>`` block, tags included; reasoning R is
everything else: think, answer, the whitespace between them, text before the first tag or after
``</answer>``, and the end-of-sequence token. PA-GRPO applies the perception advantage to P's
tokens and the reasoning advantage to R's, so this split decides which tokens each reward trains.

Rule for malformed text (the paper does not say; ours, chosen so that every character is in
exactly one segment and a sloppy observation still counts as perception):

- every well-formed ``<observation>...</observation>`` block is perception, repeated ones included;
- an ``<observation>`` whose next tag is not ``</observation>`` is unclosed: its block runs up to
  the next ``<think>``, ``</think>``, ``<answer>`` or ``</answer>`` tag, or to the end of the text;
  a second ``<observation>`` inside it does not end it (it is swallowed by the first block);
- a stray ``</observation>`` with no opening tag is reasoning text, like any other stray text;
- tags match case-insensitively (``<Observation>`` counts), as the answer parser does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPEN = "<observation>"
CLOSE = "</observation>"
_OPEN_RE = re.compile(re.escape(OPEN), re.IGNORECASE)
_CLOSE_RE = re.compile(re.escape(CLOSE), re.IGNORECASE)
_REASONING_TAG_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)


@dataclass(frozen=True)
class Segments:
    """Where the perception segment lies in one completion.

    ``perception_spans``: character spans ``(start, end)`` (end exclusive) of each perception block,
    tags included, in order and non-overlapping. ``observations``: the inner text of each block,
    stripped. Reasoning is the complement of the spans.
    """

    perception_spans: list[tuple[int, int]]
    observations: list[str]

    @property
    def observation(self) -> str:
        """All observation texts joined by newlines: what the perception judge reads."""
        return "\n".join(o for o in self.observations if o)


def split_segments(text: str) -> Segments:
    """Find the perception blocks of ``text`` (see the module docstring for the rule).

    >>> s = split_segments("<observation>a dog</observation>\\n<think>so</think><answer>A</answer>")
    >>> s.perception_spans, s.observation
    ([(0, 32)], 'a dog')
    >>> split_segments("<observation>cut off").perception_spans
    [(0, 20)]
    """
    spans: list[tuple[int, int]] = []
    observations: list[str] = []
    pos = 0
    while True:
        opening = _OPEN_RE.search(text, pos)
        if opening is None:
            break
        inner_start = opening.end()
        closing = _CLOSE_RE.search(text, inner_start)
        stop = _REASONING_TAG_RE.search(text, inner_start)
        if closing is not None and (stop is None or closing.start() < stop.start()):
            inner_end, end = closing.start(), closing.end()
        else:
            inner_end = end = stop.start() if stop is not None else len(text)
        spans.append((opening.start(), end))
        observations.append(text[inner_start:inner_end].strip())
        pos = end
    return Segments(perception_spans=spans, observations=observations)


def reasoning_text(text: str, segments: Segments | None = None) -> str:
    """``text`` with its perception blocks cut out: the reasoning segment as one string."""
    segments = segments or split_segments(text)
    pieces, pos = [], 0
    for start, end in segments.perception_spans:
        pieces.append(text[pos:start])
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def char_spans_to_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token, ``True`` when it is a perception token.

    ``offsets`` are the tokens' character ranges in the SAME string that was split (a fast
    tokenizer's ``offset_mapping`` of the decoded completion). A token is perception when its range
    overlaps a perception span by at least one character, so a token that straddles a tag boundary
    (``">\\n"``) goes to perception. Tokens with an empty range, such as the end-of-sequence token
    that decoding drops, are reasoning (METHOD.md puts EOS in R).

    >>> char_spans_to_token_mask([(0, 5), (5, 9), (9, 9)], [(0, 6)])
    [True, True, False]
    """
    mask = []
    for start, end in offsets:
        mask.append(start < end and any(start < s_end and end > s_start for s_start, s_end in spans))
    return mask
