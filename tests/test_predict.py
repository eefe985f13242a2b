"""``p2r predict`` on your own videos: the questions file and its checks, the loader that keeps
undecodable media as error rows, and the real CLI writing predictions.jsonl line by line in order
(clips, an image, a URL, a missing and a corrupt file; the command-line form with a checkpoint)."""

from __future__ import annotations

import functools
import json
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

import p2r.data.datamodule as datamodule
from callbacks.rewards.parsing import extract_tag, video_r1_answer
from callbacks.segments import split_segments
from conftest import encode_video, zoo_frames
from p2r.algorithms.base import VideoLVLMModule
from p2r.cli import main
from p2r.data.datamodule import VideoDataModule
from p2r.data.prompts import build_prompt
from p2r.data.questions import QuestionsError, load_media, read_questions
from p2r.data.video import FrameSampling, MediaError
from p2r.predictions import parse_output

REPO = Path(__file__).resolve().parents[1]
PREDICT = ["--config", str(REPO / "configs/predict.yaml"), "--config", str(REPO / "configs/tiny.yaml")]
# The tiny backbone shrunk further (as tests/evaluation/test_eval_cli.py): the same code path, faster.
SMALLER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vision_hidden_size": 16, "vision_depth": 1}
FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=3136)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """clips/a.mp4, b.mp4, c.webm (PyAV-made), desk.png, broken.mp4 (half an MP4) and served/d.mp4 (for the URL)."""
    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    (root / "served").mkdir()
    h264 = encode_video(zoo_frames(16))
    (root / "clips/a.mp4").write_bytes(h264)
    (root / "clips/b.mp4").write_bytes(encode_video(zoo_frames(12, 32, 48)))
    (root / "clips/c.webm").write_bytes(encode_video(zoo_frames(8), "libvpx-vp9", "webm",
                                                     options={"deadline": "realtime", "cpu-used": "8"}))
    (root / "served/d.mp4").write_bytes(h264)
    (root / "broken.mp4").write_bytes(h264[: len(h264) // 2])
    Image.fromarray(zoo_frames(1)[0]).save(root / "desk.png")
    return root


@pytest.fixture(scope="module")
def server(media):
    """An HTTP server on loopback serving ``media/served`` (the URL line; nothing leaves the machine)."""
    handler = functools.partial(type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(media / "served"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def questions(media, server) -> tuple[Path, list[dict], list[str]]:
    """A questions file beside the media (relative paths), and the cause each line's error must name ("" for none)."""
    lines = [
        {"video": "clips/a.mp4", "question": "Which colour is the block?", "options": ["white", "black", "red"]},
        {"video": "clips/b.mp4", "question": "What happens?"},
        {"video": "clips/missing.mp4", "question": "Is this here?"},
        {"image": "desk.png", "question": "How many blocks?", "problem_type": "numerical", "id": "desk"},
        {"video": "broken.mp4", "question": "And this?", "options": ["yes", "no"]},
        {"video": f"{server}/d.mp4", "question": "Served?"},
        {"video": "clips/c.webm", "question": "Does it get brighter?", "options": ["yes", "no"], "note": "kept"},
        {"video": f"{server}/nowhere.mp4", "question": "Gone?"},
    ]
    causes = ["", "", "no such file", "", "truncated", "", "", "cannot download (HTTPError: HTTP Error 404"]
    return write_jsonl(media / "questions.jsonl", lines), lines, causes


# ---- the questions file ------------------------------------------------------------------------


def test_every_malformed_line_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"video": "a.mp4", "question": "fine"},
        "not json {",
        "",  # blank lines are skipped, and the line numbers still count them
        {"video": "a.mp4"},
        {"question": "no media"},
        {"video": "a.mp4", "image": "b.jpg", "question": "two media"},
        ["a", "list"],
        {"video": "a.mp4", "question": "q", "options": "A. one"},
        {"video": "a.mp4", "question": "q", "problem_type": "essay"},
        {"video": "a.mp4", "question": "q", "problem_type": "multiple choice"},
    ])
    with pytest.raises(QuestionsError) as raised:
        read_questions(path)
    message = str(raised.value)
    assert message.startswith("8 malformed line(s)")
    for number, reason in [(2, "not JSON"), (4, "no 'question'"), (5, "no 'video' or 'image'"), (6, "both 'video' and 'image'"),
                           (7, "a question must be a JSON object"), (8, "'options' must be a list"), (9, "unknown problem_type 'essay'"),
                           (10, "a multiple choice question needs 'options'")]:
        assert f"{path}:{number}: {reason}" in message
    assert f"{path}:1:" not in message and f"{path}:3:" not in message


def test_a_file_without_questions_or_unreadable_is_an_error(tmp_path):
    with pytest.raises(QuestionsError, match="holds no question"):
        read_questions(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(QuestionsError, match="cannot read .*absent.jsonl"):
        read_questions(tmp_path / "absent.jsonl")


def test_questions_resolve_paths_media_types_and_problem_types(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_jsonl(tmp_path / "sub/q.jsonl", [
        {"video": "clips/a.mp4", "question": " What? ", "options": ["x", 2]},
        {"video": "photo.JPG", "question": "Seen?"},
        {"image": "https://example.org/frame?id=3", "question": "Where?", "problem_type": "ocr", "id": 7},
        {"video": str(tmp_path / "abs.mkv"), "question": "How far?", "problem_type": "Numerical"},
    ])
    got = read_questions(path)
    assert [q.line for q in got] == [1, 2, 3, 4] and [q.record.id for q in got] == ["1", "2", "7", "4"]
    assert [q.media for q in got] == [str(tmp_path / "sub/clips/a.mp4"), str(tmp_path / "sub/photo.JPG"),
                                      "https://example.org/frame?id=3", str(tmp_path / "abs.mkv")]
    assert [q.record.data_type for q in got] == ["video", "image", "image", "video"]
    assert [q.record.problem_type for q in got] == ["multiple choice", "free-form", "OCR", "numerical"]
    assert got[0].record.options == ["x", "2"] and got[0].input == json.loads(path.read_text().splitlines()[0])


def test_media_errors_name_the_cause(media, server, tmp_path):
    [missing, big, gone] = read_questions(write_jsonl(tmp_path / "q.jsonl", [
        {"video": "nothing.mp4", "question": "?"},
        {"video": str(media / "clips/a.mp4"), "question": "?"},
        {"video": f"{server}/gone.mp4", "question": "?"},
    ]))
    with pytest.raises(MediaError, match="nothing.mp4: no such file"):
        load_media(missing, FRAMES, 10**9)
    with pytest.raises(MediaError, match="over max_media_bytes=100"):
        load_media(big, FRAMES, 100)
    with pytest.raises(MediaError, match="gone.mp4: cannot download .*404"):
        load_media(gone, FRAMES, 10**9)
    assert load_media(big, FRAMES, 10**9).frames.shape[0] == 4


def test_parse_output_reads_the_segments_as_the_rewards_do():
    text = "<observation> a white block </observation>\n<think>it stays white</think><answer> A </answer> <answer>B</answer>"
    assert parse_output(text) == {"output": text, "observation": "a white block", "think": "it stays white", "answer": "A"}
    assert parse_output("<observation>cut off") == {"output": "<observation>cut off", "observation": "cut off", "think": "", "answer": ""}


# ---- the predict loader --------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_the_predict_loader_yields_every_question_once_with_errors_kept(questions, monkeypatch, world, workers):
    path, lines, causes = questions
    got = []
    for rank in range(world):
        monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (rank, world))
        dm = VideoDataModule(predict_file=str(path), eval_batch_size=2, num_workers=workers, eval_frames=FRAMES,
                             test_sets={"ignored": "no/such/*.tar"})  # the questions replace the test sets
        dm.setup("predict")
        loader = dm.predict_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches) and all(1 <= len(b) <= 2 for b in batches)
        got += [s for b in batches for s in b]
    assert sorted(s.question.line for s in got) == list(range(1, len(lines) + 1))
    for sample in got:
        cause = causes[sample.question.line - 1]
        assert (sample.clip is None) == bool(cause) and cause in sample.error
        assert sample.clip is None or sample.clip.is_image == (sample.record.data_type == "image")


def test_predict_file_and_the_command_line_form_are_exclusive(questions):
    path, _, _ = questions
    with pytest.raises(ValueError, match="both set"):
        VideoDataModule(predict_file=str(path), predict_question="why?").setup("predict")
    with pytest.raises(ValueError, match="go together"):
        VideoDataModule(predict_video="clip.mp4").setup("predict")


# ---- the real CLI ----------------------------------------------------------------------------------


def predict(*args: str):
    with mock.patch.object(sys, "argv", ["p2r"]):  # pytest's own arguments are not the CLI's
        return main(["predict", *PREDICT, "--model.init_args.eval_max_new_tokens=12",
                     *(f"--model.init_args.backbone.init_args.{k}={v}" for k, v in SMALLER.items()), *args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_predict_writes_one_parsed_line_per_question_in_order(questions, tmp_path, monkeypatch):
    path, lines, causes = questions
    answered = []
    original = VideoLVLMModule.generate_answers

    def counting(self, batch, prompts=None, generation=None):
        answered.extend(s.question.line for s in batch)
        return original(self, batch, prompts, generation)

    monkeypatch.setattr(VideoLVLMModule, "generate_answers", counting)
    cli = predict(f"--data.predict_file={path}", f"--trainer.default_root_dir={tmp_path}", "--data.num_workers=2",
                  "--data.eval_batch_size=2")

    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))  # workers interleave; the file is in order
    assert [r["input"] for r in rows] == lines and rows[3]["id"] == "desk" and rows[0]["id"] == "1"
    assert sorted(answered) == [i + 1 for i, c in enumerate(causes) if not c]  # no generation for a failed video
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))
    for row, line, cause in zip(rows, lines, causes):
        assert row["prompt"] == build_prompt(cli.datamodule._questions[row["line"] - 1].record, "videop2r")
        assert row["prompt"].startswith(line["question"]) and "<observation>" in row["prompt"]
        for letter, option in zip("ABC", line.get("options", [])):
            assert f"\n{letter}. {option}\n" in row["prompt"]
        if cause:
            assert cause in row["error"] and row["output"] is row["answer"] is row["observation"] is row["think"] is None
            continue
        assert row["error"] is None and isinstance(row["output"], str)
        assert row["observation"] == split_segments(row["output"]).observation
        assert row["think"] == (extract_tag(row["output"], "think") or "")
        assert row["answer"] == video_r1_answer(row["output"])
    assert "in the image that matters" in rows[3]["prompt"] and "Answer with a number only" in rows[3]["prompt"]


