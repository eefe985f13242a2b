"""The three-step CoT pipeline: the tiny backbone as teacher, a scripted OpenAI-compatible teacher on
127.0.0.1, resuming, the reply cache across a crash, the shards of the kept records, the table."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from callbacks.rewards.judges import Judge, RuleBasedJudge
from p2r.cot.pipeline import (
    OUTPUT_FILE,
    REPLIES_FILE,
    RecordFileSource,
    ShardSource,
    cut_torn_tail,
    run_pipeline,
    verify,
)
from p2r.cot.prompt import teacher_prompt
from p2r.cot.stats import Row, format_table, summarize
from p2r.cot.teachers import Teacher, TeacherReply, TeacherRequest
from p2r.data.records import VideoRecord, parse_record
from p2r.data.shards import safe_key
from p2r.data.synthetic import make_synthetic
from p2r.data.video import Clip, FrameSampling, fit_pixels

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "generate_cot.py"
SECRET = "sk-teacher-DO-NOT-LEAK-0987654321"
KEY_ENV = "P2R_TEST_TEACHER_KEY"


def generate_cot(*args: str) -> int:
    """tools/generate_cot.py in-process."""
    return runpy.run_path(str(TOOL), run_name="generate_cot")["main"]([*args, "--no-progress"])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())["summary"]


def expected_groups(records: list[dict], fates: dict[str, tuple[str, str] | None]) -> dict:
    """The per problem type / data type part of the table, counted directly from each record's fate."""
    steps = ("generation", "verification", "sufficiency")
    out: dict = {"problem_type": {}, "data_type": {}}
    for rec in records:
        if rec["id"] not in fates:
            continue
        fate = fates[rec["id"]]
        for kind in ("problem_type", "data_type"):
            group = out[kind].setdefault(rec[kind], {"in": 0, "generated": 0, "passed_step2": 0, "kept": 0, "dropped": {}})
            group["in"] += 1
            reached = 3 if fate is None else steps.index(fate[0])
            group["generated"] += reached >= 1
            group["passed_step2"] += reached >= 2
            group["kept"] += fate is None
            if fate is not None:
                by_step = group["dropped"].setdefault(fate[0], {})
                by_step[fate[1]] = by_step.get(fate[1], 0) + 1
    return out


@pytest.fixture
def synthetic(tmp_path) -> tuple[Path, list[dict]]:
    root = tmp_path / "synthetic"
    make_synthetic(root, 8, 2, 2, seed=0, progress=False)
    return root, json.loads((root / "train.json").read_text())


# ---- the tiny backbone as teacher: random weights, nearly everything fails, the counts add up ----------


