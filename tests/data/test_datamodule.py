"""The WebDataset DataModule: equal training batches per rank, exact evaluation coverage,
malformed samples skipped and counted, named test sets, shard patterns."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import p2r.data.datamodule as datamodule
from p2r.data.datamodule import VideoDataModule
from p2r.data.shard_reader import count_samples, expand_shards
from p2r.data.video import FrameSampling

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=3136)


def make_dm(monkeypatch, rank: int = 0, world: int = 1, **kwargs) -> VideoDataModule:
    """A DataModule that believes it is rank ``rank`` of ``world`` (workers inherit it by fork)."""
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (rank, world))
    kwargs = {"num_workers": 0, "shuffle_buffer": 0, "train_frames": FRAMES, "eval_frames": FRAMES, **kwargs}
    dm = VideoDataModule(**kwargs)
    monkeypatch.setattr(dm, "_world", lambda: world)
    return dm


def ids_of(batches) -> list[str]:
    return [s.record.id for b in batches for s in b]


def split_ids(root: Path, split: str) -> list[str]:
    return [r["id"] for r in json.loads((root / f"{split}.json").read_text())]


@pytest.mark.parametrize(("world", "workers", "per_rank"), [(1, 0, 5), (2, 0, 3), (2, 2, 3)])
def test_train_loader_gives_every_rank_the_same_number_of_full_batches(
    synthetic_root, split_sizes, monkeypatch, world, workers, per_rank
):
    # 18 samples in shards of 5, 5, 5, 3; batch 4: ceil(18 / (world x 4)) per rank, whatever the workers.
    pattern = str(synthetic_root / "shards" / "train-*.tar")
    seen = []
    for rank in range(world):
        dm = make_dm(monkeypatch, rank, world, train_shards=pattern, batch_size=4, num_workers=workers)
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches) == per_rank
        assert all(len(b) == 4 for b in batches)
        assert set(ids_of(batches)) <= set(split_ids(synthetic_root, "train"))
        seen.append(ids_of(batches))
    if world == 2:
        assert seen[0] != seen[1]  # ranks draw different shard orders


@pytest.mark.parametrize(("samples", "world", "per_rank"), [(40, 1, 5), (41, 1, 6), (40, 2, 3)])
def test_an_epoch_has_the_same_number_of_batches_whatever_the_worker_count(synthetic_root, monkeypatch, samples, world, per_rank):
    """40 samples at batch 8 are 5 batches with 0, 1, 2 or 3 workers (per-worker rounding made 6 of
    them with 2 workers): the epoch is rounded once per rank and its batches shared among the workers."""
    pattern = str(synthetic_root / "shards" / "train-*.tar")
    counts = []
    for workers in (0, 1, 2, 3):
        dm = make_dm(monkeypatch, 0, world, train_shards=pattern, batch_size=8, num_workers=workers, epoch_samples=samples)
        loader = dm.train_dataloader()
        counts.append((len(loader), sum(1 for _ in loader)))
    assert counts == [(per_rank, per_rank)] * 4


def test_worker_shares_follow_the_loaders_round_robin():
    """Batch i comes from worker i % workers: its shares are the counts of each residue below the epoch length."""
    for batches in range(1, 12):
        for workers in range(1, 5):
            shares = [datamodule.worker_batches(batches, w, workers) for w in range(workers)]
            assert sum(shares) == batches
            assert shares == [sum(1 for i in range(batches) if i % workers == w) for w in range(workers)]
    assert [datamodule.batches_per_epoch(n, 8, 1) for n in (1, 8, 9, 40, 41)] == [1, 1, 2, 5, 6]


def test_shuffled_training_order_is_reproducible_from_the_seed(synthetic_root, monkeypatch):
    """Same seed, same sample order (webdataset's own shuffle seeds from pid and clock)."""
    pattern = str(synthetic_root / "shards" / "train-*.tar")
    orders = [ids_of(make_dm(monkeypatch, train_shards=pattern, batch_size=2, shuffle_buffer=8, seed=seed).train_dataloader())
              for seed in (3, 3, 4)]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_streams_cover_every_sample_once_across_ranks_and_workers(synthetic_root, monkeypatch, split):
    pattern = str(synthetic_root / "shards" / f"{split}-{{000000..000001}}.tar")  # 7 val / 6 test samples
    got = []
    for rank in range(2):
        dm = make_dm(monkeypatch, rank, 2, val_shards=pattern, test_shards=pattern, eval_batch_size=2, num_workers=2)
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        batches = list(loader)
        assert all(1 <= len(b) <= 2 for b in batches)
        assert all(s.benchmark == split for b in batches for s in b)
        got += ids_of(batches)
    assert sorted(got) == sorted(split_ids(synthetic_root, split))


def test_single_process_eval_keeps_shard_order_and_a_partial_last_batch(synthetic_root, monkeypatch):
    dm = make_dm(monkeypatch, val_shards=str(synthetic_root / "shards" / "val-*.tar"), eval_batch_size=3)
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [3, 3, 1]
    assert ids_of(batches) == split_ids(synthetic_root, "val")
    sample = batches[0][0]
    assert sample.clip.frames.shape == (4, 56, 56, 3)  # the eval budget, not the clip's 64x64
    assert sample.skipped == 0


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), shade, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture()
def messy_shard(synthetic_root, tmp_path) -> tuple[str, list[str]]:
    """Four good samples (three videos, one image) around four bad ones; returns (shard, good keys)."""
    good = json.loads((synthetic_root / "train.json").read_text())[:3]
    mp4 = [(synthetic_root / r["path"]).read_bytes() for r in good]
    js = [json.dumps(r).encode() for r in good]
    image = {**good[0], "id": "img", "data_type": "image", "path": "img.png"}
    unknown_type = {**good[1], "problem_type": "essay"}
    members = [
        ("k0.json", js[0]), ("k0.mp4", mp4[0]),
        ("k1.json", b"{not json"), ("k1.mp4", mp4[1]),  # malformed JSON
        ("k2.json", js[1]), ("k2.mp4", mp4[1]),
        ("k3.json", js[2]), ("k3.mp4", b"\x00corrupt" * 50),  # undecodable video
        ("k4.json", js[0]),  # no media at all
        ("k5.json", json.dumps(unknown_type).encode()), ("k5.mp4", mp4[1]),  # invalid record
        ("k6.json", json.dumps(image).encode()), ("k6.png", png(90)),  # an image record
        ("k7.json", js[2]), ("k7.mp4", mp4[2]),
    ]
    return write_tar(tmp_path / "messy-000000.tar", members), [good[0]["id"], good[1]["id"], "img", good[2]["id"]]


