"""tools/judge_agreement.py: a perception judge scored against human labels (Table 4 of the paper).

Kappa and the Wilson interval against hand-worked numbers, the shipped example with the rule judge,
a scripted OpenAI-compatible server (yes / no / garbage / 500), malformed label files and --help."""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = Path(__file__).resolve().parent / "judge_labels_example.jsonl"
spec = importlib.util.spec_from_file_location("judge_agreement_tool", REPO / "tools" / "judge_agreement.py")
ja = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ja)
Confusion = ja.Confusion


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(args: list[str], capsys) -> tuple[str, dict | None]:
    assert ja.main(args) == 0
    printed = capsys.readouterr().out
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    return printed, json.loads(out.read_text()) if out else None


# ---- statistics -------------------------------------------------------------------------------------


def test_doctests():
    failures, tried = doctest.testmod(ja)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("table, expected", [
    # Wikipedia's example: p_o = 35/50 = 0.7; judge yes 25/50, human yes 30/50 -> p_e = (25*30 + 25*20)/2500 = 0.5.
    (Confusion(20, 5, 10, 15), 0.4),
    (Confusion(0, 5, 5, 0), -1.0),  # p_o = 0, p_e = 0.5
    (Confusion(6, 0, 0, 4), 1.0),  # perfect agreement with both verdicts used
    (Confusion(7, 3, 0, 0), 0.0),  # the judge always says yes: p_o = 0.7 = p_e
    (Confusion(4, 1, 2, 4), 28 / 61),  # the shipped example: p_o = 8/11, p_e = (5*6 + 6*5)/121 = 60/121
])
def test_kappa_against_hand_worked_tables(table, expected):
    assert ja.cohen_kappa(table) == pytest.approx(expected, abs=1e-12)
    a, b, c, d = table  # the closed form of 2x2 kappa: 2(ad - bc) / ((a+b)(b+d) + (a+c)(c+d))
    assert ja.cohen_kappa(table) == pytest.approx(2 * (a * d - b * c) / ((a + b) * (b + d) + (a + c) * (c + d)))


@pytest.mark.parametrize("table", [Confusion(9, 0, 0, 0), Confusion(0, 0, 0, 3), Confusion(0, 0, 0, 0)])
def test_kappa_is_undefined_when_chance_agreement_is_certain(table):
    assert math.isnan(ja.cohen_kappa(table))  # p_e == 1 (or nothing judged): 0/0, reported as undefined


def test_confusion_table_counts_judge_rows_and_human_columns():
    assert ja.confusion_table([True, True, False, False, True], [True, False, True, False, True]) == Confusion(2, 1, 1, 1)
    with pytest.raises(ValueError):
        ja.confusion_table([True], [])


def test_kappa_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        judge = [rng.random() < 0.6 for _ in range(n)]
        human = [j if rng.random() < 0.7 else not j for j in judge]
        table = ja.confusion_table(judge, human)
        if len(set(judge) | set(human)) < 2:
            continue
        assert ja.cohen_kappa(table) == pytest.approx(metrics.cohen_kappa_score(judge, human), abs=1e-12)


def test_wilson_interval():
    assert ja.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook 8/10 case
    z2 = 1.959963984540054**2
    assert ja.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # x = 0: upper bound z^2 / (n + z^2)
    low, high = ja.wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + z2))
    # 8/11 worked by hand: centre (p + z^2/2n) / (1 + z^2/n) = 0.66845, half-width 0.23409
    assert ja.wilson_interval(8, 11) == pytest.approx((0.43435, 0.90254), abs=1e-5)
    assert all(math.isnan(x) for x in ja.wilson_interval(0, 0))


# ---- the shipped example with the rule judge -----------------------------------------------------------