def test_tiny_backbone_teacher_end_to_end(synthetic, tiny_sizes, tmp_path, capsys):
    root, records = synthetic
    (root / "videos" / "broken.mp4").write_bytes(b"this is not an mp4 file")
    records = records + [
        {**records[0], "id": "broken-video", "path": "videos/broken.mp4"},
        {**records[1], "id": "missing-video", "path": "videos/nowhere.mp4"},
    ]
    (tmp_path / "in.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    args = ["--records", str(tmp_path / "in.json"), "--media-root", str(root), "--out", str(out),
            "--teacher", "backbone", "--backbone-class", "p2r.backbones.TinyQwen25VL",
            "--backbone-args", json.dumps(tiny_sizes), "--batch-size", "3", "--max-new-tokens", "12",
            "--frames", "4", "--judge", "rule"]
    assert generate_cot(*args) == 0
    printed = capsys.readouterr().out

    # 8 records reach the teacher; random weights cannot write the template, so step 2 drops them all.
    fates = {r["id"]: ("verification", "malformed trace") for r in records[:8]}
    fates["broken-video"] = ("generation", "undecodable media")
    summary = stats(out)
    assert summary["all"] == {"in": 9, "generated": 8, "passed_step2": 0, "kept": 0, "dropped": {
        "generation": {"undecodable media": 1}, "verification": {"malformed trace": 8}}}
    assert {k: summary[k] for k in ("problem_type", "data_type")} == expected_groups(records, fates)

    written = lines(out / OUTPUT_FILE)
    replies = {r["id"]: r for r in lines(out / REPLIES_FILE)}
    assert sorted(r["id"] for r in written) == sorted(fates)  # each finished id once; the missing video never entered
    assert sorted(replies) == sorted(r["id"] for r in records[:8])
    for line in written:
        assert (line["dropped_at"], line["drop_reason"]) == fates[line["id"]] and line["select"] is False
        if line["id"] == "broken-video":
            assert line["output"] == "" and line["reward"] is None and "broken" in line["drop_detail"]
        else:  # the teacher's decoded text is kept, and the task score was computed on it
            assert line["output"] == replies[line["id"]]["text"].strip() and 0.0 <= line["reward"] <= 1.0
            assert line["observation"] == "" and line["process"] == ""  # not the record's reference trace
    # 12 tokens of a random model: replies that did not end by themselves say so
    assert any(r["truncated"] for r in replies.values())
    assert all(("token limit" in line["drop_detail"]) == replies[line["id"]]["truncated"] for line in written if line["id"] in replies)
    assert not list((out / "shards").glob("*.tar"))
    assert "1 unusable record(s)" in printed and "media file not found" in printed
    assert "2 verification: malformed trace" in printed and "asked the teacher 8 time(s)" in printed

    # Rerunning asks nothing and changes nothing.
    assert generate_cot(*args) == 0
    assert "9 finished before this run; this run asked the teacher 0 time(s)" in capsys.readouterr().out
    assert lines(out / OUTPUT_FILE) == written and stats(out) == summary


# ---- a scripted OpenAI-compatible teacher on 127.0.0.1 -------------------------------------------


def per_item(scripts: dict[int, list[tuple[int, str, float]]], chat_payload):
    """A fake server's ``respond``: the text part holds "(item N)", and ``scripts[N]`` is a list of
    (status, reply, delay_s) used in turn, the last one repeating; each request is tagged with its item."""
    scripts = {k: list(v) for k, v in scripts.items()}

    def respond(request: dict) -> tuple[int, bytes, float]:
        text = request["body"]["messages"][-1]["content"][-1]["text"]
        request["item"] = item = int(re.search(r"\(item (\d+)\)", text).group(1))
        script = scripts[item]
        status, reply, delay = script.pop(0) if len(script) > 1 else script[0]
        return status, chat_payload(status, reply), delay

    return respond


def asked(server) -> Counter:
    """How many times the teacher was asked about each item."""
    return Counter(r["item"] for r in server.requests)


def wrong_answer(rec: dict) -> str:
    if rec["problem_type"] == "multiple choice":
        right = rec["solution"].removeprefix("<answer>").removesuffix("</answer>")
        return "B" if right == "A" else "A"
    return "-12345"  # scores 0 under every other metric


IMAGE_REPLY = ("<observation>A red square sits in the middle of a white picture.</observation>\n"
               "<think>The only square is red, which is option B.</think>\n<answer>B</answer>")


def scripted_records(root: Path, records: list[dict]) -> tuple[list[dict], dict]:
    """Nine records (8 videos + 1 image) tagged "(item N)", and what the teacher says for each."""
    records = [{**r, "problem": f"(item {i}) {r['problem']}"} for i, r in enumerate(records)]
    records[7].pop("facts")  # the rule judge cannot judge it: a judge failure, retried every run
    (root / "images").mkdir()
    picture = Image.new("RGB", (64, 64), (240, 240, 240))
    picture.paste((230, 30, 30), (16, 16, 48, 48))
    picture.save(root / "images" / "square.jpg", quality=95)
    records.append({"id": "image-square", "problem": "(item 8) What colour is the square?", "problem_type": "multiple choice",
                    "options": ["A. blue", "B. red", "C. green", "D. yellow"], "solution": "<answer>B</answer>",
                    "data_type": "image", "path": "images/square.jpg", "facts": {"evidence": [["red square", "square is red"]]}})
    ok = lambda i: (200, records[i]["output"], 0.0)  # the synthetic reference trace: right and sufficient
    scripts = {
        0: [ok(0)],
        1: [ok(1)],
        2: [(200, f"{records[2]['observation']}\n{records[2]['process']}\n<answer>{wrong_answer(records[2])}</answer>", 0.0)],
        3: [(200, f"<observation>Something happens in the video.</observation>\n{records[3]['process']}\n{records[3]['solution']}", 0.0)],
        4: [(200, "I think the answer is B.", 0.0)],
        5: [(500, "overloaded", 0.0), ok(5)],
        # run 2: a timeout, then a 503 that echoes the key (both attempts fail); run 3: answered
        6: [(200, records[6]["output"], 2.5), (503, f"overloaded, key {SECRET}", 0.0), ok(6)],
        7: [ok(7)],
        8: [(200, IMAGE_REPLY, 0.0)],
    }
    return records, scripts