@pytest.mark.slow
def test_a_malformed_questions_file_stops_before_the_model_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(VideoLVLMModule, "configure_model", lambda self: built.append(True))
    path = write_jsonl(tmp_path / "q.jsonl", [{"video": "a.mp4", "question": "fine"}, {"video": "a.mp4", "questio": "typo"}])
    with pytest.raises(QuestionsError, match=f"{path}:2: no 'question'"):
        predict(f"--data.predict_file={path}", f"--trainer.default_root_dir={tmp_path}")
    assert not built and not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.slow
def test_one_video_from_the_command_line_with_a_checkpoint(media, tmp_path, monkeypatch):
    # A checkpoint of changed weights (the random tiny model, moved), then the command-line form reads it.
    first = predict(f"--data.predict_video={media / 'clips/a.mp4'}", "--data.predict_question=What moves?",
                    f"--trainer.default_root_dir={tmp_path / 'random'}", "--data.num_workers=0")
    with torch.no_grad():
        for parameter in first.model.backbone.model.parameters():
            parameter.add_(0.05)
    first.trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    expected = {k: v.clone() for k, v in first.model.backbone.model.state_dict().items()}

    monkeypatch.chdir(media)  # the command-line path is relative to the working directory
    cli = predict("--data.predict_video=clips/b.mp4", "--data.predict_question=Which one?",
                  '--data.predict_options=["left", "right"]', f"--ckpt_path={tmp_path / 'tiny.ckpt'}",
                  f"--trainer.default_root_dir={tmp_path / 'ckpt'}", "--data.num_workers=0")
    loaded = cli.model.backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    [row] = read_jsonl(tmp_path / "ckpt/predictions.jsonl")
    assert row["line"] == 0 and row["media"] == str(media / "clips/b.mp4") and row["error"] is None
    assert row["input"] == {"video": "clips/b.mp4", "question": "Which one?", "options": ["left", "right"]}
    assert "Which one?\nOptions:\nA. left\nB. right\n" in row["prompt"] and row["answer"] == video_r1_answer(row["output"])
