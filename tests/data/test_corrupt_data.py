"""Corrupt data in a shard set: a truncated tar, undecodable mp4 bytes, invalid JSON and a record
missing a required field, mixed with good samples. The evaluation stream yields exactly the good
samples once each, the training stream yields only good samples and all of them, and the skip
counts (``Sample.skipped`` on each batch's first sample) add up to the unusable items read while
each batch was assembled: the bad samples, and one for the damaged tail of the truncated shard."""

from __future__ import annotations

import json
import multiprocessing
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset

import p2r.data.datamodule as datamodule
from p2r.data.datamodule import VideoDataModule
from p2r.data.shards import _write_one_shard
from p2r.data.video import FrameSampling

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=3136)
GARBAGE_MP4 = b"\x00\x00\x00\x18ftypmp42 not a video" * 40


@pytest.fixture(autouse=True)
def no_handler_sleep(monkeypatch):
    """webdataset's warn_and_continue sleeps 0.5 s after each warning; a truncated shard warns twice a pass."""
    monkeypatch.setattr(webdataset.handlers, "time", SimpleNamespace(sleep=lambda seconds: None))


class Corpus:
    """Good samples from the synthetic set, and the bad ones every test mixes in."""

    def __init__(self, root: Path) -> None:
        self.records = json.loads((root / "train.json").read_text())
        self.media = [(root / r["path"]).read_bytes() for r in self.records]

    def good(self, i: int) -> tuple[str, bytes, str, bytes]:
        return f"good{i}", json.dumps(self.records[i]).encode(), "mp4", self.media[i]

    def garbage_mp4(self, key: str) -> tuple[str, bytes, str, bytes]:
        return key, json.dumps(self.records[0]).encode(), "mp4", GARBAGE_MP4

    def invalid_json(self, key: str) -> tuple[str, bytes, str, bytes]:
        return key, b'{"problem": "What moves?", "path": ', "mp4", self.media[0]

    def missing_field(self, key: str) -> tuple[str, bytes, str, bytes]:
        record = {k: v for k, v in self.records[0].items() if k != "solution"}
        return key, json.dumps(record).encode(), "mp4", self.media[0]

    def id(self, i: int) -> str:
        return self.records[i]["id"]


def truncate_inside(shard: Path, member: str) -> None:
    """Cut ``shard`` a few bytes into the data of ``member``, as an interrupted copy would."""
    with tarfile.open(shard) as tar:
        offset = tar.getmember(member).offset_data
    shard.write_bytes(shard.read_bytes()[: offset + 10])


@pytest.fixture
def corpus(synthetic_root) -> Corpus:
    return Corpus(synthetic_root)


@pytest.fixture
def corrupt_set(corpus, tmp_path) -> tuple[str, dict[str, int]]:
    """Three shards: bad samples between good ones, a tar cut inside good5.json, and a shard that
    starts with a bad sample; every shard ends with enough good samples that no rank or worker
    (up to 4 slots) ends its stream on a bad one. Returns the pattern and, per good id, the number
    of bad samples that come right before it in its shard (what its ``skipped`` must say)."""
    c = corpus
    _write_one_shard(tmp_path / "mixed-000000.tar", [
        c.good(0), c.garbage_mp4("bad-mp4"), c.good(1), c.invalid_json("bad-json"), c.missing_field("bad-field"), c.good(2),
    ])
    _write_one_shard(tmp_path / "mixed-000001.tar", [c.good(3), c.good(4), c.good(5), c.good(6)])
    truncate_inside(tmp_path / "mixed-000001.tar", "good5.json")  # good5 and good6 are lost
    _write_one_shard(tmp_path / "mixed-000002.tar", [c.missing_field("bad-field-2"), *(c.good(i) for i in range(7, 11))])
    skipped_before = {c.id(i): 0 for i in (0, 1, 2, 3, 4, 7, 8, 9, 10)}
    skipped_before.update({c.id(1): 1, c.id(2): 2, c.id(7): 1})
    return str(tmp_path / "mixed-*.tar"), skipped_before


UNUSABLE = 5  # bad-mp4, bad-json, bad-field, bad-field-2, and the damaged tail of mixed-000001 (good5, good6)


