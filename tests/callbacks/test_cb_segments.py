"""Perception/reasoning split: exact spans and exact token masks on real completions."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks.segments import char_spans_to_token_mask, reasoning_text, split_segments

GOOD = (
    "<observation>A man in a red shirt lifts a cup.</observation>\n"
    "<think>He lifts the cup first.</think>\n<answer>B</answer>"
)


def word_offsets(text):
    """A toy tokenizer: tags, words, single punctuation marks and whitespace runs are tokens."""
    return [m.span() for m in re.finditer(r"</?\w+>|\w+|\s+|[^\w\s]", text)]


def test_well_formed():
    seg = split_segments(GOOD)
    end = len("<observation>A man in a red shirt lifts a cup.</observation>")
    assert seg.perception_spans == [(0, end)]
    assert seg.observation == "A man in a red shirt lifts a cup."
    assert reasoning_text(GOOD) == "\n<think>He lifts the cup first.</think>\n<answer>B</answer>"


def test_exact_token_mask_on_a_real_completion():
    text = "<observation>Two cups.</observation>\n<think>So 2.</think><answer>2</answer>"
    offsets = word_offsets(text) + [(len(text), len(text))]  # + EOS with an empty range
    tokens = [text[a:b] for a, b in offsets]
    assert tokens == ["<observation>", "Two", " ", "cups", ".", "</observation>", "\n", "<think>", "So", " ", "2",
                      ".", "</think>", "<answer>", "2", "</answer>", ""]
    mask = char_spans_to_token_mask(offsets, split_segments(text).perception_spans)
    assert mask == [True] * 6 + [False] * 11


def test_text_before_first_tag_and_after_answer_is_reasoning():
    text = "Sure! <observation>A dog.</observation><think>t</think><answer>A</answer> Done."
    seg = split_segments(text)
    assert seg.perception_spans == [(6, 6 + len("<observation>A dog.</observation>"))]
    offsets = word_offsets(text)
    mask = char_spans_to_token_mask(offsets, seg.perception_spans)
    perception_tokens = "".join(text[a:b] for (a, b), m in zip(offsets, mask) if m)
    assert perception_tokens == "<observation>A dog.</observation>"
    assert not mask[0] and not mask[-1]


def test_token_straddling_a_boundary_is_perception():
    text = "<observation>x</observation>\n<think>"
    span_end = len("<observation>x</observation>")
    offsets = [(0, 13), (13, 14), (14, span_end + 1), (span_end + 1, len(text))]  # token 2 = "</observation>\n"
    assert char_spans_to_token_mask(offsets, split_segments(text).perception_spans) == [True, True, True, False]


def test_repeated_blocks_are_all_perception():
    text = "<observation>a</observation><think>t</think><observation>b</observation><answer>A</answer>"
    seg = split_segments(text)
    assert seg.perception_spans == [(0, 28), (44, 72)]
    assert seg.observations == ["a", "b"]
    assert seg.observation == "a\nb"


def test_unclosed_observation_runs_to_the_next_reasoning_tag():
    text = "<observation>a cat sits<think>t</think><answer>A</answer>"
    seg = split_segments(text)
    assert seg.perception_spans == [(0, len("<observation>a cat sits"))]
    assert seg.observation == "a cat sits"
    assert split_segments("<observation>cut off by the length limit").perception_spans == [(0, 40)]


def test_nested_opening_is_swallowed_by_the_unclosed_block():
    text = "<observation>a <observation>b</observation><think>t</think>"
    seg = split_segments(text)
    assert seg.perception_spans == [(0, len("<observation>a <observation>b</observation>"))]
    assert seg.observations == ["a <observation>b"]


def test_stray_close_and_missing_tags_are_reasoning():
    assert split_segments("A dog.</observation><think>t</think>").perception_spans == []
    assert split_segments("just an answer: B").perception_spans == []
    assert split_segments("").observation == ""


def test_out_of_order_and_case():
    text = "<think>t</think><answer>A</answer><Observation>late</OBSERVATION>"
    seg = split_segments(text)
    assert seg.perception_spans == [(34, len(text))]
    assert seg.observation == "late"


def test_empty_offsets_are_reasoning():
    assert char_spans_to_token_mask([(0, 0), (3, 3)], [(0, 10)]) == [False, False]
    assert char_spans_to_token_mask([], [(0, 10)]) == []


TAGS = st.sampled_from(["<observation>", "</observation>", "<think>", "</think>", "<answer>", "</answer>",
                        "<OBSERVATION>", " ", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(TAGS, st.text(max_size=6)), max_size=12).map("".join))
def test_spans_partition_the_text(text):
    seg = split_segments(text)
    previous_end = 0
    for start, end in seg.perception_spans:
        assert previous_end <= start < end <= len(text)
        assert text[start:].lower().startswith("<observation>")
        previous_end = end
    kept = reasoning_text(text, seg)
    assert len(kept) + sum(e - s for s, e in seg.perception_spans) == len(text)
    offsets = [(i, i + 1) for i in range(len(text))]
    mask = char_spans_to_token_mask(offsets, seg.perception_spans)
    assert "".join(c for c, m in zip(text, mask) if not m) == kept