def test_eval_skips_malformed_samples_and_counts_them(messy_shard, monkeypatch, caplog):
    shard, good_ids = messy_shard
    dm = make_dm(monkeypatch, val_shards=shard, eval_batch_size=3)
    with caplog.at_level("WARNING", logger="p2r.data.datamodule"):
        batches = list(dm.val_dataloader())
    samples = [s for b in batches for s in b]
    assert [s.record.id for s in samples] == good_ids
    # Counted on the batch being assembled when they were read, on its first sample: k1, k3, k4, k5.
    assert [[s.skipped for s in b] for b in batches] == [[4, 0, 0], [0]]
    image = samples[2]
    assert image.clip.is_image and image.clip.frames.shape == (1, 28, 56, 3)  # 40x60 -> budget, 2:3 ~ 1:2
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    for key in ("k1", "k3", "k4", "k5"):
        assert f"messy-000000.tar:{key}" in warnings


def test_train_skips_malformed_samples_and_counts_them(messy_shard, monkeypatch):
    shard, good_ids = messy_shard
    dm = make_dm(monkeypatch, train_shards=shard, batch_size=4, epoch_samples=8)
    batches = list(dm.train_dataloader())
    # One shard, resampled: each batch is one pass over it, with its four bad samples counted.
    assert [[s.record.id for s in b] for b in batches] == [good_ids, good_ids]
    assert [[s.skipped for s in b] for b in batches] == [[4, 0, 0, 0], [4, 0, 0, 0]]