def data_module(monkeypatch, rank: int = 0, world: int = 1, **kwargs) -> VideoDataModule:
    """A DataModule that believes it is rank ``rank`` of ``world`` (workers inherit it by fork)."""
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (rank, world))
    dm = VideoDataModule(**{"num_workers": 0, "shuffle_buffer": 0, "train_frames": FRAMES, "eval_frames": FRAMES, **kwargs})
    monkeypatch.setattr(dm, "_world", lambda: world)
    return dm


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_eval_stream_yields_each_good_sample_once_and_counts_the_bad(corrupt_set, monkeypatch, world, workers):
    pattern, skipped_before = corrupt_set
    samples = []
    for rank in range(world):
        dm = data_module(monkeypatch, rank, world, test_shards=pattern, eval_batch_size=3, num_workers=workers)
        samples += [s for batch in dm.test_dataloader() for s in batch]
    assert sorted(s.record.id for s in samples) == sorted(skipped_before)
    assert sum(s.skipped for s in samples) == UNUSABLE
    if world == 1:  # one stream in shard order, batches of 3: [0 1 2] after 3 bad, [3 4 7] after the cut and bad-field-2
        batches = [samples[i : i + 3] for i in range(0, 9, 3)]
        assert [sum(s.skipped for s in b) for b in batches] == [3, 2, 0]


def test_training_stream_yields_every_good_sample_and_counts_the_bad(corrupt_set, corpus, monkeypatch):
    pattern, skipped_before = corrupt_set
    dm = data_module(monkeypatch, train_shards=pattern, batch_size=3, epoch_samples=36)
    loader = dm.train_dataloader()
    batches = list(loader)
    samples = [s for batch in batches for s in batch]
    assert len(samples) == 36
    assert {s.record.id for s in samples} == set(skipped_before)  # every good sample, nothing else
    # The same stream, read raw: each batch carries the unusable items read between its
    # predecessor's last sample and its own last one.
    key_of = {corpus.id(i): f"good{i}" for i in range(11)}
    raw = loader.dataset._raw_samples(0, 1)
    expected = []
    for batch in batches:
        bad, good = 0, []
        while len(good) < len(batch):
            item = next(raw)
            if isinstance(item, datamodule.Unusable) or not item["__key__"].startswith("good"):
                bad += 1
            else:
                good.append(item["__key__"])
        assert good == [key_of[s.record.id] for s in batch]
        expected.append(bad)
    assert [sum(s.skipped for s in b) for b in batches] == expected
    assert sum(expected) > 0


def test_bad_samples_at_the_end_of_the_stream_are_counted(corpus, tmp_path, monkeypatch):
    _write_one_shard(tmp_path / "tail-000000.tar", [corpus.good(0), corpus.good(1), corpus.garbage_mp4("bad-mp4"),
                                                    corpus.invalid_json("bad-json")])
    dm = data_module(monkeypatch, test_shards=str(tmp_path / "tail-000000.tar"), eval_batch_size=4)
    samples = [s for batch in dm.test_dataloader() for s in batch]
    assert [s.record.id for s in samples] == [corpus.id(0), corpus.id(1)]
    assert sum(s.skipped for s in samples) == 2


def test_training_epoch_is_counted_on_a_set_with_a_truncated_shard(corrupt_set, monkeypatch):
    pattern, skipped_before = corrupt_set
    dm = data_module(monkeypatch, train_shards=pattern, batch_size=3)
    samples = [s for batch in dm.train_dataloader() for s in batch]
    assert samples and {s.record.id for s in samples} <= set(skipped_before)


def _first_training_batch(dm: VideoDataModule, outcome) -> None:
    try:
        next(iter(dm.train_dataloader()))
        outcome.put("batch")
    except Exception as err:  # what the parent checks: an error, not a hang
        outcome.put(f"{type(err).__name__}: {err}")


def test_training_on_shards_without_a_good_sample_fails_instead_of_hanging(corpus, tmp_path, monkeypatch):
    _write_one_shard(tmp_path / "bad-000000.tar", [corpus.garbage_mp4("bad-mp4"), corpus.invalid_json("bad-json"),
                                                   corpus.missing_field("bad-field")])
    dm = data_module(monkeypatch, train_shards=str(tmp_path / "bad-000000.tar"), batch_size=2)
    context = multiprocessing.get_context("fork")
    outcome = context.Queue()
    child = context.Process(target=_first_training_batch, args=(dm, outcome), daemon=True)
    child.start()
    child.join(timeout=5)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "the training stream over shards without a good sample did not end within 5 s"
    assert outcome.get(timeout=1) != "batch"
