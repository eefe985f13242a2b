"""The synthetic data set: reproducible, answerable only by looking, and its videos show its facts."""

from __future__ import annotations

import json
import runpy
from collections import Counter, defaultdict
from pathlib import Path

import decord
import numpy as np
import pytest
import webdataset as wds

from callbacks.rewards.judges import evidence_satisfied
from p2r.data.records import parse_record, target_text
from p2r.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    OCR_WORDS,
    QUADRANTS,
    TASKS,
    VideoSpec,
    generate_split,
    make_synthetic,
)

REPO = Path(__file__).resolve().parents[2]
SIZES = {"n_train": 40, "n_val": 8, "n_test": 8}
SPEC = VideoSpec()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, **SIZES, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def large_split():
    """Records only (no video): enough of every task to check balance and evidence."""
    return [record for record, _ in generate_split("train", 600, seed=1, spec=SPEC)]


def load(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text(encoding="utf-8"))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_other_seed_does_not(dataset, tmp_path):
    make_synthetic(tmp_path / "again", **SIZES, seed=3, progress=False)
    assert all_files(tmp_path / "again") == all_files(dataset)
    make_synthetic(tmp_path / "other", **SIZES, seed=4, progress=False)
    assert load(tmp_path / "other", "train") != load(dataset, "train")


def test_layout_and_records_parse(dataset):
    for split, n in zip(("train", "val", "test"), SIZES.values()):
        raw = load(dataset, split)
        assert len(raw) == n
        for i, row in enumerate(raw):
            rec = parse_record(row, where=f"{split}[{i}]")
            assert (dataset / rec.path).stat().st_size > 0
            assert rec.path == f"videos/{rec.id}.mp4"
            assert rec.data_source == "synthetic"
            assert rec.solution == f"<answer>{rec.answer}</answer>"
            assert target_text(rec) == rec.output
            assert rec.output == f"{rec.observation}\n{rec.process}\n<answer>{rec.answer}</answer>"
    ids = [r["id"] for s in ("train", "val", "test") for r in load(dataset, s)]
    assert len(set(ids)) == len(ids)


def test_shards_hold_every_record_with_its_video(dataset):
    for split in ("train", "val", "test"):
        by_id = {r["id"]: r for r in load(dataset, split)}
        samples = list(wds.WebDataset(str(dataset / "shards" / f"{split}-000000.tar"), shardshuffle=False))
        assert [json.loads(s["json"])["id"] for s in samples] == list(by_id)
        for s in samples:
            meta = json.loads(s["json"])
            assert meta == by_id[meta["id"]]
            assert s["mp4"] == (dataset / meta["path"]).read_bytes()


def segment_words(text: str, tag: str) -> int:
    return len(text.removeprefix(f"<{tag}>").removesuffix(f"</{tag}>").split())


def test_reference_traces_are_short_and_sufficient(large_split):
    for rec in large_split:
        assert evidence_satisfied(rec.observation, rec.facts["evidence"]), rec.id
        assert 12 <= segment_words(rec.observation, "observation") <= 60, rec.observation
        assert 12 <= segment_words(rec.process, "think") <= 60, rec.process


def test_observation_of_a_different_answer_is_not_sufficient(large_split):
    """Evidence must pin the answer: the reference observation of any clip of the same task with
    another answer omits the key fact, so it must fail this clip's evidence."""
    by_task = defaultdict(list)
    for rec in large_split:
        by_task[rec.facts["task"]].append(rec)
    checked = 0
    for recs in by_task.values():
        for rec in recs:
            others = [o for o in recs if o.facts["answer_text"] != rec.facts["answer_text"]][:25]
            for other in others:
                assert not evidence_satisfied(other.observation, rec.facts["evidence"]), (rec.id, other.id)
                checked += 1
    assert checked > 5000


def test_evidence_needs_the_event_not_just_the_scene(large_split):
    first = {rec.facts["task"]: rec for rec in reversed(large_split)}
    motion, count, change = first["motion_direction"], first["count"], first["colour_change"]
    shape = motion.facts["shapes"][0]
    assert not evidence_satisfied(f"A {shape['colour']} {shape['shape']} is on a plain background.", motion.facts["evidence"])
    names = ", ".join(f"a {s['colour']} {s['shape']}" for s in count.facts["shapes"])
    assert not evidence_satisfied(f"Shapes appear one after another: {names}.", count.facts["evidence"])
    n = count.facts["count"]
    assert evidence_satisfied(f"I SEE\n{n} SHAPE{'S' if n > 1 else ''}.", count.facts["evidence"])
    assert not evidence_satisfied(f"I see {n}0 shapes.", count.facts["evidence"])
    before = change.facts["shapes"][0]["colour"]
    assert not evidence_satisfied(f"The shape is {before} at first.", change.facts["evidence"])


