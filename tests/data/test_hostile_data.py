"""Hand-made hostile data: no record or shard can crash, hang or exhaust a run.

Every bad input is built here: 5,000-digit integers, JSON nested 100,000 deep, 1 MB and 50 MB
questions, wrong types in every field, a file that is not a tar, tars of only symlinks, empty tars,
duplicate, symlinked, hard-linked and oversized members. Each bad sample is skipped, named in a
warning and counted; warnings stay a few dozen lines however many skips there are; training
shards without a usable sample end the run with an error instead of looping, and are refused
before the model is built when they can be counted."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import tarfile
import time
from pathlib import Path

import pytest

import p2r.data.datamodule as datamodule
from p2r.data.datamodule import VideoDataModule, decode_sample
from p2r.data.records import RecordError, RecordLimits, parse_record
from p2r.data.shard_reader import SkipLog, Unusable, count_samples, media_bytes, shard_items
from p2r.data.video import FrameSampling

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784)
HUGE_INT = "9" * 5000  # past Python's 4300-digit int/str conversion limit
DEEP = "[" * 100_000 + "]" * 100_000  # past the recursion limit of any JSON parser in Python


@pytest.fixture(scope="module")
def good(synthetic_root) -> list[tuple[dict, bytes]]:
    records = json.loads((synthetic_root / "train.json").read_text())[:4]
    return [(r, (synthetic_root / r["path"]).read_bytes()) for r in records]


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, target: str = "") -> tuple:
    return name, data, kind, target


def write_tar(path: Path, members: list[tuple]) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind, target in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return str(path)


def sample(key: str, record: dict | str | bytes, media: bytes) -> list[tuple]:
    text = record if isinstance(record, bytes) else (record if isinstance(record, str) else json.dumps(record)).encode()
    return [member(f"{key}.json", text), member(f"{key}.mp4", media)]


def make_dm(monkeypatch, **kwargs) -> VideoDataModule:
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (0, 1))
    dm = VideoDataModule(**{"num_workers": 0, "shuffle_buffer": 0, "train_frames": FRAMES, "eval_frames": FRAMES, **kwargs})
    monkeypatch.setattr(dm, "_world", lambda: 1)
    return dm


def bad_records(r: dict) -> dict[str, dict | str]:
    """One malformed record per key: raw JSON text where the defect is in the text itself."""
    return {
        "huge-int-field": json.dumps({**r, "problem": 0}).replace('"problem": 0', f'"problem": {HUGE_INT}'),
        "huge-int-facts": json.dumps({**r, "facts": 0}).replace('"facts": 0', f'"facts": {{"n": {HUGE_INT}}}'),
        "deep-record": DEEP,
        "deep-facts": json.dumps({**r, "facts": 0}).replace('"facts": 0', f'"facts": {{"e": {DEEP}}}'),
        "deep-but-parsable-facts": json.dumps({**r, "facts": 0}).replace('"facts": 0', '"facts": {"e": ' + "[" * 200 + "]" * 200 + "}"),
        "big-problem": {**r, "problem": "why? " * 20_000},  # 100 kB: over max_prompt_chars
        "big-option": {**r, "options": ["A. " + "x" * 10_000, "B. y"]},
        "big-output": {**r, "output": "<observation>" + "o" * 20_000 + "</observation>"},
        "problem-dict": {**r, "problem": {"text": "what?"}},
        "problem-bool": {**r, "problem": True},
        "solution-list": {**r, "solution": ["<answer>A</answer>"]},
        "options-dict": {**r, "options": {"A": "left"}},
        "options-of-dicts": {**r, "options": [{"A": "left"}]},
        "options-deep-string": {**r, "options": "[" * 5000 + "]" * 5000},
        "problem-type-int": {**r, "problem_type": 3},
        "data-type-list": {**r, "data_type": ["video"]},
        "facts-list": {**r, "facts": ["red"]},
        "id-dict": {**r, "id": {"x": 1}},
        "observation-number-list": {**r, "observation": [1, 2]},
        "not-an-object": json.dumps([r]),
        "not-utf8": b"\xff\xfe" + json.dumps(r).encode(),
    }


def test_every_malformed_record_is_a_named_record_error(good):
    limits = RecordLimits()
    for key, text in bad_records(good[0][0]).items():
        raw = {"__url__": "shard.tar", "__key__": key, "mp4": good[0][1],
               "json": text if isinstance(text, bytes) else (text if isinstance(text, str) else json.dumps(text)).encode()}
        with pytest.raises(RecordError, match=f"shard.tar:{key}: "):
            decode_sample(raw, FRAMES, limits)


def test_numbers_are_text_and_a_python_int_too_long_to_print_is_a_record_error(good):
    record = good[0][0]
    assert parse_record({**record, "problem": 12, "solution": 3.5}).problem == "12"
    with pytest.raises(RecordError, match="'problem' is a number that cannot be written as text"):
        parse_record({**record, "problem": 10**5000})


def test_size_caps_are_settable_and_checked_before_parsing(good):
    record = good[0][0]
    small = RecordLimits(max_record_bytes=10_000, max_prompt_chars=50, max_text_chars=100_000)
    with pytest.raises(RecordError, match="over max_prompt_chars=50"):
        parse_record({**record, "problem": "x" * 51}, limits=small)
    assert parse_record({**record, "problem": "x" * 51}).problem == "x" * 51  # no limits: no cap
    big = json.dumps({**record, "problem": "y" * 50_000_000}).encode()  # 50 MB
    start = time.perf_counter()
    with pytest.raises(RecordError, match="over max_record_bytes=1,000,000"):
        decode_sample({"__url__": "s.tar", "__key__": "k", "json": big, "mp4": good[0][1]}, FRAMES, RecordLimits())
    assert time.perf_counter() - start < 0.5  # refused by its size, not parsed
    with pytest.raises(ValueError, match="max_prompt_chars must be at least 1"):
        RecordLimits(max_prompt_chars=0)


def test_an_eval_stream_over_hostile_records_yields_the_good_ones_and_counts_each_bad_one(good, tmp_path, monkeypatch, caplog):
    bad = bad_records(good[0][0])
    members = sample("first", good[0][0], good[0][1])
    for key, text in bad.items():
        members += sample(key, text, good[1][1])
    members += sample("last", good[1][0], good[1][1])
    shard = write_tar(tmp_path / "hostile.tar", members)
    dm = make_dm(monkeypatch, test_shards=shard, eval_batch_size=8)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.test_dataloader())
    assert [s.record.id for b in batches for s in b] == [good[0][0]["id"], good[1][0]["id"]]
    assert sum(s.skipped for b in batches for s in b) == len(bad)
    text = caplog.text
    assert all(f"hostile.tar:{key}" in text for key in list(bad)[:20])  # the first 20 one by one, then summaries


def test_a_50_mb_question_in_a_shard_is_never_read(good, tmp_path, monkeypatch):
    huge = json.dumps({**good[0][0], "problem": "z" * 50_000_000}).encode()
    shard = write_tar(tmp_path / "big.tar", sample("big", huge, good[0][1]) + sample("ok", good[1][0], good[1][1]))
    items = list(shard_items(shard, max_record_bytes=1_000_000, max_media_bytes=10**9))
    assert isinstance(items[0], Unusable) and items[0].kind == "member over its size cap"
    assert "50,00" in items[0].detail and "max_record_bytes=1,000,000" in items[0].detail
    assert items[1]["__key__"] == "ok" and len(items) == 2


def link_tar(path: Path, good: list, kind: bytes) -> str:
    return write_tar(path, [member(f"s{i}.json", b"", kind, f"/etc/passwd{i}") for i in range(3)]
                     + [member(f"s{i}.mp4", b"", kind, "../../outside.mp4") for i in range(3)])


def test_shard_reader_names_each_unusable_part(good, tmp_path):
    rec, mp4 = good[0]
    js = json.dumps(rec).encode()
    shard = write_tar(tmp_path / "parts.tar", [
        member("dir", kind=tarfile.DIRTYPE),
        member("README"), member("notes.txt", b"ignored, never read"),
        member("a.json", js), member("a.mp4", b"\0", tarfile.SYMTYPE, "/dev/zero"),
        member("b.json", js), member("b.json", js), member("b.mp4", mp4),
        member("c.json", js), member("c.mp4", b"", tarfile.LNKTYPE, "b.mp4"),
        member("d.json", js), member("d.mp4", b"", tarfile.FIFOTYPE),
        member("e.json", js), member("e.mp4", mp4),
    ])
    items = list(shard_items(shard, 1_000_000, 10**9))
    kinds = [(i.where.rsplit(":", 1)[1], i.kind) if isinstance(i, Unusable) else i["__key__"] for i in items]
    assert kinds == [
        ("a", "symbolic link member (links are not followed)"),
        ("b", "member name used twice"),
        ("c", "hard link member (links are not followed)"),
        ("d", "member that is not a regular file"),
        "e",
    ]
    assert media_bytes(items[-1]["mp4"]) == mp4 and "txt" not in items[-1]


@pytest.mark.parametrize("shard", ["not-a-tar", "only-symlinks", "only-hardlinks", "empty", "only-readme", "missing"])
def test_an_unreadable_shard_yields_only_unusable_items(good, tmp_path, shard):
    path = tmp_path / f"{shard}.tar"
    if shard == "not-a-tar":
        path.write_bytes(b"this is not a tar file, just some text\n" * 100)
    elif shard == "only-symlinks":
        link_tar(path, good, tarfile.SYMTYPE)
    elif shard == "only-hardlinks":
        link_tar(path, good, tarfile.LNKTYPE)
    elif shard == "empty":
        write_tar(path, [])
    elif shard == "only-readme":
        write_tar(path, [member("README.md", b"hello"), member("sub", kind=tarfile.DIRTYPE)])
    items = list(shard_items(str(path), 1_000_000, 10**9))
    assert items and all(isinstance(i, Unusable) for i in items)
    assert len(items) == (6 if "links" in shard else 1)  # s0 s1 s2 (.json) then s0 s1 s2 (.mp4): 6 samples


class Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _first_training_batch(dm: VideoDataModule, outcome) -> None:
    lines = Counting()
    logging.getLogger("p2r.data").addHandler(lines)
    try:
        next(iter(dm.train_dataloader()))
        result = "batch"
    except Exception as err:  # what the parent checks: an error, not a hang
        result = f"{type(err).__name__}: {err}"
    outcome.put((result, lines.count))


def run_in_child(dm: VideoDataModule, timeout: float = 20.0) -> tuple[str, int]:
    """(the outcome of asking for the first training batch, the warning lines the data code logged)."""
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()
    child = context.Process(target=_first_training_batch, args=(dm, outcome), daemon=True)
    child.start()
    child.join(timeout=timeout)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, f"the training stream did not end within {timeout} s"
    return outcome.get(timeout=1)


@pytest.mark.parametrize("kind", ["not-a-tar", "only-symlinks", "empty", "duplicates"])
def test_training_on_shards_without_a_usable_sample_stops_with_an_error(good, tmp_path, monkeypatch, kind):
    path = tmp_path / "bad.tar"
    if kind == "not-a-tar":
        path.write_bytes(b"\x00" * 4096 + b"garbage")
    elif kind == "only-symlinks":
        link_tar(path, good, tarfile.SYMTYPE)
    elif kind == "empty":
        write_tar(path, [])
    else:
        js = json.dumps(good[0][0]).encode()
        write_tar(path, [member("k.json", js), member("k.json", js), member("k.mp4", good[0][1])])
    # epoch_samples set: the shard is not counted up front (see the next test), so the stream itself must stop.
    dm = make_dm(monkeypatch, train_shards=str(path), batch_size=2, epoch_samples=4, max_unusable_in_a_row=300)
    start = time.monotonic()
    result, lines = run_in_child(dm)
    assert result.startswith("RuntimeError: 300 training items in a row could not be used"), result
    assert "data.train_shards" in result and time.monotonic() - start < 20
    assert 20 <= lines <= 25, f"{lines} warning lines for 300 skips"  # 20 one by one, then summaries


@pytest.mark.parametrize("kind", ["not-a-tar", "only-symlinks", "empty"])
def test_training_shards_without_samples_are_refused_at_setup(good, tmp_path, monkeypatch, kind):
    path = tmp_path / "bad-000000.tar"
    if kind == "not-a-tar":
        path.write_bytes(b"not a tar")
    elif kind == "only-symlinks":
        link_tar(path, good, tarfile.SYMTYPE)
    else:
        write_tar(path, [])
    assert count_samples([str(path)]) == 0
    dm = make_dm(monkeypatch, train_shards=str(tmp_path / "bad-*.tar"))
    with pytest.raises(ValueError, match=r"data.train_shards: the 1 shard\(s\) matching .* hold no sample"):
        dm.setup("fit")


def test_a_bad_shard_among_good_ones_is_counted_and_training_goes_on(good, tmp_path, monkeypatch):
    write_tar(tmp_path / "mix-000000.tar", [m for r, media in good for m in sample(r["id"], r, media)])
    (tmp_path / "mix-000001.tar").write_bytes(b"not a tar at all")
    link_tar(tmp_path / "mix-000002.tar", good, tarfile.SYMTYPE)
    dm = make_dm(monkeypatch, train_shards=str(tmp_path / "mix-*.tar"), batch_size=2, epoch_samples=16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8 and all(len(b) == 2 for b in batches)
    raw = dm._train_loader.dataset._raw_samples(0, 1)
    consumed = [next(raw) for _ in range(batches[-1][-1].position)]
    bad = sum(isinstance(i, Unusable) for i in consumed)
    assert bad > 0 and sum(s.skipped for b in batches for s in b) == bad


def test_skip_log_summarises_after_the_first_lines(caplog):
    logger = logging.getLogger("test.skiplog")
    skips = SkipLog(logger, "data", first=5, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.skiplog"):
        for i in range(100_000):
            skips.skip("not a tar file" if i % 2 else "RecordError", f"item {i}")
        skips.close()
    assert len(caplog.records) == 6
    last = caplog.records[-1].getMessage()
    assert "99995 more skipped (100000 in all; by kind: " in last and last.endswith("latest: item 99999")
    assert "not a tar file: 50,000" in last and "RecordError: 50,000" in last


@pytest.mark.parametrize(("setting", "value"), [("batch_size", 0), ("num_workers", -1), ("eval_batch_size", 0),
                                                ("epoch_samples", 0), ("max_media_bytes", 0), ("max_unusable_in_a_row", -1),
                                                ("shuffle_buffer", -5)])
def test_impossible_data_settings_are_refused_with_their_name(setting, value):
    with pytest.raises(ValueError, match=f"data.{setting} must be at least"):
        VideoDataModule(**{setting: value})


def test_missing_shards_and_records_files_are_refused_at_setup(tmp_path, synthetic_root):
    with pytest.raises(FileNotFoundError, match="data.train_shards: no file matches"):
        VideoDataModule(train_shards=str(tmp_path / "nothing-{000..003}.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.val_shards: no file matches"):
        VideoDataModule(train_shards=str(synthetic_root / "shards/train-*.tar"), val_shards=str(tmp_path / "v.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.test_sets.mine: no records file"):
        VideoDataModule(test_sets={"mine": str(tmp_path / "eval_mine.json")}).setup("test")