def test_openai_teacher_request_format_retries_resume_stats_and_shards(
    synthetic, tmp_path, monkeypatch, capsys, caplog, chat_server, chat_payload
):
    root, base = synthetic
    records, scripts = scripted_records(root, base)
    ids = [r["id"] for r in records]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = chat_server(per_item(scripts, chat_payload))
    out = tmp_path / "out"
    args = ["--records", str(tmp_path / "in.jsonl"), "--media-root", str(root), "--out", str(out),
            "--teacher", "openai", "--base-url", server.base_url, "--model", "teacher-model", "--api-key-env", KEY_ENV,
            "--concurrency", "4", "--timeout", "1.5", "--max-retries", "1", "--backoff", "0.01", "--max-new-tokens", "300",
            "--frames", "4", "--judge", "rule"]
    caplog.set_level(logging.DEBUG)
    try:
        # Run 1 stops after 4 records, as if killed there.
        assert generate_cot(*args, "--limit", "4") == 0
        assert asked(server) == Counter({0: 1, 1: 1, 2: 1, 3: 1})
        assert [r["id"] for r in lines(out / OUTPUT_FILE)] == ids[:4]
        assert stats(out)["all"] == {"in": 4, "generated": 4, "passed_step2": 3, "kept": 2, "dropped": {
            "verification": {"low answer score": 1}, "sufficiency": {"insufficient observation": 1}}}

        # Run 2 goes on from there: item 6 fails twice on the teacher side, item 7 on the judge side.
        assert generate_cot(*args) == 3
        assert asked(server) == Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1, 8: 1})
        fates = {ids[0]: None, ids[1]: None, ids[2]: ("verification", "low answer score"),
                 ids[3]: ("sufficiency", "insufficient observation"), ids[4]: ("verification", "malformed trace"),
                 ids[5]: None, ids[6]: ("generation", "teacher error"), ids[7]: ("sufficiency", "judge error"), ids[8]: None}
        summary = stats(out)
        assert summary["all"] == {"in": 9, "generated": 8, "passed_step2": 6, "kept": 4, "dropped": {
            "generation": {"teacher error": 1}, "verification": {"low answer score": 1, "malformed trace": 1},
            "sufficiency": {"insufficient observation": 1, "judge error": 1}}}
        assert {k: summary[k] for k in ("problem_type", "data_type")} == expected_groups(records, fates)
        assert sorted(r["id"] for r in lines(out / OUTPUT_FILE)) == sorted(set(ids) - {ids[6], ids[7]})
        printed = capsys.readouterr().out
        assert "2 record(s) to retry" in printed and "***" in printed  # the echoed key is redacted

        # Run 3 asks only for item 6; item 7's stored answer is judged again without asking.
        assert generate_cot(*args) == 3
        assert asked(server) == Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3, 7: 1, 8: 1})
        assert "asked the teacher 1 time(s) and reused 1 stored answer(s)" in capsys.readouterr().out
    finally:
        server.close()
    fates[ids[6]] = None
    summary = stats(out)
    assert summary["all"] == {"in": 9, "generated": 9, "passed_step2": 7, "kept": 5, "dropped": {
        "verification": {"low answer score": 1, "malformed trace": 1},
        "sufficiency": {"insufficient observation": 1, "judge error": 1}}}
    assert {k: summary[k] for k in ("problem_type", "data_type")} == expected_groups(records, fates)

    # The output: each finished id once, in the release layout, with the step that dropped it.
    written = {r["id"]: r for r in lines(out / OUTPUT_FILE)}
    assert len(lines(out / OUTPUT_FILE)) == 8 and set(written) == set(ids) - {ids[7]}
    assert len(lines(out / REPLIES_FILE)) == 9  # every answer stored once, item 7's included
    for i in (0, 1, 5, 6):
        line = written[ids[i]]
        assert line["select"] is True and line["reward"] == 1.0 and line["sufficient"] is True
        assert line["output"] == records[i]["output"] and line["observation"] == records[i]["observation"]
        assert line["process"] == records[i]["process"] and line["dropped_at"] is None and line["facts"] == records[i]["facts"]
    assert (written[ids[2]]["select"], written[ids[2]]["reward"], written[ids[2]]["drop_reason"]) == (False, 0.0, "low answer score")
    assert written[ids[3]]["reward"] == 1.0 and written[ids[3]]["sufficient"] is False
    assert written[ids[4]]["observation"] == "" and written[ids[4]]["output"] == "I think the answer is B."

    # The request format: frames as JPEG data URLs in time order, then the text; the model; the key header.
    frames = FrameSampling(fps=2.0, min_frames=4, max_frames=4)
    height, width = fit_pixels(64, 64, frames)
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
        body = request["body"]
        assert body["model"] == "teacher-model" and body["temperature"] == 0.0 and body["max_tokens"] == 300
        [message] = body["messages"]
        *images, text = message["content"]
        assert message["role"] == "user" and text["type"] == "text"
        assert len(images) == (1 if request["item"] == 8 else 4)
        for part in images:
            assert part["type"] == "image_url"
            url = part["image_url"]["url"]
            assert url.startswith("data:image/jpeg;base64,")
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
                assert image.format == "JPEG" and image.size == (width, height)
        record = parse_record(records[request["item"]])
        assert teacher_prompt(record) in text["text"]
        assert ("frames of one video, in time order" in text["text"]) == (request["item"] != 8)

    # The kept records as shards: their traces, and media bytes equal to the source files.
    kept = [ids[i] for i in (0, 1, 5, 6, 8)]
    samples = list(wds.WebDataset(str(out / "shards" / "train-000000.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [safe_key(i) for i in kept]
    for sample, record_id in zip(samples, kept):
        source = records[ids.index(record_id)]
        ext = "jpg" if source["data_type"] == "image" else "mp4"
        assert sample[ext] == (root / source["path"]).read_bytes()
        meta = json.loads(sample["json"])
        assert meta["select"] is True and meta["output"] == written[record_id]["output"]

    # The key never reaches a file, the printed report or the logs.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in capsys.readouterr().out + caplog.text


# ---- a crash between the teacher's answer and the judge loses no answer ---------------------------


class ReferenceTeacher(Teacher):
    """Answers every record with its synthetic reference trace, three at a time; remembers who it was asked for."""

    chunk_size = 3

    def __init__(self, references: dict[str, str]):
        self.references = references
        self.asked: list[str] = []

    def _answer(self, requests, deliver):
        for i, request in enumerate(requests):
            self.asked.append(request.id)
            deliver(i, TeacherReply(text=self.references[request.id]))


class CrashingJudge(Judge):
    def _judge_uncached(self, requests):
        raise KeyboardInterrupt  # not an Exception: it gets through every guard, like a kill


def test_crash_after_the_answers_reuses_them(synthetic, tmp_path):
    root, records = synthetic
    source = RecordFileSource(root / "train.json", root)
    teacher = ReferenceTeacher({r["id"]: r["output"] for r in records})
    out = tmp_path / "out"
    frames = FrameSampling(max_frames=4)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(source, teacher, CrashingJudge(), out, frames=frames, progress=False)
    assert teacher.asked == [r["id"] for r in records[:3]]
    assert len(lines(out / REPLIES_FILE)) == 3 and (out / OUTPUT_FILE).read_text() == ""
    with open(out / OUTPUT_FILE, "a") as f:  # and a line torn by the crash
        f.write('{"id": "synthetic-train-000000", "problem": "How')

    report = run_pipeline(source, teacher, RuleBasedJudge(), out, frames=frames, progress=False)
    assert teacher.asked == [r["id"] for r in records]  # the first three were not asked again
    assert (report.asked, report.reused, report.skipped) == (5, 3, 0)
    written = lines(out / OUTPUT_FILE)
    assert [r["id"] for r in written] == [r["id"] for r in records]
    assert all(r["select"] for r in written)  # the synthetic reference traces pass all three steps
    assert report.summary().all.kept == 8 and len(report.shards) == 1


def test_shards_in_shards_out(synthetic, tmp_path):
    root, records = synthetic
    source = ShardSource(str(root / "shards" / "train-*.tar"))
    teacher = ReferenceTeacher({r["id"]: r["output"] for r in records})
    report = run_pipeline(source, teacher, RuleBasedJudge(), tmp_path / "out", frames=FrameSampling(max_frames=4),
                          limit=5, samples_per_shard=2, progress=False)
    assert teacher.asked == [r["id"] for r in records[:5]] and report.kept == 5 and not report.rejected
    samples = list(wds.WebDataset([str(p) for p in report.shards], shardshuffle=False, empty_check=False))
    assert len(report.shards) == 3 and [s["__key__"] for s in samples] == [r["id"] for r in records[:5]]
    for sample, rec in zip(samples, records):
        assert sample["mp4"] == (root / rec["path"]).read_bytes()
        assert json.loads(sample["json"])["output"] == rec["output"]


def test_shard_source_reads_hostile_shards_as_training_does(synthetic, tmp_path):
    """One reader for every shard consumer: a damaged shard keeps the samples before the damage, a
    link member is never followed, a shard that is not a tar is named; all land in ``rejected``."""
    import tarfile

    root, records = synthetic
    first = sorted((root / "shards").glob("train-*.tar"))[0]
    data = first.read_bytes()
    (tmp_path / "a-cut.tar").write_bytes(data[: len(data) * 2 // 3])  # truncated part-way
    with tarfile.open(tmp_path / "b-link.tar", "w") as tar:
        link = tarfile.TarInfo("evil.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (tmp_path / "c-not-a-tar.tar").write_bytes(b"not a tar at all" * 64)
    source = ShardSource(str(tmp_path / "*.tar"))
    kept = [item.record.id for item in source]
    assert kept and kept == [r["id"] for r in records[: len(kept)]]  # the samples before the damage, in order
    reasons = sorted(reason for _, reason in source.rejected)
    expected = ["not a tar file", "shard damaged part-way", "symbolic link member (links are not followed)"]
    assert len(reasons) == 3 and all(r.startswith(k) for r, k in zip(reasons, expected)), reasons
    assert {where.split(":")[0] for where, _ in source.rejected} == {str(tmp_path / n) for n in ("a-cut.tar", "b-link.tar", "c-not-a-tar.tar")}
    with pytest.raises(FileNotFoundError, match=r"--shards: no file matches"):
        ShardSource(str(tmp_path / "missing-*.tar"))


# ---- the pure parts ------------------------------------------------------------------------------

NUMERICAL = VideoRecord(id="n", problem="How many cups?", problem_type="numerical", data_type="video",
                        path="v.mp4", solution="<answer>3</answer>")


@pytest.mark.parametrize("text, reason, reward", [
    ("<observation>three cups</observation>\n<think>so 3</think>\n<answer>3</answer>", None, 1.0),
    ("<observation>three cups</observation><think>so 3.004</think><answer>3.004</answer>", "low answer score", 0.0),  # decimal rule
    ("<observation>three cups</observation>\n<think>so 4</think>\n<answer>4</answer>", "low answer score", 0.0),
    ("<think>so 3</think>\n<answer>3</answer>", "malformed observation", 1.0),
    ("<observation>three cups</observation>\n<answer>3</answer>", "malformed think/answer", 1.0),
    ("<observation>three cups</observation>\n<think>so 3</think>\n<answer>3</answer> Hope this helps", "malformed think/answer", 1.0),
    ("3", "malformed trace", 0.0),  # untagged: no answer block to score (Video-R1's reading), and the format drops it
    ("Sure. <observation>three cups</observation><think>so 3</think><answer>3</answer>", "malformed think/answer", 1.0),
    ("   ", "malformed trace", 0.0),
])
def test_verify(text, reason, reward):
    outcome = verify(text, NUMERICAL, min_score=0.6)
    assert (outcome.dropped_at, outcome.reason, outcome.reward) == (None if reason is None else "verification", reason, reward)


def test_verify_min_score_and_truncation():
    free = VideoRecord(id="f", problem="Describe it.", problem_type="free-form", data_type="video", path="v.mp4",
                       solution="<answer>a red circle moves left</answer>")
    text = "<observation>a red circle</observation><think>it moves</think><answer>a red circle moves</answer>"
    score = verify(text, free, min_score=0.0).reward
    assert 0.6 < score < 1.0
    assert verify(text, free, min_score=score).dropped_at is None
    assert verify(text, free, min_score=score + 1e-6).reason == "low answer score"
    assert "token limit" in verify("<observation>a red", free, 0.6, truncated=True).detail


def test_teacher_prompt_states_the_rules_but_not_the_answer():
    ocr = VideoRecord(id="o", problem="What word is written?", problem_type="OCR", data_type="video", path="v.mp4",
                      solution="<answer>ZEBRA</answer>")
    prompt = teacher_prompt(ocr)
    assert "What word is written?" in prompt and "ZEBRA" not in prompt
    assert "<observation>...</observation>\n<think>...</think>\n<answer>...</answer>" in prompt
    assert "only what your observation says" in prompt and "exact text only" in prompt


def test_summary_counts_add_up_and_table_lists_every_drop():
    rows = [Row("numerical", "video"), Row("numerical", "image", "verification", "low answer score"),
            Row("OCR", "video", "generation", "teacher error"), Row("OCR", "video", "sufficiency", "insufficient observation")]
    summary = summarize(rows)
    assert (summary.all.n_in, summary.all.generated, summary.all.passed_step2, summary.all.kept) == (4, 3, 2, 1)
    assert list(summary.problem_type) == ["numerical", "OCR"] and list(summary.data_type) == ["video", "image"]
    assert summary.data_type["image"].to_dict() == {"in": 1, "generated": 1, "passed_step2": 0, "kept": 0,
                                                    "dropped": {"verification": {"low answer score": 1}}}
    table = format_table(summary)
    assert "1 generation: teacher error *" in table and "3 sufficiency: insufficient observation" in table
    assert "retried" in table


def test_teacher_guard_turns_backend_errors_into_replies_but_not_storage_errors():
    class HalfBroken(Teacher):
        def _answer(self, requests, deliver):
            deliver(0, TeacherReply(text="first"))
            raise RuntimeError("GPU fell off")

    clip = Clip(np.zeros((2, 28, 28, 3), dtype=np.uint8), fps=1.0, frame_indices=[0, 1], total_frames=2)
    requests = [TeacherRequest(str(i), "q", clip, "video") for i in range(3)]
    replies = HalfBroken().answer(requests)
    assert [r.text for r in replies] == ["first", None, None] and "GPU fell off" in replies[2].error

    def full_disk(index, reply):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        HalfBroken().answer(requests, full_disk)


def test_cut_torn_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    cut_torn_tail(path)
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    cut_torn_tail(path)  # a whole file stays as it is
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    path.write_bytes(b'{"id": 1')
    cut_torn_tail(path)
    assert path.read_bytes() == b""


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_cot("--help")
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--teacher" in printed and "--min-score" in printed and "resume" in printed