def test_rule_based_judge_agrees_with_generation_check(large_split):
    """Training scores these records with the callbacks' RuleBasedJudge: it must give the same
    verdicts as the check used at generation, on reference and on other clips' observations."""
    from callbacks.rewards.judges import JudgeRequest, RuleBasedJudge

    pairs = [(rec, obs.observation) for rec, obs in zip(large_split, large_split[1:] + large_split[:1])]
    pairs += [(rec, rec.observation) for rec in large_split]
    judge = RuleBasedJudge(cache_size=0)
    # One call per request: a batch merges requests with equal (question, answer, observation)
    # even when their facts differ, and here many share a question and an answer letter.
    scores = [judge.judge([JudgeRequest(rec.problem, rec.answer, text, rec.facts)])[0].score for rec, text in pairs]
    expected = [float(evidence_satisfied(text, rec.facts["evidence"])) for rec, text in pairs]
    assert scores == expected
    assert scores[len(large_split):] == [1.0] * len(large_split)
    assert 0 < sum(scores[: len(large_split)]) < 0.5 * len(large_split)


def test_ocr_words_appear_only_in_their_own_clips(large_split):
    for rec in large_split:
        if rec.facts["task"] != "ocr":
            text = f"{rec.problem} {rec.observation} {rec.process} {' '.join(rec.options)}".lower()
            assert not any(word.lower() in text for word in OCR_WORDS), rec.id


def test_answers_are_balanced_and_not_in_the_question(large_split):
    letters, values = defaultdict(Counter), defaultdict(Counter)
    for rec in large_split:
        task = rec.facts["task"]
        assert rec.facts["answer_text"].lower() not in rec.problem.lower(), rec.id
        if rec.problem_type == "multiple choice":
            assert len(rec.options) == 4
            assert rec.options["ABCD".index(rec.answer)] == f"{rec.answer}. {rec.facts['answer_text']}"
            letters[task][rec.answer] += 1
        else:
            values[task][rec.answer] += 1
    assert set(letters) == {"motion_direction", "colour_change", "first_appearance", "disappearance"}
    for counts in letters.values():
        assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 1
    for task in ("count", "distance", "ocr"):
        assert max(values[task].values()) - min(values[task].values()) <= 1
    assert set(values["count"]) == {"1", "2", "3", "4"}


def test_mix_is_mostly_multiple_choice_and_counting(large_split):
    kinds = Counter(rec.problem_type for rec in large_split)
    assert set(kinds) == {"multiple choice", "numerical", "OCR", "free-form", "regression"}
    assert (kinds["multiple choice"] + kinds["numerical"]) / len(large_split) >= 0.7
    assert Counter(rec.facts["task"] for rec in large_split).keys() == TASKS.keys()


def foreground(frame: np.ndarray, background: str) -> np.ndarray:
    """Mask of pixels that clearly differ from the plain background (codec noise ignored)."""
    return np.abs(frame.astype(int) - np.array(BACKGROUNDS[background])).sum(-1) > 90


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def decode(dataset: Path, rec: dict) -> np.ndarray:
    reader = decord.VideoReader(str(dataset / rec["path"]))
    assert len(reader) == SPEC.frames
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert frames.shape == (SPEC.frames, SPEC.size, SPEC.size, 3)
    return frames


def test_every_video_decodes_to_the_expected_frames(dataset):
    for split in ("train", "val", "test"):
        for rec in load(dataset, split):
            decode(dataset, rec)