def all_strings(raw: dict) -> dict:
    """The RL file's layout: every value a string."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items() if v is not None}


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_named_test_sets_from_records_files_and_shards(synthetic_root, tmp_path, monkeypatch, world, workers):
    records = json.loads((synthetic_root / "test.json").read_text())
    rl_file = tmp_path / "eval_rl.jsonl"
    rl_file.write_text("\n".join(json.dumps(all_strings(r)) for r in records) + "\n")
    sets = {
        "videor1": str(synthetic_root / "test.json"),
        "rl": str(rl_file),
        "shards": str(synthetic_root / "shards" / "test-*.tar"),
    }
    got = []
    for rank in range(world):
        dm = make_dm(monkeypatch, rank, world, test_sets=sets, media_root=str(synthetic_root),
                     eval_batch_size=4, num_workers=workers)
        got += [(s.benchmark, s.record.id) for b in dm.test_dataloader() for s in b]
    ids = [r["id"] for r in records]
    assert sorted(got) == sorted((name, i) for name in sets for i in ids)


@pytest.mark.parametrize("split", ["test", "val"])
def test_named_sets_and_plain_shards_together_are_refused(synthetic_root, monkeypatch, split):
    pattern = str(synthetic_root / "shards" / "test-*.tar")
    dm = make_dm(monkeypatch, **{f"{split}_sets": {"synthetic": pattern}, f"{split}_shards": pattern})
    with pytest.raises(ValueError, match=f"{split}_sets and data.{split}_shards are both set"):
        getattr(dm, f"{split}_dataloader")()


def test_named_val_sets_feed_validation_under_their_names(synthetic_root, monkeypatch):
    # A benchmark to watch during RL: a records file (paths relative to media_root) and shards, by name.
    sets = {"bench": str(synthetic_root / "val.json"), "val": str(synthetic_root / "shards" / "val-*.tar")}
    dm = make_dm(monkeypatch, val_sets=sets, media_root=str(synthetic_root), eval_batch_size=4, num_workers=0)
    got = sorted((s.benchmark, s.record.id) for b in dm.val_dataloader() for s in b)
    ids = [r["id"] for r in json.loads((synthetic_root / "val.json").read_text())]
    assert got == sorted((name, i) for name in sets for i in ids)
    with pytest.raises(FileNotFoundError, match="data.val_sets.bench: no records file"):
        make_dm(monkeypatch, val_sets={"bench": str(synthetic_root / "missing.json")}).setup("validate")


def test_records_file_with_missing_media_skips_and_counts(synthetic_root, tmp_path, monkeypatch):
    records = json.loads((synthetic_root / "test.json").read_text())[:3]
    records[1] = {**records[1], "path": "videos/not-there.mp4"}
    path = tmp_path / "eval_x.json"
    path.write_text(json.dumps(records))
    dm = make_dm(monkeypatch, test_sets={"x": str(path)}, media_root=str(synthetic_root), eval_batch_size=8)
    [batch] = list(dm.test_dataloader())
    assert [s.record.id for s in batch] == [records[0]["id"], records[2]["id"]]
    assert [s.skipped for s in batch] == [1, 0]
    assert {s.benchmark for s in batch} == {"x"}


def test_patterns_expand_to_sorted_local_files(synthetic_root):
    shards = synthetic_root / "shards"
    expected = [str(shards / f"train-00000{i}.tar") for i in range(4)]
    assert expand_shards(str(shards / "train-*.tar"), "data.train_shards") == expected
    assert expand_shards(str(shards / "train-{000000..000003}.tar"), "data.train_shards") == expected
    joined = f"{shards}/val-*.tar::{shards}/train-00000{{2,0}}.tar"
    assert expand_shards(joined, "data.val_shards") == [
        str(shards / "val-000000.tar"), str(shards / "val-000001.tar"), expected[2], expected[0],
    ]
    assert count_samples(expected) == 18


def test_urls_pass_through_unexpanded_by_glob():
    urls = expand_shards("https://example.org/d/train-{000000..000001}.tar::pipe:cat x.tar", "data.train_shards")
    assert urls == ["https://example.org/d/train-000000.tar", "https://example.org/d/train-000001.tar", "pipe:cat x.tar"]


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        ("nothing-*.tar", "nothing-*.tar"),  # a glob without matches
        ("train-{000000..000009}.tar", "train-000004.tar"),  # a brace pattern past the last shard
        ("train-000007.tar", "train-000007.tar"),  # a plain path
    ],
)
def test_pattern_with_no_files_is_a_clear_error(synthetic_root, monkeypatch, pattern, named):
    full = str(synthetic_root / "shards" / pattern)
    dm = make_dm(monkeypatch, train_shards=full, val_shards=full)
    missing = re.escape(repr(str(synthetic_root / "shards" / named)))
    with pytest.raises(FileNotFoundError, match=rf"^data\.train_shards: no file matches {missing}$"):
        dm.train_dataloader()
    with pytest.raises(FileNotFoundError, match=rf"^data\.val_shards: no file matches {missing}$"):
        dm.val_dataloader()


def test_unset_shards_say_which_option(monkeypatch):
    dm = make_dm(monkeypatch)
    with pytest.raises(ValueError, match=r"data\.train_shards is not set"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"data\.test_shards is not set"):
        dm.test_dataloader()


def test_eval_loader_counts_are_exact_per_benchmark(synthetic_root, monkeypatch, split_sizes):
    sets = {"a": str(synthetic_root / "shards" / "val-*.tar"), "b": str(synthetic_root / "shards" / "test-*.tar")}
    dm = make_dm(monkeypatch, test_sets=sets, eval_batch_size=5)
    counts = Counter(s.benchmark for b in dm.test_dataloader() for s in b)
    assert counts == {"a": split_sizes["n_val"], "b": split_sizes["n_test"]}


def test_resuming_on_other_training_data_warns_naming_both(synthetic_root, monkeypatch, caplog):
    """A checkpoint's data position counts in its own shards: resuming it on others says so, naming both."""
    every = str(synthetic_root / "shards" / "train-*.tar")
    some = str(synthetic_root / "shards" / "train-00000[01].tar")
    trained = make_dm(monkeypatch, train_shards=every, batch_size=4)
    trained.setup("fit")
    state = trained.state_dict()
    assert state["train_data"] == {"train_shards": every, "shards": 4, "samples": 18}
    for pattern, warned in ((every, False), (some, True)):
        resumed = make_dm(monkeypatch, train_shards=pattern, batch_size=4)
        resumed.setup("fit")
        caplog.clear()
        resumed.load_state_dict(state)
        text = caplog.text
        assert ("resuming a run trained on" in text) is warned
        if warned:
            assert f"data.train_shards={every!r} (4 shards, 18 samples)" in text
            assert f"data.train_shards={some!r} (2 shards, 10 samples)" in text
