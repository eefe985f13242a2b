"""Reward callbacks on a hand-built Rollouts: every value worked out by hand, ordering and errors."""

import math
import warnings

import pytest

from callbacks.reward_callbacks import (
    CompletionLengthReward,
    PerceptionFormatReward,
    PerceptionJudgeReward,
    PerceptionLengthReward,
    ReasoningAccuracyReward,
    ReasoningFormatReward,
    ReasoningLengthReward,
    RewardCallback,
    TemporalBonusReward,
    ThinkAnswerFormatReward,
    judge_answer_text,
    needs_shuffled_frames,
    score_all,
)
from callbacks.rewards.judges import JudgeResult, RuleBasedJudge
from callbacks.rollouts import Rollouts

OPTIONS = ["A. He sits down", "B. He picks up the cup", "C. He leaves", "D. Nothing"]
PROMPTS = [
    {"id": "mc-1", "question": "What does the man do first?\nOptions:\n" + "\n".join(OPTIONS), "options": OPTIONS,
     "answer": "<answer>B</answer>", "problem_type": "multiple choice", "data_type": "video",
     "facts": {"evidence": [["cup"], ["picks up", "lifts"]]}},
    {"id": "num-1", "question": "How many cars are parked?", "options": [], "answer": "3",
     "problem_type": "numerical", "data_type": "video", "facts": {"evidence": [["three", "3"], ["car", "cars"]]}},
]
COMPLETIONS = [
    # s0: right answer, good format, sufficient observation
    "<observation>A man walks in and picks up a cup from the table.</observation>\n"
    "<think>He lifts the cup before anything else, which is option B.</think>\n<answer>B</answer>",
    # s1: text before the observation (reasoning text), wrong answer, observation without the evidence
    "Sure. <observation>A man.</observation><think>He leaves.</think><answer>C</answer>",
    # s2: right number, good format, sufficient observation (but too long for the length bonus)
    "<observation>Three cars are parked along the street.</observation>\n<think>3 cars.</think>\n<answer>3</answer>",
    # s3: no observation at all, wrong number
    "<think>Probably four.</think><answer>4</answer>",
]
P_LENGTHS = [150, 10, 400, 0]
R_LENGTHS = [400, 5, 330, 20]

EXPECTED = {
    "reasoning/accuracy": [1.0, 0.0, 1.0, 0.0],
    "perception/format": [1.0, 1.0, 1.0, 0.0],  # s1's stray "Sure." costs the reasoning format only
    "reasoning/format": [1.0, 0.0, 1.0, 1.0],
    "perception/accuracy": [1.0, 0.0, 1.0, 0.0],
    "perception/length": [0.2, 0.0, 0.0, 0.0],  # s2: 400 > 320 perception tokens
    "reasoning/length": [0.2, 0.0, 0.2, 0.0],  # s3: well formed but wrong
}


def make_rollouts(**kwargs):
    return Rollouts(group_size=2, prompts=[dict(p) for p in PROMPTS], completions=list(COMPLETIONS),
                    perception_token_lengths=list(P_LENGTHS), reasoning_token_lengths=list(R_LENGTHS), **kwargs)


def all_rewards(**judge_kwargs):
    return [
        ReasoningLengthReward(), PerceptionLengthReward(),  # listed before what they depend on on purpose
        ReasoningAccuracyReward(), PerceptionFormatReward(), ReasoningFormatReward(),
        PerceptionJudgeReward(judge=RuleBasedJudge(), **judge_kwargs),
    ]


def test_every_reward_by_hand():
    rollouts = make_rollouts()
    rewards = score_all(None, None, rollouts, callbacks=all_rewards())
    assert rewards == EXPECTED
    assert rollouts.reward_process == {name: name.split("/")[0] for name in EXPECTED}
    totals = rollouts.process_totals()
    assert totals["perception"] == pytest.approx([2.2, 1.0, 2.0, 0.0])
    assert totals["reasoning"] == pytest.approx([2.2, 0.0, 2.2, 1.0])
    assert rollouts.total() == pytest.approx([4.4, 1.0, 4.2, 1.0])
    assert rollouts.dropped_prompts() == [False, False]


