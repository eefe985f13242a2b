"""The paper's analyses in ``p2r test``: observation-only / question-only answering (Table 5) and the
think-answer mismatch rate (Table 6), from the readers up to results.json through the real CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from callbacks.evaluation import (
    BenchmarkEvaluation,
    Generation,
    OpenAIChatAnswerer,
    OpenAIMismatchJudge,
    RuleMismatchJudge,
    Scored,
    TextOnlyAnswering,
    ThinkAnswerMismatch,
)
from callbacks.evaluation.analysis import Item, mean_se
from callbacks.evaluation.think_answer import Case, rule_reading
from callbacks.rewards.parsing import last_committed_letter, last_number
from p2r.algorithms.base import VideoLVLMModule
from p2r.cli import main
from p2r.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]
SMALLER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vision_hidden_size": 16, "vision_depth": 1}


def record(problem_type="multiple choice", options=("A. red", "B. blue", "C. green"), problem="Which colour?"):
    return SimpleNamespace(problem_type=problem_type, options=list(options), problem=problem)


# --- the readers -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, letter", [
    ("The ball turns blue. So the answer is B.", "B"),
    ("Option A is red and option C is green; the ball is green, so the answer is (C).", "C"),
    ("At first I thought the answer is A, but the ball ends blue, so the answer is B", "B"),  # the last commitment
    ("(A) red, (B) blue, (C) green: the ball ends blue, B is correct.", "B"),  # a verdict beats later mentions
    ("B is correct. Options were (A), (B) and (C).", "B"),  # tier 1 wins over tier 2, wherever it is
    ("Comparing (A) and (C), it is option C.", "C"),
    ("A man walks left. I see a red ball.", None),  # articles and pronouns are not commitments
    ("the answer is a car", None),  # a lower-case word is not a letter
    ("So the answer is E.", None),  # beyond the three options
])
def test_last_committed_letter(text, letter):
    assert last_committed_letter(text, num_options=3) == letter


@pytest.mark.parametrize("text, number", [
    ("3 red and 2 blue, so 5 in total.", 5.0),
    ("There are twenty-one cars; the red one leads.", 21.0),
    ("It moves 2.5 widths, about -1,250.75 pixels", -1250.75),
    ("No numbers here; just one.", None),
])
def test_last_number(text, number):
    assert last_number(text) == number


@pytest.mark.parametrize("output, rec, expected", [
    ("<think>it ends blue, so the answer is B</think><answer>B</answer>", record(), {"mismatch": False, "think": "B", "answer": "B"}),
    ("<think>it ends blue, so the answer is B</think><answer>C. green</answer>", record(), {"mismatch": True, "think": "B", "answer": "C"}),
    ("<think>it ends blue, so the answer is B</think><answer>green</answer>", record(), {"mismatch": True, "answer": "C"}),  # option text
    ("<think>3 and 2 make 5</think><answer>5.0</answer>", record("numerical", ()), {"mismatch": False, "think": 5.0}),
    ("<think>3 and 2 make 5</think><answer>6</answer>", record("numerical", ()), {"mismatch": True, "answer": 6.0}),
    ("<think>about 2.004 m</think><answer>2</answer>", record("regression", ()), {"mismatch": False}),  # 2 decimals
    ("<think>about 2.01 m</think><answer>2</answer>", record("regression", ()), {"mismatch": True}),
    ("<answer>B</answer>", record(), {"mismatch": None, "reason": "no <think>"}),
    ("<think>the answer is B</think><answer>B", record(), {"mismatch": None, "reason": "no <answer>"}),
    ("<think>it is blue</think><answer>B</answer>", record(), {"mismatch": None, "reason": "no option concluded in <think>"}),
    ("<think>the answer is B</think><answer>none</answer>", record(), {"mismatch": None, "reason": "no option in <answer>"}),
    ("<think>it reads CAT</think><answer>CAT</answer>", record("OCR", ()), {"method": "judge", "mismatch": None, "think": "it reads CAT"}),
])
def test_rule_reading(output, rec, expected):
    reading = rule_reading(output, rec)
    assert {k: reading.get(k) for k in expected} == expected


def test_rule_judge_looks_for_the_answer_words_in_order():
    cases = [Case("q", "The word is CAT, in white.", "cat"), Case("q", "A red car, then a dog", "the red car"),
             Case("q", "It reads CAT", "DOG"), Case("q", "It reads CAT", "...")]
    assert RuleMismatchJudge().agree(cases) == [(True, None), (False, None), (False, None), (None, "the answer has no words")]


def test_llm_mismatch_judge_against_a_scripted_server(chat_server, chat_payload):
    def respond(request):
        user = request["body"]["messages"][1]["content"]
        reply = {"CAT": "Yes.", "DOG": "**No**, the reasoning said CAT", "BAT": "maybe"}[re.search(r"Final answer:\n(\w+)", user).group(1)]
        return 200, chat_payload(200, reply), 0.0

    server = chat_server(respond)
    judge = OpenAIMismatchJudge(server.base_url, "judge-model", max_retries=0)
    verdicts = judge.agree([Case("What word?", "It reads CAT", a) for a in ("CAT", "DOG", "BAT")])
    assert verdicts[:2] == [(True, None), (False, None)]
    assert verdicts[2][0] is None and "no yes/no verdict" in verdicts[2][1]
    body = server.requests[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "Question:\nWhat word?" in body["messages"][1]["content"] and "Reasoning:\nIt reads CAT" in body["messages"][1]["content"]

    down = OpenAIMismatchJudge(chat_server([(500, chat_payload(500, "overloaded"), 0.0)]).base_url, "m", max_retries=1,
                               timeout_s=5)
    down.client.backoff_s = 0.0
    assert down.agree([Case("q", "t", "a")])[0][0] is None


# --- the analyses on hand-made items ---------------------------------------------------------------
class LetterAdapter:
    """Scores 1 when the reply's <answer> (or whole text) is the truth letter; figure = mean in percent."""

    column = "Letters"

    def __init__(self, generation=None):
        self._generation = generation

    def generation(self, sample):
        return self._generation

    def score(self, sample, output):
        answer = re.search(r"<answer>(.*?)</answer>", output)
        parsed = (answer.group(1) if answer else output).strip()
        return Scored(parsed, float(parsed == sample.truth), "accuracy", sample.truth)