def test_videos_show_their_facts(dataset):
    records = load(dataset, "train") + load(dataset, "val") + load(dataset, "test")
    seen = Counter()
    for rec in records:
        facts, task = rec["facts"], rec["facts"]["task"]
        frames = decode(dataset, rec)
        first, last = foreground(frames[0], facts["background"]), foreground(frames[-1], facts["background"])
        if task in ("motion_direction", "description"):
            step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[facts["direction"]]
            moved = centroid(last) - centroid(first)
            assert moved @ np.array(step) > 0.5 * SPEC.size, (rec["id"], moved)
        elif task == "count":
            occupied = sum(
                last[int(fy * SPEC.size) - 4 : int(fy * SPEC.size) + 4, int(fx * SPEC.size) - 4 : int(fx * SPEC.size) + 4].any()
                for fx, fy in QUADRANTS.values()
            )
            assert occupied == facts["count"] and not first.all()
        elif task == "colour_change":
            shape = facts["shapes"][0]
            cx, cy = (int(v) for v in shape["start"])
            for frame, name in ((frames[0], shape["colour"]), (frames[-1], shape["colour_after"])):
                patch = frame[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3).mean(0)
                nearest = min(COLOURS, key=lambda c: np.abs(patch - COLOURS[c]).sum())
                assert nearest == name, (rec["id"], patch)
        else:
            continue
        seen[task] += 1
    assert set(seen) >= {"motion_direction", "count", "colour_change"}


def test_cli_writes_dataset_and_reports_time(tmp_path, capsys):
    tool = runpy.run_path(str(REPO / "tools" / "make_synthetic.py"), run_name="make_synthetic")
    assert tool["main"](["--out", str(tmp_path), "--train", "6", "--val", "2", "--test", "0", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "made 8 clips in" in out
    assert f"shards: {tmp_path / 'shards' / 'train-000000.tar'}" in out
    assert len(load(tmp_path, "train")) == 6 and load(tmp_path, "test") == []
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 8


TESTBED_TASKS = ("motion_direction", "colour_change", "first_appearance", "disappearance", "count")


def test_terse_traces_name_the_observed_value_and_noise_changes_only_the_trace():
    """The RL testbed's data: terse traces; a noisy teacher's trace observes a wrong value and answers
    from it, while the clip, the question, the options and the solution stay those of the clean split."""
    clean = [r for r, _ in generate_split("train", 300, seed=5, spec=SPEC, tasks=TESTBED_TASKS, style="terse")]
    noisy = [r for r, _ in generate_split("train", 300, seed=5, spec=SPEC, tasks=TESTBED_TASKS, style="terse",
                                          observation_noise=0.3)]
    assert {r.facts["task"] for r in clean} == set(TESTBED_TASKS)
    wrong = 0
    for c, n in zip(clean, noisy):
        assert (c.problem, c.options, c.solution, c.facts["shapes"]) == (n.problem, n.options, n.solution, n.facts["shapes"])
        observation = n.observation.removeprefix("<observation>").removesuffix("</observation>")
        assert evidence_satisfied(observation, n.facts["evidence"]) == n.facts["trace_correct"]
        answer = n.output.rsplit("<answer>", 1)[1].removesuffix("</answer>")
        assert (f"<answer>{answer}</answer>" == n.solution) == n.facts["trace_correct"]
        wrong += not n.facts["trace_correct"]
        assert c.facts["trace_correct"] and len(c.output) < 160
    assert 0.2 < wrong / len(noisy) < 0.4
    # A worked record: the colour-change clip turning green whose noisy trace reads a distractor.
    example = next(n for n in noisy if n.facts["task"] == "colour_change" and not n.facts["trace_correct"])
    seen = example.observation.removeprefix("<observation>It turns ").removesuffix(".</observation>")
    letter = next(o[0] for o in example.options if o.endswith(f". {seen}"))
    assert example.output == (f"<observation>It turns {seen}.</observation>\n<think>So the answer is {seen}. "
                              f"That is option {letter}.</think>\n<answer>{letter}</answer>")
    assert seen != example.facts["answer_text"]


def test_noise_reaches_only_the_training_split(tmp_path):
    splits = make_synthetic(tmp_path, 30, 10, 10, seed=1, tasks=TESTBED_TASKS, style="terse", observation_noise=1.0,
                            progress=False)
    assert not any(r.facts["trace_correct"] for r in splits["train"].records)
    assert all(r.facts["trace_correct"] for r in splits["val"].records + splits["test"].records)


def test_terse_style_refuses_tasks_it_cannot_write_and_bad_noise():
    with pytest.raises(ValueError, match="no terse trace"):
        generate_split("train", 20, seed=0, spec=SPEC, tasks=("description",), style="terse")
    with pytest.raises(ValueError, match="observation_noise"):
        generate_split("train", 20, seed=0, spec=SPEC, observation_noise=1.5)
    with pytest.raises(ValueError, match="needs style='terse'"):
        generate_split("train", 20, seed=0, spec=SPEC, observation_noise=0.2)