def test_reasoning_accuracy_reads_the_solution_as_video_r1_and_lenient_on_request():
    completions = ["<think>It is B.</think><answer>B</answer>", "<think>So it is (b)</think><answer>(b)</answer>",
                   "<think>B, since he lifts the cup</think><answer>B", "The answer is B."]
    prompt = dict(PROMPTS[0], answer="B", solution="<answer>B</answer>")
    rollouts = Rollouts(group_size=4, prompts=[prompt], completions=completions)
    assert ReasoningAccuracyReward().score(rollouts) == [1.0, 0.0, 0.0, 0.0]
    assert ReasoningAccuracyReward(answer_reader="lenient").score(rollouts) == [1.0, 1.0, 1.0, 1.0]
    # The solution, not the answer, is the ground truth when both are given (p2r passes both).
    first_block = dict(prompt, solution="<answer>C</answer> <answer>B</answer>")
    rollouts = Rollouts(group_size=4, prompts=[first_block], completions=completions)
    assert ReasoningAccuracyReward().score(rollouts) == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="answer_reader"):
        ReasoningAccuracyReward(answer_reader="strict")


def test_reasoning_accuracy_warns_once_on_an_untagged_solution_and_refuses_unknown_types():
    prompt = dict(PROMPTS[0], solution="B")  # Video-R1 reads this ground truth as ""
    rollouts = Rollouts(group_size=2, prompts=[prompt], completions=["<answer>B</answer>", "no answer"])
    reward = ReasoningAccuracyReward()
    with pytest.warns(UserWarning, match="no complete <answer>"):
        assert reward.score(rollouts) == [0.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward.score(rollouts)  # once per callback
        ReasoningAccuracyReward(answer_reader="lenient").score(rollouts)  # the lenient reader reads "B"
    bad = Rollouts(group_size=2, prompts=[dict(PROMPTS[1], problem_type="ocr")], completions=COMPLETIONS[:2])
    with pytest.raises(ValueError, match="problem_type 'ocr'"):
        ReasoningAccuracyReward().score(bad)


def test_think_answer_format_reward_by_hand():
    rollouts = make_rollouts()
    score_all(None, None, rollouts, callbacks=[ThinkAnswerFormatReward()])
    # Only s3 is a bare think/answer trace; the observation template and stray text score 0.
    assert rollouts.rewards["reasoning/think_answer_format"] == [0.0, 0.0, 0.0, 1.0]
    assert rollouts.reward_process["reasoning/think_answer_format"] == "reasoning"


def test_length_bounds_are_configurable():
    rollouts = make_rollouts()
    score_all(None, None, rollouts, callbacks=[
        ReasoningAccuracyReward(), ReasoningFormatReward(), ReasoningLengthReward(lmin=1, lmax=350)])
    assert rollouts.rewards["reasoning/length"] == [0.0, 0.0, 0.2, 0.0]
    with pytest.raises(ValueError):
        ReasoningLengthReward(lmin=10, lmax=5)


def test_length_reward_needs_token_lengths():
    rollouts = Rollouts(group_size=2, prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError, match="perception_token_lengths"):
        score_all(None, None, rollouts, callbacks=[PerceptionFormatReward(), PerceptionJudgeReward(RuleBasedJudge()),
                                                   PerceptionLengthReward()])


def test_judge_failure_policies():
    prompts = [dict(PROMPTS[0]), dict(PROMPTS[1], facts=None)]  # the rule judge cannot judge prompt 1
    zero = Rollouts(group_size=2, prompts=prompts, completions=COMPLETIONS)
    score_all(None, None, zero, callbacks=[PerceptionJudgeReward(RuleBasedJudge(), failure_policy="zero")])
    # s3 has an empty observation: 0 without asking the judge, so it is not a failure.
    assert zero.rewards["perception/accuracy"] == [1.0, 0.0, 0.0, 0.0]
    assert zero.dropped_prompts() == [False, False]
    drop = Rollouts(group_size=2, prompts=prompts, completions=COMPLETIONS)
    reward = PerceptionJudgeReward(RuleBasedJudge(), failure_policy="drop_group")
    values, metrics = reward.score_with_metrics(drop)
    assert values[:2] == [1.0, 0.0] and math.isnan(values[2]) and values[3] == 0.0
    assert metrics["judge/failures"] == 1.0 and metrics["judge/failure_rate"] == 0.25
    score_all(None, None, drop, callbacks=[reward])
    assert drop.dropped_prompts() == [False, True]
    assert math.isnan(drop.process_totals()["perception"][2])
    with pytest.raises(ValueError):
        PerceptionJudgeReward(RuleBasedJudge(), failure_policy="retry")


def test_a_raising_judge_never_crashes_the_reward():
    class Exploding(RuleBasedJudge):
        def judge(self, requests):
            raise RuntimeError("boom")

    class Short(RuleBasedJudge):
        def judge(self, requests):
            return [JudgeResult(score=1.0)]  # one result for four requests

    for judge in (Exploding(), Short()):
        values, metrics = PerceptionJudgeReward(judge, use_facts=False).score_with_metrics(make_rollouts())
        assert len(values) == 4 and metrics["judge/failures"] >= 3


def test_records_with_facts_go_to_the_rule_judge_unless_use_facts_is_off():
    class Exploding(RuleBasedJudge):
        def judge(self, requests):
            raise RuntimeError("the LLM judge must not be called for records with facts")

    # Every PROMPTS record carries evidence: the exploding LLM judge is never asked.
    values, metrics = PerceptionJudgeReward(Exploding()).score_with_metrics(make_rollouts())
    assert metrics["judge/failures"] == 0
    assert values == EXPECTED["perception/accuracy"]
    values, metrics = PerceptionJudgeReward(Exploding(), use_facts=False).score_with_metrics(make_rollouts())
    assert metrics["judge/failures"] == 4 and values == [0.0] * 4


def test_judge_reads_the_option_text_of_the_answer():
    assert judge_answer_text(PROMPTS[0]) == "B. He picks up the cup"
    assert judge_answer_text(PROMPTS[1]) == "3"
    assert judge_answer_text({"answer": "B", "problem_type": "multiple choice", "options": ["x", "y"]}) == "B. y"


def test_temporal_bonus_video_r1_rule():
    # Video-R1's reader: "(B)" is not "B". prompt 0: ordered mean 0.5 >= 0.8 x shuffled mean 0.5 -> +0.3
    # to its correct sample s0; prompt 1: ordered mean 0.5 >= 0.8 x shuffled mean 0.5 -> +0.3 to s2.
    shuffled = ["<answer>B</answer>", "<answer>(B)</answer>", "<answer>5</answer>", "<answer>3</answer>"]
    rollouts = make_rollouts(shuffled_completions=shuffled)
    temporal = TemporalBonusReward()
    assert needs_shuffled_frames([ReasoningAccuracyReward(), temporal]) and not needs_shuffled_frames([])
    score_all(None, None, rollouts, callbacks=[temporal, ReasoningAccuracyReward()])
    assert rollouts.rewards["reasoning/temporal"] == [0.3, 0.0, 0.3, 0.0]
    assert rollouts.reward_process["reasoning/temporal"] == "reasoning"
    # The lenient reader reads "(B)" as B: prompt 0's shuffled mean is 1.0 > 0.5 / 0.8 -> no bonus.
    lenient = make_rollouts(shuffled_completions=shuffled)
    temporal = TemporalBonusReward(answer_reader="lenient")
    score_all(None, None, lenient, callbacks=[temporal, ReasoningAccuracyReward(answer_reader="lenient")])
    assert lenient.rewards["reasoning/temporal"] == [0.0, 0.0, 0.3, 0.0]
    values, metrics = temporal.score_with_metrics(lenient)
    assert metrics["temporal/pass_rate"] == 0.5


def test_temporal_bonus_skips_images_and_needs_shuffled_videos():
    images = [dict(p, data_type="image") for p in PROMPTS]
    rollouts = Rollouts(group_size=2, prompts=images, completions=COMPLETIONS)
    score_all(None, None, rollouts, callbacks=[ReasoningAccuracyReward(), TemporalBonusReward()])
    assert rollouts.rewards["reasoning/temporal"] == [0.0] * 4
    with pytest.raises(ValueError, match="shuffled_completions"):
        score_all(None, None, make_rollouts(), callbacks=[ReasoningAccuracyReward(), TemporalBonusReward()])


def test_score_all_errors_are_clear():
    with pytest.raises(RuntimeError, match="no reward callback is configured"):
        score_all(None, None, make_rollouts(), callbacks=[])
    with pytest.raises(ValueError, match="perception/accuracy"):
        score_all(None, None, make_rollouts(), callbacks=[PerceptionFormatReward(), PerceptionLengthReward()])
    with pytest.raises(ValueError, match="share the name"):
        score_all(None, None, make_rollouts(), callbacks=[ReasoningAccuracyReward(), ReasoningAccuracyReward()])

    class Ping(RewardCallback):
        name, process, depends_on = "reasoning/ping", "reasoning", ("reasoning/pong",)

        def score(self, rollouts):
            return [0.0] * len(rollouts)

    class Pong(Ping):
        name, depends_on = "reasoning/pong", ("reasoning/ping",)

    with pytest.raises(ValueError, match="circular"):
        score_all(None, None, make_rollouts(), callbacks=[Ping(), Pong()])


def test_a_dependency_already_in_the_rollouts_is_enough():
    rollouts = make_rollouts()
    rollouts.set_reward("reasoning/accuracy", [1.0, 1.0, 0.0, 0.0], "reasoning")
    score_all(None, None, rollouts, callbacks=[ReasoningFormatReward(), ReasoningLengthReward()])
    assert rollouts.rewards["reasoning/length"] == [0.2, 0.0, 0.0, 0.0]


def test_a_reward_with_the_wrong_length_is_rejected():
    class Broken(RewardCallback):
        name, process = "reasoning/broken", "reasoning"

        def score(self, rollouts):
            return [1.0]

    with pytest.raises(ValueError, match="1 values for 4 samples"):
        score_all(None, None, make_rollouts(), callbacks=[Broken()])


def _video_r1_group(accuracies: list[float], lengths: list[int], shuffled: list[str]) -> Rollouts:
    """One multiple-choice video prompt (answer B), G = len(accuracies) completions whose answer is
    B where the accuracy is 1, with the given token counts, and the given shuffled-frame answers."""
    completions = [f"<think>t</think><answer>{'B' if a else 'C'}</answer>" for a in accuracies]
    return Rollouts(group_size=len(accuracies), prompts=[dict(PROMPTS[0])], completions=completions,
                    completion_ids=[[7] * n for n in lengths], shuffled_completions=shuffled,
                    shuffled_group_size=len(shuffled))


def test_temporal_bonus_compares_means_over_g_ordered_and_g_over_2_shuffled_samples():
    """Video-R1: G = 4 ordered, G / 2 = 2 shuffled completions; each mean over its own count."""
    # Ordered accuracy [1, 0, 0, 1]: mean 0.5. Shuffled [B, B]: mean 1.0; 0.5 < 0.8 -> no bonus
    # (dividing the shuffled sum by G = 4 would give 0.5 and pay the bonus).
    rollouts = _video_r1_group([1, 0, 0, 1], [10] * 4, ["<answer>B</answer>", "<answer>B</answer>"])
    score_all(None, None, rollouts, callbacks=[ReasoningAccuracyReward(), TemporalBonusReward()])
    assert rollouts.rewards["reasoning/temporal"] == [0.0, 0.0, 0.0, 0.0]
    # Shuffled [B, C]: mean 0.5; 0.5 >= 0.4 -> +0.3 to each ordered sample with accuracy > 0.1.
    rollouts = _video_r1_group([1, 0, 0, 1], [10] * 4, ["<answer>B</answer>", "<answer>C</answer>"])
    score_all(None, None, rollouts, callbacks=[ReasoningAccuracyReward(), TemporalBonusReward()])
    assert rollouts.rewards["reasoning/temporal"] == [0.3, 0.0, 0.0, 0.3]
    with pytest.raises(ValueError, match="shuffled_completions has 3 entries, expected B\\*shuffled_group_size = 1\\*2"):
        Rollouts(group_size=4, prompts=[dict(PROMPTS[0])], completions=[""] * 4, shuffled_completions=["", "", ""],
                 shuffled_group_size=2)


def test_completion_length_control_is_video_r1s_rule():
    """+0.2 to each correct sample (accuracy > 0.1) with 320..512 completion tokens, only when more
    than one sample of the group is correct."""
    callbacks = [ReasoningAccuracyReward(), CompletionLengthReward()]
    two_correct = _video_r1_group([1, 1, 0, 0], [320, 513, 400, 400], ["", ""])
    score_all(None, None, two_correct, callbacks=callbacks)
    assert two_correct.rewards["reasoning/completion_length"] == [0.2, 0.0, 0.0, 0.0]  # 513 > 512; wrong ones get none
    one_correct = _video_r1_group([1, 0, 0, 0], [400, 400, 400, 400], ["", ""])
    score_all(None, None, one_correct, callbacks=callbacks)
    assert one_correct.rewards["reasoning/completion_length"] == [0.0] * 4  # a lone correct sample gets no bonus
    all_correct = _video_r1_group([1, 1, 1, 1], [319, 320, 512, 512], ["", ""])
    score_all(None, None, all_correct, callbacks=callbacks)
    assert all_correct.rewards["reasoning/completion_length"] == [0.0, 0.2, 0.2, 0.2]