def item(adapter, truth, output, prompt="Which colour?\nA. red\nB. blue"):
    sample = SimpleNamespace(truth=truth, record=record(), benchmark="letters")
    return Item(sample, adapter, prompt, output, adapter.score(sample, output))


def percent_figure(benchmark, rows):
    scores = [r["score"] for r in rows if r["score"] is not None]
    return {"figure": 100.0 * sum(scores) / len(scores), "units": "percent"}


def test_text_only_answering_asks_twice_scores_under_the_protocol_and_pairs_the_conditions(chat_server, chat_payload):
    adapter = LetterAdapter(Generation(max_new_tokens=7, temperature=0.01, top_p=0.001))
    truths = ["A", "B", "A", "B"]
    outputs = ["<observation>a red ball</observation><answer>A</answer>",  # right with the video
               "<observation>a blue ball</observation><answer>A</answer>",  # wrong with the video
               "<answer>B</answer>",  # no observation, wrong with the video
               "<observation>a blue ball</observation><answer>B</answer>"]
    asked = []

    def respond(request):
        prompt = request["body"]["messages"][0]["content"]
        asked.append(request["body"])
        if "red ball" in prompt:
            return 200, chat_payload(200, "<answer>A</answer>"), 0.0
        if "blue ball" in prompt:
            return 200, chat_payload(200, "<answer>B</answer>"), 0.0
        return 200, chat_payload(200, "<answer>C</answer>"), 0.0  # from the question alone: always wrong

    server = chat_server(respond)
    analysis = TextOnlyAnswering(OpenAIChatAnswerer(server.base_url, "qwen-7b", max_retries=0))
    items = [item(adapter, t, o) for t, o in zip(truths, outputs)]
    readings = analysis.analyse(items, pl_module=None)

    assert len(asked) == 8
    assert all(b["max_tokens"] == 7 and b["temperature"] == 0.01 and b["top_p"] == 0.001 for b in asked)  # the protocol's decoding
    observation_prompts = [b["messages"][0]["content"] for b in asked if "You cannot see the video" in b["messages"][0]["content"]]
    assert len(observation_prompts) == 4 and all(p.endswith("Which colour?\nA. red\nB. blue") for p in observation_prompts)
    assert [r["observation"] for r in readings] == ["a red ball", "a blue ball", "", "a blue ball"]
    assert [r["observation_only"]["score"] for r in readings] == [1.0, 1.0, 0.0, 1.0]
    assert [r["question_only"]["parsed"] for r in readings] == ["C"] * 4

    rows = [{"score": it.scored.score, "analyses": {"text_only": r}} for it, r in zip(items, readings)]
    block = analysis.summarize({"letters": rows}, percent_figure)["benchmarks"]["letters"]
    assert (block["with_video"], block["observation_only"], block["question_only"]) == (50.0, 75.0, 0.0)
    assert block["n"] == 4 and block["failed"] == 0 and block["without_observation"] == 1
    # Paired per-sample differences in points: observation only - with video = (0, 100, 0, 0).
    assert block["observation_only_minus_with_video"] == mean_se([0.0, 100.0, 0.0, 0.0]) == {"mean": 25.0, "se": 25.0, "n": 4}
    assert block["observation_only_minus_question_only"]["mean"] == 75.0


