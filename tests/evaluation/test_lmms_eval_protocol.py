"""The ``lmms_eval`` protocol on hand-worked cases from lmms-eval 0.7.3's rules, per benchmark:
reasoning-tag stripping, each task's reader (the tricky outputs: lower-case letters, "A." vs
"(A)", an article "a", empty outputs, reasoning tags, numbers with units), its score, and the
aggregation to the figure lmms-eval prints, in its units. lmms-eval itself is never imported."""

from __future__ import annotations

import pytest

from p2r.evaluation.judge import EvalJudge
from p2r.evaluation.lmms_eval import LmmsEvalRules, NativeRow, TASKS, resolve_task
from p2r.evaluation.lmms_eval.common import extract_mcq_answer, strip_reasoning_tags
from p2r.evaluation.lmms_eval.vsibench import read_number


def rows_of(rules: LmmsEvalRules, cases: list[tuple[dict, str, str]]) -> list[dict]:
    """Predictions lines as the callback writes them, for (row, task, output) cases."""
    out = []
    for row, task, output in cases:
        doc = NativeRow(row, resolve_task(rules.benchmark, task))
        scored = rules.score(doc, output)
        out.append({"score": scored.score, "metric": scored.metric, "category": rules.category(doc),
                    "parsed": scored.parsed, "details": scored.details})
    return out


# --- shared rules -----------------------------------------------------------------------------
@pytest.mark.parametrize(("output", "stripped"), [
    ("<think>it is red</think> B", "B"),
    ("<think>a</think>B<think>c</think>", "B"),
    ("so it is red</think>B", "B"),                       # the template pre-filled <think>: text after the last </think>
    ("x</think>y</think> C", "C"),
    ("<think>never closed B", "<think>never closed B"),   # an unclosed block stays
    ("<THINK>x</THINK>B", "<THINK>x</THINK>B"),           # case-sensitive
    ("<analysis>hmm</analysis>\n D ", "D"),
    ("<observation>a cat</observation><think>so</think><answer>B</answer>",
     "<observation>a cat</observation><answer>B</answer>"),  # observation and answer tags are not reasoning tags
    ("", ""),
])
def test_reasoning_tags_are_stripped_as_lmms_eval_does(output, stripped):
    assert strip_reasoning_tags(output) == stripped


@pytest.mark.parametrize(("output", "letter"), [
    ("(B)", "B"), ("B.", "B"), ("B: jumping", "B"), ("**C**", "C"),
    ("b", ""), ("a dog", ""), ("answer: d", ""),          # lower case never counts
    ("A dog runs. So C.", "A"),                           # starts with "A" not followed by a letter: priority 10
    ("The answer is C", "C"), ("The correct answer is (B).", "B"), ("My answer is: Definitely C", "C"),
    ("I think B is right.", "B"),                         # "B " (space) is the only way it appears
    ("Either A or B", "B"),                               # ends with B: 9 beats "A " (2)
    ("B. No wait, C", "B"),                               # starts with B: 10 beats ends with C: 9
    ("I choose D, not A.", "A"),                          # ends with A (9) beats the phrase "i choose" (7)
    ("选B", "B"), ("", ""), ("None", ""), ("E", ""),     # E is not among A-D
])
def test_mcq_extraction(output, letter):
    assert extract_mcq_answer(output, ["A", "B", "C", "D"]) == letter


def test_tasks_resolve_by_lmms_eval_name_or_dataset_config_and_vcrbench_is_refused():
    assert resolve_task("mvbench", "action_count") == resolve_task("mvbench", "mvbench_action_count") == "mvbench_action_count"
    assert resolve_task("vsibench", None) == "vsibench"
    assert len(TASKS["mvbench"]) == 20 and set(TASKS["videommmu"]) == {"Perception", "Comprehension", "Adaptation"}
    with pytest.raises(ValueError, match="mvbench_action_count"):
        resolve_task("mvbench", None)
    with pytest.raises(ValueError, match="VCRBench .*another benchmark"):
        LmmsEvalRules("vcrbench")


