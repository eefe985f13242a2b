"""The training loader's place in the stream survives a checkpoint: a loader restored from
``position`` continues with exactly the batches an uninterrupted epoch would have given next,
also with several workers and a prefetched batch that the model never trained on; each epoch
gets a new order; a changed worker count restarts the epoch (and says so)."""

from __future__ import annotations

import logging

import pytest

import p2r.data.datamodule as datamodule
from p2r.data.datamodule import VideoDataModule
from p2r.data.video import FrameSampling

FRAMES = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784)


def loader(synthetic_root, workers: int):
    dm = VideoDataModule(train_shards=str(synthetic_root / "shards/train-*.tar"), batch_size=2, num_workers=workers,
                         shuffle_buffer=4, train_frames=FRAMES, seed=3)
    dm._world = lambda: 1
    return dm, dm.train_dataloader()


def ids(batch) -> list[str]:
    return [s.record.id for s in batch]


def train(dm, it, n: int) -> list[list[str]]:
    """Take n batches the way Lightning does: the datamodule hook marks each one as trained on."""
    out = []
    for _ in range(n):
        batch = next(it)
        dm.on_before_batch_transfer(batch, 0)
        out.append(ids(batch))
    return out


@pytest.mark.parametrize("workers", [0, 2, 4])  # 9 batches an epoch: shared 5+4 and 3+2+2+2 by the workers
@pytest.mark.parametrize("cut", [1, 3])
def test_restored_loader_continues_the_epoch_exactly(synthetic_root, monkeypatch, workers, cut):
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (0, 1))
    dm, full = loader(synthetic_root, workers)
    whole = [ids(b) for b in full]
    assert len(whole) == len(full) >= 4

    dm, first = loader(synthetic_root, workers)
    it = iter(first)
    seen = train(dm, it, cut)
    next(it)  # prefetched by Lightning, never trained on: must come again after the resume
    state = first.position()
    assert state["trained"] == cut

    dm2, resumed = loader(synthetic_root, workers)
    resumed.restore(state)
    rest = [ids(b) for b in resumed]
    assert seen + rest == whole


def test_each_epoch_has_its_own_order_and_the_epoch_is_saved(synthetic_root, monkeypatch):
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (0, 1))
    dm, dl = loader(synthetic_root, 2)
    epoch0 = [ids(b) for b in dl]
    epoch1 = [ids(b) for b in dl]
    assert epoch0 != epoch1  # workers get the epoch from the main process (not their own copy)
    assert dl.position()["epoch"] == 2
    dm2, again = loader(synthetic_root, 2)
    again.restore({**dl.position(), "epoch": 1, "trained": 0})
    assert [ids(b) for b in again] == epoch1


def test_other_worker_count_restarts_the_epoch_with_a_warning(synthetic_root, monkeypatch, caplog):
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (0, 1))
    dm, dl = loader(synthetic_root, 2)
    it = iter(dl)
    train(dm, it, 2)
    state = dl.position()
    dm1, other = loader(synthetic_root, 0)
    with caplog.at_level(logging.WARNING):
        other.restore(state)
    assert "restarts" in caplog.text and other.trained == 0 and other.epoch == 0


@pytest.mark.parametrize("restore_first", [True, False])
def test_the_datamodule_carries_the_position_through_a_checkpoint(synthetic_root, monkeypatch, restore_first):
    # Lightning restores the datamodule before the loader exists (single device, DDP) or after it was
    # made for the schedule's step count (sharded strategies): both must continue where training stopped.
    monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (0, 1))
    dm, full = loader(synthetic_root, 2)
    whole = [ids(b) for b in full]
    dm, first = loader(synthetic_root, 2)
    seen = train(dm, iter(first), 3)
    saved = dm.state_dict()
    dm2 = VideoDataModule(train_shards=str(synthetic_root / "shards/train-*.tar"), batch_size=2, num_workers=2,
                          shuffle_buffer=4, train_frames=FRAMES, seed=3)
    dm2._world = lambda: 1
    if restore_first:
        dm2.load_state_dict(saved)
        resumed = dm2.train_dataloader()
    else:
        resumed = dm2.train_dataloader()
        dm2.load_state_dict(saved)
    assert seen + [ids(b) for b in resumed] == whole
    assert VideoDataModule().state_dict() == {}  # nothing to save before training


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_an_epoch_ends_when_its_last_batch_is_trained_on_without_running_the_iterator_out(synthetic_root, monkeypatch,
                                                                                      world, workers):
    """Lightning takes exactly len(loader) batches and never asks for more: the next iter must be the
    next epoch, not a one-batch remainder of this one (the phantom epoch that cost every other epoch)."""
    for rank in range(world):
        monkeypatch.setattr(datamodule, "_rank_and_world", lambda: (rank, world))
        dm, dl = loader(synthetic_root, workers)
        dm._world = lambda: world
        dl = dm.train_dataloader()
        plain, reference = loader(synthetic_root, workers)
        plain._world = lambda: world
        reference = plain.train_dataloader()
        expected = [[ids(b) for b in reference] for _ in range(3)]  # three plain epochs, each run out
        for epoch in range(3):
            it = iter(dl)
            got = train(dm, it, len(dl))  # as Lightning does: exactly len batches, the iterator left open
            assert got == expected[epoch]
            assert dl.position()["epoch"] == epoch + 1 and dl.position()["trained"] == 0