def test_a_failed_text_answer_leaves_its_sample_out_of_every_condition(chat_server, chat_payload):
    def respond(request):
        if "blue" in request["body"]["messages"][0]["content"]:
            return 400, chat_payload(400, "bad request"), 0.0
        return 200, chat_payload(200, "<answer>A</answer>"), 0.0

    analysis = TextOnlyAnswering(OpenAIChatAnswerer(chat_server(respond).base_url, "m", max_retries=0),
                                 question_template="Question (no video): {prompt}")
    adapter = LetterAdapter()
    items = [item(adapter, "A", "<answer>A</answer>", prompt="red?"), item(adapter, "B", "<answer>A</answer>", prompt="blue?")]
    readings = analysis.analyse(items, None)
    assert "400" in readings[1]["observation_only"]["error"]
    rows = [{"score": it.scored.score, "analyses": {"text_only": r}} for it, r in zip(items, readings)]
    summary = analysis.summarize({"letters": rows}, percent_figure)
    block = summary["benchmarks"]["letters"]
    assert (block["n"], block["failed"], block["with_video"], block["question_only"]) == (1, 1, 100.0, 100.0)
    assert summary["average"] == {"with_video": 100.0, "observation_only": 100.0, "question_only": 100.0}
    assert analysis.markdown(summary).splitlines()[2] == "| letters | 1 | 100.0 | 100.0 | 100.0 |"


def test_templates_must_hold_their_fields():
    with pytest.raises(ValueError, match=r"observation_template must use exactly the fields \['observation', 'prompt'\]"):
        TextOnlyAnswering(observation_template="{prompt} only")
    with pytest.raises(ValueError, match="question_template"):
        TextOnlyAnswering(question_template="{prompt} {observation}")
    with pytest.raises(ValueError, match="share a name"):
        BenchmarkEvaluation({}, analyses=[ThinkAnswerMismatch(), ThinkAnswerMismatch()])


