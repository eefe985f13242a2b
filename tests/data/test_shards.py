"""Shard writing, record validation and the make_shards tool, on real mp4 bytes."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import webdataset as wds

from p2r.data.records import VideoRecord
from p2r.data.shards import (
    count_reasons,
    load_raw_records,
    safe_key,
    shard_pattern,
    validate_records,
    write_shards,
)
from p2r.data.synthetic import encode_mp4

REPO = Path(__file__).resolve().parents[2]
MAKE_SHARDS = REPO / "tools" / "make_shards.py"


def tiny_mp4(shade: int, frames: int = 4) -> bytes:
    """A real 32x32 H.264 clip whose frames brighten over time (distinct bytes per ``shade``)."""
    ramp = [np.full((32, 32, 3), min(255, shade + 10 * t), dtype=np.uint8) for t in range(frames)]
    return encode_mp4(ramp, fps=4)


def record(record_id: str, path: str = "v.mp4") -> VideoRecord:
    return VideoRecord(
        id=record_id, problem="How many?", problem_type="numerical", data_type="video",
        path=path, solution="<answer>2</answer>", facts={"evidence": [["2 shapes"]]},
    )


def read_shards(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))


def test_safe_key_keeps_safe_ids_and_separates_unsafe_ones():
    assert safe_key("clip-007_a") == "clip-007_a"
    unsafe = ["a/b.c", "a.b/c", "a_b_c_x"]
    keys = [safe_key(i) for i in unsafe]
    assert keys[2] == "a_b_c_x"
    assert len(set(keys)) == 3
    assert all("." not in k and "/" not in k for k in keys)


def test_round_trip_with_real_mp4(tmp_path):
    clips = {f"clip.{i}": tiny_mp4(20 * i) for i in range(5)}
    samples = [(record(rid), data, "MP4") for rid, data in clips.items()]
    paths = write_shards(samples, tmp_path / "out", "train", max_samples_per_shard=2)

    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    pattern = shard_pattern(paths)
    assert pattern == str(tmp_path / "out" / "train-{000000..000002}.tar")
    got = read_shards(pattern)
    assert len(got) == 5
    for sample in got:
        meta = json.loads(sample["json"].decode("utf-8"))
        assert sample["__key__"] == safe_key(meta["id"])
        assert meta == record(meta["id"]).to_dict()
        assert sample["mp4"] == clips[meta["id"]]
        assert len(decord.VideoReader(io.BytesIO(sample["mp4"]))) == 4
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_same_samples_give_identical_shards(tmp_path):
    samples = [(record(f"r{i}"), tiny_mp4(i), "mp4") for i in range(3)]
    first = write_shards(samples, tmp_path / "a", "x")
    second = write_shards(samples, tmp_path / "b", "x")
    assert first[0].read_bytes() == second[0].read_bytes()


def test_failure_mid_shard_leaves_only_complete_shards(tmp_path):
    media = tiny_mp4(50)
    samples = [(record("a"), media, "mp4"), (record("b"), media, "mp4"), (record("c"), media, "mp4"), (record("a"), media, "mp4")]
    with pytest.raises(ValueError, match="ids must be unique"):
        write_shards(samples, tmp_path, "train", max_samples_per_shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    assert [s["__key__"] for s in read_shards(str(tmp_path / "train-000000.tar"))] == ["a", "b"]


@pytest.mark.parametrize("media, ext, message", [(b"x", "gif", "extension"), (b"", "mp4", "empty media")])
def test_bad_media_is_refused(tmp_path, media, ext, message):
    with pytest.raises(ValueError, match=message):
        write_shards([(record("a"), media, ext)], tmp_path, "train")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    media = tiny_mp4(9)
    write_shards([(record(f"r{i}"), media, "mp4") for i in range(3)], tmp_path, "train", max_samples_per_shard=1)
    write_shards([(record("r0"), media, "mp4")], tmp_path, "train", max_samples_per_shard=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def raw(rid: str, path: str, **changes) -> dict:
    base = {
        "id": rid, "problem": "Which way?", "options": ["A. left", "B. right"], "solution": "<answer>A</answer>",
        "path": path, "data_type": "video", "problem_type": "multiple choice", "data_source": "test",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def mixed_records(tmp_path) -> tuple[list[dict], Path]:
    """Records with real media: 3 good (one RL-style, every value a string) and 7 bad ones."""
    media = tmp_path / "media"
    (media / "videos").mkdir(parents=True)
    for i in range(3):
        (media / "videos" / f"ok{i}.mp4").write_bytes(tiny_mp4(30 * i))
    (media / "videos" / "empty.mp4").write_bytes(b"")
    rl_style = {k: str(v) for k, v in raw("rl", "videos/ok2.mp4").items()}
    rl_style["options"] = "['A. left', 'B. right']"
    records = [
        raw("good0", "videos/ok0.mp4"),
        raw("missing", "videos/nope.mp4"),
        raw("badtype", "videos/ok0.mp4", problem_type="essay"),
        raw("nosolution", "videos/ok1.mp4", solution=None),
        raw("good1", "./videos/ok1.mp4"),
        rl_style,
        {**rl_style, "id": "badopts", "options": "['A. left', 'B."},
        raw("empty", "videos/empty.mp4"),
        raw("good0", "videos/ok1.mp4"),
        ["not", "a", "record"],
    ]
    return records, media


EXPECTED_BAD = [
    ("t.json[1]", "media file not found"),
    ("t.json[2]", "unknown problem_type 'essay'"),
    ("t.json[3]", "missing field(s) solution"),
    ("t.json[6]", "'options' is a string that is not a list"),
    ("t.json[7]", "media file is empty"),
    ("t.json[8]", "duplicate id"),
    ("t.json[9]", "a record must be a JSON object, got list"),
]


def test_validate_records_reports_exactly_the_bad_ones(mixed_records):
    records, media = mixed_records
    good, bad = validate_records(records, media, source="t.json")
    assert [r.id for r, _ in good] == ["good0", "good1", "rl"]
    assert all(path.is_file() for _, path in good)
    rl = good[2][0]
    assert rl.options == ["A. left", "B. right"] and rl.answer == "A"
    assert [(where, reason.split(":")[0].split(" (")[0]) for where, reason in bad] == EXPECTED_BAD
    assert "videos/nope.mp4" in bad[0][1]
    assert count_reasons(bad)["media file not found"] == 1
    assert sum(count_reasons(bad).values()) == len(EXPECTED_BAD)


@pytest.mark.parametrize("name, as_lines", [("r.json", False), ("r.json.gz", False), ("r.jsonl", True), ("r.jsonl.gz", True)])
def test_load_raw_records_reads_every_layout(tmp_path, name, as_lines):
    rows = [raw("a", "a.mp4"), raw("b", "b.mp4")]
    text = "\n".join(map(json.dumps, rows)) + "\n" if as_lines else json.dumps(rows, indent=1)
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    assert load_raw_records(path) == rows


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_SHARDS), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_make_shards_help():
    done = run_tool("--help")
    assert done.returncode == 0
    for flag in ("--records", "--media-root", "--out", "--prefix", "--samples-per-shard", "--strict", "--verify", "--workers"):
        assert flag in done.stdout


def test_make_shards_on_real_data(mixed_records, tmp_path):
    records, media = mixed_records
    source = tmp_path / "t.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    out = tmp_path / "shards"

    done = run_tool("--records", str(source), "--media-root", str(media), "--out", str(out), "--prefix", "sft", "--samples-per-shard", "2")
    assert done.returncode == 0, done.stderr
    assert "3 of 10 records are usable, 7 bad" in done.stdout
    assert "t.jsonl[1]: media file not found" in done.stdout
    pattern = str(out / "sft-{000000..000001}.tar")
    assert done.stdout.strip().splitlines()[-1] == pattern
    got = read_shards(pattern)
    assert [json.loads(s["json"])["id"] for s in got] == ["good0", "good1", "rl"]
    assert got[0]["mp4"] == (media / "videos" / "ok0.mp4").read_bytes()
    assert not list(out.glob("*.tmp"))

    strict = run_tool("--records", str(source), "--media-root", str(media), "--out", str(tmp_path / "s"), "--strict")
    assert strict.returncode == 1
    assert (tmp_path / "s" / "train-000000.tar").is_file()


def test_make_shards_says_decodability_was_not_checked_without_verify(mixed_records, tmp_path):
    records, media = mixed_records
    source = tmp_path / "t.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    done = run_tool("--records", str(source), "--media-root", str(media), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "decodability was not checked" in done.stdout


def test_make_shards_verify_decodes_everything_and_never_writes_the_undecodable(video_zoo, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    names = ["h264", "av1", "mpegts_named_mp4", "vp9_webm", "rotated_90", "one_frame",
             "truncated_mp4", "truncated_mkv", "audio_only", "jpeg_named_mp4", "garbage"]
    for name in names:
        (media / f"{name}.{video_zoo[name].ext}").write_bytes(video_zoo[name].data)
    image = tmp_path / "media" / "fake.png"
    image.write_bytes(b"\x89PNG not really")
    records = [raw(name, f"{name}.{video_zoo[name].ext}") for name in names]
    records.append(raw("fake_png", "fake.png", data_type="image"))
    source = tmp_path / "t.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "shards"

    done = run_tool("--records", str(source), "--media-root", str(media), "--out", str(out), "--verify", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "6 of 12 records are usable, 6 bad" in done.stdout
    counts = {line.split(maxsplit=1)[1]: int(line.split()[0]) for line in done.stdout.splitlines()
              if line.startswith("  ") and line.split()[0].isdigit()}
    assert counts == {"undecodable video, truncated": 2, "undecodable video, no video stream": 1,
                      "undecodable video, an image": 1, "undecodable video, not a video container": 1,
                      "undecodable image, cannot decode image": 1}
    assert "id 'truncated_mkv': undecodable video, truncated: " in done.stdout
    assert "verifying media" in done.stderr  # the progress bar
    assert "decodability was not checked" not in done.stdout
    written = [json.loads(s["json"])["id"] for s in read_shards(done.stdout.strip().splitlines()[-1])]
    assert written == ["h264", "av1", "mpegts_named_mp4", "vp9_webm", "rotated_90", "one_frame"]