def test_the_example_with_the_rule_judge(tmp_path, capsys):
    printed, results = run([str(EXAMPLE), "--judge", "rule", "--out", str(tmp_path / "r.json")], capsys)
    assert "warning" not in printed  # 1 failure in 12 lines
    # By hand: 11 lines judged (ex-12 has no facts), 8 agree; disagreements: ex-06 and ex-11 (paraphrases the
    # evidence phrases miss: judge no, human yes) and ex-07 (the phrase in a negation: judge yes, human no).
    assert results["n_labels"] == 12 and results["n_judged"] == 11 and results["n_failures"] == 1
    assert results["confusion"] == {"judge_yes_human_yes": 4, "judge_yes_human_no": 1,
                                    "judge_no_human_yes": 2, "judge_no_human_no": 4}
    assert results["agreement"] == pytest.approx(8 / 11)
    assert results["kappa"] == pytest.approx(28 / 61)
    assert results["agreement_ci95"] == pytest.approx([0.43435, 0.90254], abs=1e-5)
    assert results["judge_yes_rate"] == pytest.approx(5 / 11) and results["human_yes_rate"] == pytest.approx(6 / 11)
    assert [f["id"] for f in results["failures"]] == ["ex-12"] and "facts['evidence']" in results["failures"][0]["error"]
    by_id = {row["id"]: row for row in results["lines"]}
    assert [row["id"] for row in results["lines"]] == [f"ex-{i:02d}" for i in range(1, 13)]
    assert sorted(i for i, row in by_id.items() if row["agree"] is False) == ["ex-06", "ex-07", "ex-11"]
    assert by_id["ex-04"]["verdict"] is False  # an empty observation: no, without asking
    assert by_id["ex-12"] == {"id": "ex-12", "line": 12, "label": True, "verdict": None, "agree": None,
                              "error": results["failures"][0]["error"]}
    assert "agreement: 72.7 % (8/11), 95 % CI 43.4-90.3 % (Wilson)" in printed
    assert "Cohen's kappa: 0.459" in printed
    assert "ex-12 (line 12)" in printed and "failures: 1" in printed
    table = [line.split() for line in printed.splitlines() if line.strip().startswith(("judge yes", "judge no"))]
    assert table == [["judge", "yes", "4", "1", "5"], ["judge", "no", "2", "4", "6"]]


def test_a_judge_config_file_and_a_training_config_name_the_judge(tmp_path):
    node = {"class_path": "callbacks.rewards.judges.RuleBasedJudge", "init_args": {"cache_size": 10}}
    (tmp_path / "judge.yaml").write_text(f"class_path: {node['class_path']}\ninit_args: {{cache_size: 10}}\n")
    for spec in ("rule", json.dumps(node), str(tmp_path / "judge.yaml"), node["class_path"]):
        assert type(ja.load_judge(spec)).__name__ == "RuleBasedJudge"
    assert ja.load_judge(str(tmp_path / "judge.yaml")).cache.max_entries == 10
    judge = ja.load_judge(str(REPO / "configs" / "pagrpo.yaml"))  # its PerceptionJudgeReward's judge; nothing is called
    assert type(judge).__name__ == "OpenAIChatJudge" and judge.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert ja.describe(judge).startswith("OpenAIChatJudge(base_url='http://localhost:8000/v1'")
    long_inline = json.dumps({"class_path": "callbacks.rewards.judges.OpenAIChatJudge",
                              "init_args": {"base_url": "http://127.0.0.1:1/v1", "model": "m" * 400}})
    assert ja.load_judge(long_inline).model == "m" * 400  # too long for a file name: read as JSON, not stat'ed