def test_mismatch_summary_counts_by_method_and_reason():
    items = [item(LetterAdapter(), "B", o) for o in (
        "<think>so the answer is B</think><answer>B</answer>",
        "<think>so the answer is B</think><answer>A</answer>",
        "<think>hmm</think><answer>A</answer>",
        "<answer>A</answer>",
    )]
    analysis = ThinkAnswerMismatch()
    rows = [{"analyses": {analysis.name: r}} for r in analysis.analyse(items, None)]
    block = analysis.summarize({"letters": rows, "more": rows[:2]}, percent_figure)
    assert block["benchmarks"]["letters"] == {
        "n": 4, "measured": 2, "mismatches": 1, "rate": 50.0, "se": round(100 * math.sqrt(0.25 / 2), 4),
        "by_method": {"rule": {"measured": 2, "mismatches": 1}},
        "not_measured": {"no <think>": 1, "no option concluded in <think>": 1},
    }
    assert (block["all"]["measured"], block["all"]["mismatches"]) == (4, 2)
    assert analysis.scalars(block) == {"letters/rate": 0.5, "more/rate": 0.5, "all/rate": 0.5}


# --- through the CLI -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, 8, 4, 8, seed=0, progress=False)
    return root


def run_test(synthetic: Path, out: Path, *overlays: str):
    return main(["test", "--config", str(REPO / "configs/eval.yaml"), "--config", str(REPO / "configs/tiny.yaml"),
                 "--config", str(REPO / "configs/analyses.yaml"), *overlays,
                 f"--data.test_sets={json.dumps({'synthetic': str(synthetic / 'shards/test-*.tar')})}",
                 f"--data.media_root={synthetic}", f"--trainer.default_root_dir={out}", "--trainer.logger=false",
                 "--data.num_workers=0", "--model.init_args.eval_max_new_tokens=12",
                 *(f"--model.init_args.backbone.init_args.{k}={v}" for k, v in SMALLER.items())])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def altered(rec: dict) -> str:
    """The record's own gold output with a different final answer (the reasoning unchanged)."""
    answer = re.search(r"<answer>(.*?)</answer>", rec["output"]).group(1)
    if rec["problem_type"] == "multiple choice":
        wrong = "B" if answer != "B" else "C"
    else:
        wrong = "DOG" if rec["problem_type"] == "OCR" else str(int(float(answer)) + 1)
    return rec["output"].replace(f"<answer>{answer}</answer>", f"<answer>{wrong}</answer>")


@pytest.mark.slow
def test_analyses_through_p2r_test_with_scripted_outputs_and_a_scripted_text_model(synthetic, tmp_path, monkeypatch,
                                                                                    chat_server, chat_payload):
    records = {r["id"]: r for r in json.loads((synthetic / "test.json").read_text())}
    changed = set(sorted(records)[::2])  # every other record answers against its own reasoning

    def canned(self, batch, prompts=None, generation=None):
        return [altered(records[s.record.id]) if s.record.id in changed else records[s.record.id]["output"] for s in batch]

    monkeypatch.setattr(VideoLVLMModule, "generate_answers", canned)
    by_observation = {re.search(r"<observation>(.*?)</observation>", r["output"], re.S).group(1).strip(): r for r in records.values()}

    def text_model(request):  # right from a described clip, wrong from the question alone
        prompt = request["body"]["messages"][0]["content"]
        rec = next((r for o, r in by_observation.items() if o in prompt), None)
        return 200, chat_payload(200, rec["solution"] if rec else "<answer>Z</answer>"), 0.0

    server = chat_server(text_model)
    overlay = tmp_path / "answerer.yaml"
    overlay.write_text(f"""
trainer:
  callbacks:
    - class_path: callbacks.evaluation.BenchmarkEvaluation
      init_args:
        analyses:
          - class_path: callbacks.evaluation.TextOnlyAnswering
            init_args:
              answerer: {{class_path: callbacks.evaluation.OpenAIChatAnswerer, init_args: {{base_url: "{server.base_url}", model: qwen-7b}}}}
          - class_path: callbacks.evaluation.ThinkAnswerMismatch
""")
    cli = run_test(synthetic, tmp_path, "--config", str(overlay))

    rows = {r["id"]: r for r in read_jsonl(tmp_path / "predictions.jsonl")}
    for rid, row in rows.items():
        mismatch = row["analyses"]["think_answer_mismatch"]
        assert mismatch["mismatch"] is (rid in changed), (rid, mismatch)
        assert mismatch["method"] == ("judge" if records[rid]["problem_type"] == "OCR" else "rule")
        assert row["analyses"]["text_only"]["observation_only"]["score"] == pytest.approx(1.0)  # regression: 1 - 1e-9
        assert row["analyses"]["text_only"]["question_only"]["score"] == 0.0
    results = json.loads((tmp_path / "results.json").read_text())
    mismatch = results["analyses"]["think_answer_mismatch"]["all"]
    assert (mismatch["n"], mismatch["measured"], mismatch["mismatches"]) == (8, 8, len(changed))
    assert mismatch["rate"] == 100.0 * len(changed) / 8
    text_only = results["analyses"]["text_only"]["benchmarks"]["synthetic"]
    assert text_only["with_video"] == pytest.approx(100.0 * results["results"]["synthetic"]["figure"])
    assert text_only["with_video"] == pytest.approx(100.0 * (8 - len(changed)) / 8)
    assert (text_only["observation_only"], text_only["question_only"], text_only["n"]) == (pytest.approx(100.0), 0.0, 8)
    assert results["analyses"]["text_only"]["answerer"].startswith("OpenAIChatAnswerer(")
    assert float(cli.trainer.callback_metrics["test/analysis/think_answer_mismatch/all/rate"]) == pytest.approx(0.5)