# --- VSI-Bench --------------------------------------------------------------------------------
def vsi_row(kind: str, truth: str) -> dict:
    options = ["A. table", "B. chair", "C. sofa", "D. lamp"] if "direction" in kind or kind in ("obj_appearance_order", "route_planning", "object_rel_distance") else None
    return {"id": 1, "dataset": "scannet", "scene_name": "scene0001", "question_type": kind, "question": "Q?",
            "options": options, "ground_truth": truth}


def test_vsibench_prompt_and_generation():
    rules = LmmsEvalRules("vsibench")
    count = NativeRow(vsi_row("object_counting", "4"), "vsibench")
    order = NativeRow(vsi_row("obj_appearance_order", "B"), "vsibench")
    assert rules.prompt(count) == "These are frames of a video.\nQ?\nPlease answer the question using a single word or phrase."
    assert rules.prompt(order) == ("These are frames of a video.\nQ?\nOptions:\nA. table\nB. chair\nC. sofa\nD. lamp\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert tuple(rules.generation(count)) == (16, 0.0, 1.0)
    assert rules.video_path(count) == "vsibench/scannet/scene0001.mp4"


@pytest.mark.parametrize(("output", "score"), [
    ("B", 1.0), ("b", 1.0), ("B. chair", 1.0), ("B.", 1.0), ("B..", 1.0),   # first word, dots off, any case
    ("(B)", 0.0), (" B", 1.0), ("The answer is B", 0.0), ("", 0.0),  # " B": the evaluator strips whitespace first
    ("<think>it is the chair</think>B", 1.0),                                # tags stripped first
])
def test_vsibench_multiple_choice_reads_the_first_word(output, score):
    assert LmmsEvalRules("vsibench").score(NativeRow(vsi_row("obj_appearance_order", "B"), "vsibench"), output).score == score


@pytest.mark.parametrize(("output", "number", "mra"), [
    # truth 4; lmms-eval's MRA: |p - 4| / 4 <= 1 - t for t in linspace(0.5, 0.95, 10)
    ("4", 4.0, 1.0), ("3", 3.0, 0.6), ("three", 3.0, 0.6), ("3 chairs", 3.0, 0.6),  # 0.25 <= 0.25 at t = 0.75 holds
    ("There are 5.0 chairs", 5.0, 0.6), ("two and two", 4.0, 1.0), ("one, two", 3.0, 0.6),
    ("twenty-one", 21.0, 0.0), ("", None, 0.0), ("none", None, 0.0), ("several", None, 0.0),
    ("3.5 meters", 3.5, 0.8),  # 0.125 <= 0.15 (t = 0.85) but not <= 0.10
])
def test_vsibench_numbers_and_mra(output, number, mra):
    scored = LmmsEvalRules("vsibench").score(NativeRow(vsi_row("object_counting", "4"), "vsibench"), output)
    assert (scored.parsed, scored.score, scored.metric) == (number, mra, "mra")


def test_vsibench_number_reading_runs_of_words():
    assert read_number("three hundred and two") == 302.0
    assert read_number("a hundred") == 100.0
    assert read_number("two thousand five hundred") == 2500.0
    assert read_number("room 2, one apple") == 2.0  # the digit comes first
    assert read_number("-3 degrees") == -3.0


def test_vsibench_figure_merges_the_three_direction_types():
    rules = LmmsEvalRules("vsibench")
    cases = [
        (vsi_row("obj_appearance_order", "A"), None, "A"), (vsi_row("obj_appearance_order", "A"), None, "B"),  # 0.5
        (vsi_row("object_counting", "4"), None, "3"),                                                            # 0.6
        (vsi_row("object_rel_direction_easy", "A"), None, "A"),                                                  # 1
        (vsi_row("object_rel_direction_medium", "A"), None, "B"), (vsi_row("object_rel_direction_medium", "A"), None, "C"),  # 0
        *[(vsi_row("object_rel_direction_hard", "A"), None, o) for o in ("A", "B", "B", "B")],                  # 0.25
    ]
    figure = rules.aggregate(rows_of(rules, cases))
    direction = (1.0 + 0.0 + 0.25) / 3
    assert figure["categories"] == {"obj_appearance_order_accuracy": 0.5, "object_counting_mra": 0.6,
                                    "object_rel_direction_accuracy": round(direction, 6)}
    # the mean of three type scores, not of the 10 questions: (0.5 + 0.6 + 0.416667) / 3
    assert (figure["figure"], figure["units"], figure["metric"]) == (0.505556, "fraction", "vsibench_overall")


# --- VideoMMMU --------------------------------------------------------------------------------
def mmmu_mc(answer: str, subject: str = "Art", n: int = 1, options: list[str] | None = None) -> dict:
    return {"id": f"validation_{subject}_{n}", "question": "Q?", "options": options or ["red", "green", "blue", "cyan"],
            "answer": answer, "question_type": "multiple-choice"}


def mmmu_open(answer: str, subject: str = "Math", n: int = 1) -> dict:
    return {"id": f"validation_{subject}_{n}", "question": "Q?", "options": [], "answer": answer, "question_type": "open"}


def test_videommmu_prompts_per_track():
    rules = LmmsEvalRules("videommmu")
    mc = mmmu_mc("B")
    assert rules.prompt(NativeRow(mc, "video_mmmu_perception")) == (
        "Q?\nA. red\nB. green\nC. blue\nD. cyan\nPlease ignore the Quiz question in last frame of the video.")
    assert rules.prompt(NativeRow(mc, "video_mmmu_adaptation")) == (
        "You should watch and learn the video content. Then apply what you learned to answer the following "
        "multi-choice question. The image for this question is at the end of the video.\nQ?\nA. red\nB. green\nC. blue\nD. cyan")
    assert rules.prompt(NativeRow(mmmu_open("5"), "video_mmmu_adaptation")).endswith("open-ended question. The image for "
                                                                                   "this question is at the end of the video.\nQ?")
    lettered = mmmu_mc("A", options=["A. red", "B. green"])  # already lettered: kept as they are
    assert rules.prompt(NativeRow(lettered, "video_mmmu_comprehension")).startswith("Q?\nA. red\nB. green\n")
    assert tuple(rules.generation(NativeRow(mc, "video_mmmu_perception"))) == (1024, 0.0, 1.0)
    assert rules.video_path(NativeRow(mmmu_mc("A", "Clinical_Medicine", 7), "video_mmmu_perception")) == \
        "video_mmmu/Medicine/validation_Clinical_Medicine_7.mp4"


@pytest.mark.parametrize(("row", "output", "parsed", "score"), [
    (mmmu_mc("B"), "B", "B", 1.0),
    (mmmu_mc("B"), "b", "No Answer Found.", 0.0),
    (mmmu_mc("B"), "(B) green", "B", 1.0),
    (mmmu_mc("B"), "green", "No Answer Found.", 0.0),      # the option text alone is not read
    (mmmu_mc("B"), "A green one", "A", 0.0),               # a leading article-like "A": start, priority 10
    (mmmu_mc("B"), "", "No Answer Found.", 0.0),           # an empty MC answer is wrong, not left out
    (mmmu_open("5"), "The answer is 5.", [5.0], 1.0),
    (mmmu_open("3.14"), "so the result is 3.14159", [3.14], 1.0),  # numbers compare at 2 places
    (mmmu_open("12"), "It equals 12\nthus 5", [12.0, 5.0], 1.0),   # one key sub-response per line
    (mmmu_open("DFS"), "I think it is DFS", ["dfs"], 1.0),
    (mmmu_open("x"), "the answer is x", [" x", "x "], 1.0),        # one letter on both sides is padded alike
    (mmmu_open("x"), "the answer is xylophone", ["xylophone"], 0.0),  # " x" / "x " never match inside a word
    (mmmu_open("5"), "", "API Error", None),               # lmms-eval's aggregation drops these lines: no score
    (mmmu_open("5"), "API Error", "API Error", None),      # ... and the literal text its API models return on failure
])
def test_videommmu_readers(row, output, parsed, score):
    scored = LmmsEvalRules("videommmu").score(NativeRow(row, "video_mmmu_adaptation"), output)
    got = sorted(scored.parsed, key=str) if isinstance(scored.parsed, list) else scored.parsed
    assert (got, scored.score) == (sorted(parsed, key=str) if isinstance(parsed, list) else parsed, score)


def test_videommmu_figure_per_track_leaves_empty_open_answers_out():
    rules = LmmsEvalRules("videommmu")
    perception = [(mmmu_mc("A", "Art", i), "Perception", "A" if i < 3 else "C") for i in range(4)]            # Art 3/4
    perception += [(mmmu_mc("A", "Math", 9), "Perception", "C")]                                              # Math 0/1
    adaptation = [(mmmu_open("5", "Physics", 1), "Adaptation", "5"), (mmmu_open("5", "Physics", 2), "Adaptation", ""),
                  (mmmu_open("5", "Physics", 3), "Adaptation", "7")]                                         # 1/2, one API Error
    only_perception = rules.aggregate(rows_of(rules, perception))
    assert (only_perception["figure"], only_perception["units"]) == (0.6, "fraction")  # (0.75*4 + 0*1) / 5
    assert only_perception["categories"]["Perception/Art"] == 0.75
    assert only_perception["categories"]["Perception/Overall-Art and Design"] == 0.75
    both = rules.aggregate(rows_of(rules, perception + adaptation))
    assert both["tasks"] == {"video_mmmu_adaptation": 0.5, "video_mmmu_perception": 0.6}
    assert both["figure"] == pytest.approx(0.55) and both["n_api_error"] == 1  # no group figure in lmms-eval: the mean


# --- MMVU ---------------------------------------------------------------------------------------
CHOICES = {"A": "Newton first law", "B": "Hooke law", "C": "Ohm law", "D": "Snell law", "E": ""}


def mmvu_mc(answer: str = "A", discipline: str = "Mechanics") -> dict:
    return {"id": "m1", "question": "Which law?", "choices": CHOICES, "answer": answer, "question_type": "multiple-choice",
            "video_path": f"{discipline}/m1.mp4"}


def mmvu_open(answer: str, discipline: str = "Computer_Science") -> dict:
    return {"id": "o1", "question": "Which search?", "choices": {}, "answer": answer, "question_type": "open-ended",
            "video_path": f"{discipline}/o1.mp4"}


def test_mmvu_prompt_and_sampled_generation():
    rules = LmmsEvalRules("mmvu")
    assert rules.prompt(NativeRow(mmvu_mc(), "mmvu_val")) == (
        "\nQuestion:Which law?\nA: Newton first law\nB: Hooke law\nC: Ohm law\nD: Snell law\nE: \n"
        "Visual Information: processed video\nDo not generate any intermediate reasoning process. Answer directly with "
        "the option letter from the\ngiven choices.\n")
    assert tuple(rules.generation(NativeRow(mmvu_mc(), "mmvu_val"))) == (1024, 0.7, 1.0)  # lmms-eval samples MMVU


@pytest.mark.parametrize(("output", "score"), [
    ("A", 1.0), ("a", 1.0), ("(A)", 1.0), ("A dog", 1.0),      # first standalone letter, either case
    ("B", 0.0), ("b", 0.0),
    ("Maybe D or A", 1.0),                                     # the answer letter standing alone anywhere
    ("Newton first law", 1.0),                                 # the answer option's text inside the output
    ("Because of Newton", 1.0),                                # "A" inside "BECAUSE" plus the word "newton"
    ("The law of Hooke", 1.0),                                 # "A" inside "LAW" plus the word "law"
    ("The rule of Hooke", 0.0), ("", 0.0),
])
def test_mmvu_multiple_choice_rules(output, score):
    assert LmmsEvalRules("mmvu").score(NativeRow(mmvu_mc("A"), "mmvu_val"), output).score == score


@pytest.mark.parametrize(("answer", "output", "score"), [
    ("Depth-First Search (DFS)", "The algorithm is depth-first search (DFS).", 1.0),  # answer inside the output
    ("Depth-First Search (DFS)", "DFS", 1.0),                                          # output inside the answer
    ("Depth-First Search (DFS)", "dfs search", 0.0),
    ("O(n²)", "O(n^2)", 1.0), ("O(n²)", "o(n^2) time", 1.0),                           # superscripts as carets
    ("3.5 m", "3.51 meters", 1.0), ("3.5 m", "about 3.504", 1.0), ("3.5 m", "3.6 m", 0.0),  # first numbers within 0.01
    ("left ventricle wall", "the wall of the left ventricle", 1.0),                    # every longer word present
])
def test_mmvu_open_rules_without_a_judge(answer, output, score):
    scored = LmmsEvalRules("mmvu").score(NativeRow(mmvu_open(answer), "mmvu_val"), output)
    assert scored.score == score
    assert scored.details["judged"] is (None if score else False)  # rejected by the rules and no judge: not judged


def test_mmvu_judge_decides_what_the_rules_reject_and_the_figure_is_percent():
    asked = []

    def judge(messages, settings):
        asked.append((messages, settings))
        return {"BFS": "0", "breadth first": "1", "graph walk": None}[messages[0]["content"].rsplit("Model Prediction: ", 1)[1]]

    rules = LmmsEvalRules("mmvu", ask=judge)
    cases = [(mmvu_open("DFS"), None, "BFS"), (mmvu_open("DFS"), None, "breadth first"), (mmvu_open("DFS"), None, "graph walk"),
             (mmvu_open("DFS"), None, "DFS"),                                   # the rules accept it: no judge call
             (mmvu_mc("A", "Art"), None, "A"), (mmvu_mc("A", "Unlisted_Field"), None, "A")]
    rows = rows_of(rules, cases)
    assert [r["score"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert [r["details"]["judged"] for r in rows] == [True, True, False, None, None, None]
    assert len(asked) == 3 and asked[0][1] == {"temperature": 0.0, "max_tokens": 1024}
    assert asked[0][0][0]["content"].startswith("You are a strict evaluator") and "Question: Question: Which search?" in asked[0][0][0]["content"]
    figure = rules.aggregate(rows)
    # the unlisted discipline is left out: 3 right of 5 answered, in percent
    assert (figure["figure"], figure["units"], figure["not_judged"], figure["left_out"]) == (60.0, "percent", 1, 1)
    assert figure["categories"]["Engineering"] == 50.0 and figure["categories"]["Humanities_and_Social_Science"] == 100.0


# --- MVBench --------------------------------------------------------------------------------------
MV = {"video": "v.mp4", "question": "What is the boy doing?", "candidates": ["running", "jumping", "sitting"], "answer": "running"}


def test_mvbench_prompt():
    rules = LmmsEvalRules("mvbench")
    doc = NativeRow(MV, "mvbench_action_count")
    assert rules.prompt(doc) == ("Question:What is the boy doing?\nOption:\n(A) running\n(B) jumping\n(C) sitting\n"
                                 "Only give the best option.\n")
    assert tuple(rules.generation(doc)) == (16, 0.0, 1.0)
    assert rules.video_path(doc) == "mvbench_video/perception/videos/v.mp4"


@pytest.mark.parametrize(("output", "parsed", "score"), [
    ("(A) The boy is running.", "A", 1.0), ("A", "A", 1.0), ("a", "A", 1.0),
    ("a person runs", "A", 1.0),            # lower-cased, first standalone letter: the article reads as A
    ("c. red", "C", 0.0),                   # "X. text" gives X directly
    ("Best option: (A)", "A", 1.0),
    ("B) jumping", "B", 0.0),
    ("The boy is running.", "the boy is running", 0.0),  # no letter: the cleaned text is compared with "A"
    ("", "", 0.0),
])
def test_mvbench_reader(output, parsed, score):
    scored = LmmsEvalRules("mvbench").score(NativeRow(MV, "mvbench_action_count"), output)
    assert (scored.parsed, scored.score, scored.truth) == (parsed, score, "A")


def test_mvbench_figure_per_task_leaves_empty_outputs_out():
    rules = LmmsEvalRules("mvbench")
    count = [(MV, "action_count", o) for o in ("A", "B", "", "<think>hm</think>")]   # 1 right of 2 answered: 50
    shuffle = [(MV, "object_shuffle", o) for o in ("A", "A", "A", "C")]             # 75
    one = rules.aggregate(rows_of(rules, count))
    assert (one["figure"], one["units"]) == (50.0, "percent")
    both = rules.aggregate(rows_of(rules, count + shuffle))
    assert both["tasks"] == {"mvbench_action_count": 50.0, "mvbench_object_shuffle": 75.0} and both["figure"] == 62.5


# --- TempCompass ------------------------------------------------------------------------------------
TC_MC = {"video_id": "1", "question": "Which direction?\nA. left\nB. right\nC. up\nD. down", "answer": "B. right", "dim": "direction"}
TC_YN = {"video_id": "2", "question": "Is it fast?", "answer": "no", "dim": "speed"}
TC_CM = {"video_id": "3", "question": "Which caption matches?\nCaption A: a man runs\nCaption B: a man walks",
         "answer": "Caption B: a man walks", "dim": "action"}
TC_CAP = {"video_id": "4", "question": "Describe.", "answer": "", "dim": "order", "mc_question": "Q?\nA. x\nB. y", "mc_answer": "A. x"}


@pytest.mark.parametrize(("row", "form", "output", "rating"), [
    (TC_MC, "multi-choice", "B. right", 1), (TC_MC, "multi-choice", "B", 1), (TC_MC, "multi-choice", "B.", 1),
    (TC_MC, "multi-choice", "B) right", 1), (TC_MC, "multi-choice", "A", 0), (TC_MC, "multi-choice", "b", None),
    (TC_MC, "multi-choice", "(B)", None), (TC_MC, "multi-choice", "right", None),
    (TC_YN, "yes_no", "No.", 1), (TC_YN, "yes_no", "not sure", 1),   # starts with "no"
    (TC_YN, "yes_no", "Yes", 0), (TC_YN, "yes_no", "It is slow", None),
    (TC_CM, "caption_matching", "Caption B", 1), (TC_CM, "caption_matching", "B", 1), (TC_CM, "caption_matching", "B.", 1),
    (TC_CM, "caption_matching", "a man walks", 1), (TC_CM, "caption_matching", "(B) a man walks", 1),
    (TC_CM, "caption_matching", "Caption A: a man runs", 0), (TC_CM, "caption_matching", "the second", None),
])
def test_tempcompass_rules_and_what_goes_to_the_judge(row, form, output, rating):
    """``None``: the rules cannot read it, so lmms-eval asks its judge; without one it counts as wrong."""
    scored = LmmsEvalRules("tempcompass").score(NativeRow(row, resolve_task("tempcompass", form)), output)
    assert scored.score == float(rating == 1)
    assert scored.details["judged"] is (None if rating is not None else False)


def test_tempcompass_judge_requests_and_captioning():
    asked = []

    def judge(messages, settings):
        asked.append((messages, settings))
        if "Video Description:" in messages[1]["content"]:
            return "Reasoning: the caption says x\nAnswer: A. x"
        return "Correct"

    rules = LmmsEvalRules("tempcompass", ask=judge)
    assert rules.score(NativeRow(TC_MC, "tempcompass_multi_choice"), "(B)").score == 1.0
    assert rules.score(NativeRow(TC_CAP, "tempcompass_captioning"), "A man does x.").score == 1.0
    (mc_messages, mc_settings), (cap_messages, _) = asked
    assert mc_settings == {"max_tokens": 128, "temperature": 1.0, "top_p": 1, "presence_penalty": 1}
    assert mc_messages[0] == {"role": "system", "content": "You are an AI assistant for question answering."}
    assert mc_messages[1]["content"].startswith("\n        You will receive a multi-choice question, the ground-truth "
                                                "answer and the prediction from a question answering (QA) model.         Your task")
    assert mc_messages[1]["content"].endswith("Multi-Choice Question:\nWhich direction?\nA. left\nB. right\nC. up\nD. down\n"
                                              "Ground-Truth Answer: B. right\nModel Prediction: (B)")
    assert cap_messages[1]["content"].endswith("Video Description:A man does x.\nMulti-Choice Question:\nQ?\nA. x\nB. y\nAnswer:")


def test_tempcompass_figure_per_format_in_percent():
    rules = LmmsEvalRules("tempcompass")
    cases = [(TC_MC, "multi-choice", "B"), (TC_MC, "multi-choice", "A"), (TC_MC, "multi-choice", "b"),
             (TC_YN, "yes_no", "no"), (TC_CAP, "captioning", "x")]  # no judge: "b" and the caption are not judged
    figure = rules.aggregate(rows_of(rules, cases))
    assert figure["tasks"] == {"tempcompass_captioning": 0, "tempcompass_multi_choice": pytest.approx(100 / 3),
                               "tempcompass_yes_no": 100.0}
    assert figure["categories"]["multi-choice/direction_accuracy"] == pytest.approx(100 / 3)
    assert figure["not_judged"] == 2 and figure["units"] == "percent"


# --- Video-MME ---------------------------------------------------------------------------------------
ME = {"videoID": "abc", "question_id": "001-1", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
      "task_type": "Counting Problem", "question": "How many planets?", "options": ["A. 7", "B. 8", "C. 9", "D. 10"], "answer": "B"}


def test_videomme_prompt_score_and_figure():
    rules = LmmsEvalRules("videomme")
    doc = NativeRow(ME, "videomme")
    assert rules.prompt(doc) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many planets?\nA. 7\nB. 8\nC. 9\nD. 10\n"
        "\nAnswer with the option's letter from the given choices directly.")
    assert tuple(rules.generation(doc)) == (16, 0.0, 1.0) and rules.video_path(doc) == "videomme/data/abc.mp4"
    outputs = ["B", "b", "(B) 8", "The answer is B.", "A. 7", "", "<think>eight</think>B"]
    assert [rules.score(doc, o).score for o in outputs] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    long = {**ME, "duration": "long"}
    figure = rules.aggregate(rows_of(rules, [(ME, None, "B"), (ME, None, "C"), (long, None, "B"), (long, None, "B")]))
    assert (figure["figure"], figure["units"], figure["categories"]) == (75.0, "percent", {"short": 50.0, "long": 100.0})


# --- the judge on an OpenAI-compatible server ---------------------------------------------------------
def test_eval_judge_sends_lmms_evals_requests_and_a_dead_server_leaves_questions_not_judged(chat_server, chat_payload, monkeypatch):
    server = chat_server([(200, chat_payload(200, "Incorrect"), 0.0), (200, chat_payload(200, "Correct"), 0.0)])
    monkeypatch.setenv("P2R_JUDGE_API_KEY", "sk-test")
    judge = EvalJudge(server.base_url, "gpt-3.5-turbo-1106", max_retries=0)
    rules = LmmsEvalRules("tempcompass", ask=judge)
    assert rules.score(NativeRow(TC_MC, "tempcompass_multi_choice"), "(B)").score == 0.0
    assert rules.score(NativeRow(TC_MC, "tempcompass_multi_choice"), "(B)").score == 1.0
    body = server.requests[0]["body"]
    assert body["model"] == "gpt-3.5-turbo-1106" and body["max_tokens"] == 128 and body["presence_penalty"] == 1
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    dead = LmmsEvalRules("mmvu", ask=EvalJudge("http://127.0.0.1:9/v1", "judge", timeout_s=1.0, max_retries=0))
    scored = dead.score(NativeRow(mmvu_open("DFS"), "mmvu_val"), "BFS")
    assert (scored.score, scored.details["judged"]) == (0.0, False)