def test_progress_bar_on_request(capsys):
    assert ja.main([str(EXAMPLE), "--judge", "rule", "--progress", "--batch-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "judging" in err and "12/12" in err


@pytest.mark.parametrize("spec, words", [
    ('{"class_path": "callbacks.rewards.judges.NoSuchJudge"}', "cannot import"),
    ('{"class_path": "callbacks.rewards.judges.OpenAIChatJudge", "init_args": {"model": "m"}}', "base_url"),
    ('{"class_path": "collections.OrderedDict"}', "not a perception judge"),
    ("nothing-here.yaml", "cannot read"),
    ('{"judges": 3}', "expected 'rule'"),
])
def test_a_bad_judge_spec_is_a_clear_error(spec, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ja.main([str(EXAMPLE), "--judge", spec])
    assert str(exit_info.value).startswith("error: --judge:") and words in str(exit_info.value)


# ---- a scripted OpenAI-compatible server ----------------------------------------------------------------

SERVER_LABELS = [  # the reply is chosen by a word in the observation, so concurrent requests may come in any order
    {"id": "y1", "question": "What colour does the square turn?", "options": ["red", "green"], "answer": "B",
     "observation": "SAYYES the square turns green.", "label": 1},
    {"id": "y2", "question": "Q2?", "answer": 2, "observation": "SAYYES two cars.", "label": 0},
    {"id": "y3", "question": "Q3?", "answer": "a", "observation": "THINKYES it is a.", "label": True},
    {"id": "n1", "question": "Q4?", "answer": "a", "observation": "SAYNO nothing.", "label": 0},
    {"id": "n2", "question": "Q5?", "answer": "a", "observation": "SAYNO a is there.", "label": 1},
    {"id": "n3", "question": "Q6?", "answer": "a", "observation": "", "label": False},  # no request: empty means no
    {"id": "g1", "question": "Q7?", "answer": "a", "observation": "GARBAGE", "label": 1},
    {"id": "e1", "question": "Q8?", "answer": "a", "observation": "DOWN", "label": 0},
]
REPLIES = {"SAYYES": (200, "Yes."), "THINKYES": (200, "<think>no idea... no wait</think> **Yes**"),
           "SAYNO": (200, "The observation does not say, so: no"), "GARBAGE": (200, "I cannot tell."),
           "DOWN": (500, "overloaded")}


@pytest.fixture
def scripted(chat_server, chat_payload):
    def respond(request):
        user = request["body"]["messages"][1]["content"]
        observation = user.split("Observation:\n", 1)[1]
        status, text = next(v for k, v in REPLIES.items() if observation.startswith(k))
        return status, chat_payload(status, text), 0.0

    return chat_server(respond)


def test_a_scripted_server_is_parsed_and_its_failures_counted_apart(tmp_path, scripted, capsys):
    labels = write_jsonl(tmp_path / "labels.jsonl", SERVER_LABELS)
    judge = {"class_path": "callbacks.rewards.judges.OpenAIChatJudge",
             "init_args": {"base_url": scripted.base_url, "model": "judge-8b", "max_retries": 0, "timeout_s": 5,
                           "max_concurrency": 2}}
    printed, results = run([str(labels), "--judge", json.dumps(judge), "--batch-size", "3",
                            "--out", str(tmp_path / "r.json")], capsys)
    by_id = {row["id"]: row for row in results["lines"]}
    assert {i: row["verdict"] for i, row in by_id.items()} == {
        "y1": True, "y2": True, "y3": True, "n1": False, "n2": False, "n3": False, "g1": None, "e1": None}
    assert "no yes/no verdict" in by_id["g1"]["error"] and "HTTP 500" in by_id["e1"]["error"]
    assert [f["id"] for f in results["failures"]] == ["g1", "e1"] and results["n_failures"] == 2
    # Agreement over the 6 judged lines only: y1, y3, n1, n3 agree; y2 (judge yes, human no) and n2 do not.
    assert results["n_judged"] == 6 and results["agreement"] == pytest.approx(4 / 6)
    assert results["confusion"] == {"judge_yes_human_yes": 2, "judge_yes_human_no": 1,
                                    "judge_no_human_yes": 1, "judge_no_human_no": 2}
    assert results["kappa"] == pytest.approx(1 / 3)  # p_o = 2/3, p_e = (3*3 + 3*3)/36 = 1/2
    assert "judge-8b" in results["judge"] and "failures: 2" in printed and "g1 (line 7)" in printed
    assert "warning: 2 of 8 lines have no verdict" in printed  # over 10 % failed
    assert len(scripted.requests) == 7  # every non-empty observation once; no retries (max_retries 0)
    # The judge is asked what PerceptionJudgeReward asks in training: options in the question, letter + text as answer.
    [first] = [r for r in scripted.requests if "SAYYES the square" in r["body"]["messages"][1]["content"]]
    user = first["body"]["messages"][1]["content"]
    assert "Options:\nA. red\nB. green" in user and "Correct answer:\nB. green\n" in user
    assert first["body"]["model"] == "judge-8b"


def test_no_verdict_at_all_exits_1(tmp_path, scripted, capsys):
    labels = write_jsonl(tmp_path / "labels.jsonl", [r for r in SERVER_LABELS if r["id"] in ("g1", "e1")])
    judge = {"class_path": "callbacks.rewards.judges.OpenAIChatJudge",
             "init_args": {"base_url": scripted.base_url, "model": "m", "max_retries": 0, "timeout_s": 5}}
    assert ja.main([str(labels), "--judge", json.dumps(judge), "--out", str(tmp_path / "r.json")]) == 1
    printed = capsys.readouterr().out
    assert "agreement: undefined" in printed and "Cohen's kappa: undefined" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n_judged"] == 0 and results["agreement"] is None and results["kappa"] is None


def test_a_judge_that_raises_fails_its_batch_only():
    class Flaky:
        calls = 0

        def judge(self, requests):
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("gone")
            return [type("R", (), {"score": 1.0, "error": None})() for _ in requests]

    verdicts = ja.run_judge(Flaky(), list(range(5)), batch_size=2, progress=False)
    assert verdicts == [(True, None), (True, None), (None, "ConnectionError: gone"), (None, "ConnectionError: gone"), (True, None)]


# ---- malformed label files and --help ----------------------------------------------------------------------

GOOD = {"question": "Q?", "options": [], "answer": "a", "observation": "o", "label": 1}


@pytest.mark.parametrize("bad, words", [
    ('{"question": "Q?", "answer": "a"', "not valid JSON"),
    ('["a list"]', "JSON object"),
    ({k: v for k, v in GOOD.items() if k != "label"}, "missing field 'label'"),
    ({**GOOD, "label": "maybe"}, "field 'label' must be true/false or 1/0"),
    ({**GOOD, "label": 2}, "field 'label'"),
    ({**GOOD, "options": "A. x"}, "field 'options'"),
    ({**GOOD, "observation": None}, "field 'observation'"),
    ({**GOOD, "answer": ""}, "field 'answer'"),
    ({**GOOD, "question": 3}, "field 'question'"),
    ({**GOOD, "facts": ["red"]}, "field 'facts'"),
    ({**GOOD, "id": "1"}, "field 'id' '1' already used on line 1"),
])
def test_a_malformed_line_names_file_line_and_field(tmp_path, bad, words):
    path = write_jsonl(tmp_path / "labels.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(SystemExit) as exit_info:
        ja.main([str(path), "--judge", "rule"])
    message = str(exit_info.value)
    assert message.startswith(f"error: {path}:3: ") and words in message


def test_skip_bad_leaves_malformed_lines_out_and_lists_them(tmp_path, capsys):
    rows = [{**GOOD, "id": "a", "facts": {"evidence": [["o"]]}}, {**GOOD, "label": "maybe"}, "{oops",
            {**GOOD, "id": "b", "facts": {"evidence": [["o"]]}}]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    printed, results = run([str(path), "--judge", "rule", "--skip-bad", "--out", str(tmp_path / "r.json")], capsys)
    assert [row["id"] for row in results["lines"]] == ["a", "b"]
    assert len(results["skipped_lines"]) == 2 and results["skipped_lines"][0].startswith(f"{path}:2: field 'label'")
    assert results["skipped_lines"][1].startswith(f"{path}:3: not valid JSON")
    # Judge and humans both say yes to both lines: agreement 1, but p_e = 1 and kappa is undefined.
    assert results["agreement"] == 1.0 and results["kappa"] is None
    assert "2 malformed lines skipped" in printed and "Cohen's kappa: undefined" in printed


def test_an_empty_or_missing_labels_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for path, words in ((tmp_path / "empty.jsonl", "no labelled lines"), (tmp_path / "absent.jsonl", "cannot read")):
        with pytest.raises(SystemExit) as exit_info:
            ja.main([str(path), "--judge", "rule"])
        assert words in str(exit_info.value)


def test_help_and_exact_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ja.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--judge", "--out", "--batch-size", "--skip-bad", "--progress"):
        assert flag in text
    with pytest.raises(SystemExit):
        ja.main([str(EXAMPLE), "--judge", "rule", "--skip"])  # a prefix is not a flag
    assert "unrecognized arguments: --skip" in capsys.readouterr().err