@pytest.mark.slow
def test_analyses_on_the_tiny_backbone_answer_without_the_video(synthetic, tmp_path, monkeypatch):
    asked: list[str] = []
    original = VideoLVLMModule.generate_text

    def recording(self, prompts, generation=None):
        asked.extend(prompts)
        return original(self, prompts, generation)

    monkeypatch.setattr(VideoLVLMModule, "generate_text", recording)
    run_test(synthetic, tmp_path)
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(asked) == 2 * len(rows) == 16
    assert sum(p.startswith("You cannot see the video") for p in asked) == 8
    assert set(asked) >= {r["prompt"] for r in rows}  # the question-only turn is the run's own prompt
    results = json.loads((tmp_path / "results.json").read_text())["analyses"]
    block = results["text_only"]["benchmarks"]["synthetic"]
    scores = [r["analyses"]["text_only"]["observation_only"]["score"] for r in rows]
    assert block["observation_only"] == pytest.approx(100.0 * sum(scores) / len(scores))
    assert results["text_only"]["answerer"] == "ModuleTextAnswerer()"
    assert results["think_answer_mismatch"]["all"]["n"] == 8 and results["text_only"]["not_analysed"] == {}

    # A rerun into the folder keeps the stored readings; lines made without the analyses are counted apart.
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    bare = json.loads(lines[0])
    del bare["analyses"]
    (tmp_path / "predictions.jsonl").write_text("\n".join([json.dumps(bare), *lines[1:]]) + "\n")
    asked.clear()
    run_test(synthetic, tmp_path)
    assert asked == []
    again = json.loads((tmp_path / "results.json").read_text())["analyses"]
    assert again["text_only"]["not_analysed"] == {"synthetic": 1} and again["text_only"]["benchmarks"]["synthetic"]["n"] == 7
    assert again["think_answer_mismatch"]["all"]["n"] == 7


def test_text_only_prompts_reach_the_tiny_backbone_without_media_tokens(tiny25):
    prompt = tiny25.render_prompt("What is 2+2?", None)
    assert "<|video_pad|>" not in prompt and "<|vision_start|>" not in prompt and "What is 2+2?" in prompt
    batch = tiny25.encode([prompt], [None])
    assert "pixel_values_videos" not in batch and "pixel_values" not in batch
    ids = tiny25.generate([prompt, tiny25.render_prompt("Name a colour.", None)], [None, None], max_new_tokens=3)
    assert len(ids) == 2 and all(1 <= len(x) <= 3 for x in ids)
