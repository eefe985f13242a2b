"""The Rollouts contract: grouping, validation, per-process sums, NaN = drop the group."""

import math

import pytest

from callbacks.rollouts import Rollouts

PROMPTS = [{"id": "a", "question": "q", "options": [], "answer": "1", "problem_type": "numerical", "facts": None},
           {"id": "b", "question": "q", "options": [], "answer": "2", "problem_type": "numerical", "facts": None}]
TEXTS = ["<observation>one</observation><answer>1</answer>", "x", "<observation> two </observation>", ""]


def test_grouping_and_observation():
    r = Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS)
    assert r.num_prompts == 2 and len(r) == 4
    assert [r.prompt_of(i)["id"] for i in range(4)] == ["a", "a", "b", "b"]
    assert [r.observation(i) for i in range(4)] == ["one", "", "two", ""]


@pytest.mark.parametrize("field", ["completion_ids", "truncated", "perception_token_lengths",
                                   "reasoning_token_lengths", "shuffled_completions"])
def test_per_sample_fields_must_have_b_times_g_entries(field):
    with pytest.raises(ValueError, match=field):
        Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS, **{field: [0] * 3})


def test_bad_shapes_and_processes():
    with pytest.raises(ValueError, match="completions"):
        Rollouts(group_size=3, prompts=PROMPTS, completions=TEXTS)
    with pytest.raises(ValueError, match="group_size"):
        Rollouts(group_size=0, prompts=PROMPTS, completions=[])
    r = Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS)
    with pytest.raises(ValueError, match="process"):
        r.set_reward("x", [0.0] * 4, "planning")
    with pytest.raises(ValueError, match="3 values"):
        r.set_reward("x", [0.0] * 3, "reasoning")
    with pytest.raises(ValueError, match="process"):
        Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS, rewards={"x": [0.0] * 4})


def test_process_totals_total_and_dropped_groups():
    r = Rollouts(group_size=2, prompts=PROMPTS, completions=TEXTS)
    r.set_reward("perception/accuracy", [1, 0, math.nan, 1], "perception")
    r.set_reward("perception/format", [1, 1, 0, 0], "perception")
    r.set_reward("reasoning/accuracy", [0.5, 0, 1, 0], "reasoning")
    totals = r.process_totals()
    assert totals["perception"][:2] == [2.0, 1.0] and math.isnan(totals["perception"][2]) and totals["perception"][3] == 1
    assert totals["reasoning"] == [0.5, 0.0, 1.0, 0.0]
    total = r.total()
    assert total[0] == 2.5 and total[1] == 1.0 and math.isnan(total[2]) and total[3] == 1.0
    assert r.dropped_prompts() == [False, True]
    assert isinstance(r.rewards["perception/accuracy"][0], float)
