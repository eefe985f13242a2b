"""The WebDataset LightningDataModule: streams shards of videos/images + JSON records.

Shards come from ``tools/make_shards.py`` or ``tools/make_synthetic.py`` (any URL or brace
pattern webdataset accepts: local paths, ``pipe:``, ``https://``, ``s3`` via pipe). Each sample
is decoded in a worker (decord for video, PIL for images), its frames sampled and resized by the
split's :class:`~p2r.data.video.FrameSampling`, and yielded as a :class:`Sample`; batches are
plain lists of samples, because the backbone builds tensors itself.

Splitting: training streams resampled shards and every rank yields exactly the same number of
batches per epoch (so DDP/FSDP never waits on a rank that ran dry). Evaluation reads every shard
in every worker and keeps sample ``i`` when ``i % (ranks x workers)`` is its slot, so each
sample is seen exactly once across ranks and workers, whatever the shard count.

A sample whose record is malformed or whose media cannot be decoded is skipped with a warning
naming it; the count travels with the next batch (``Sample.skipped``) so the module logs the total.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tarfile
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from p2r.data.records import RecordError, VideoRecord, parse_record
from p2r.data.video import Clip, FrameSampling, MediaError, decode_image, decode_video

log = logging.getLogger(__name__)

# Bad training samples in a row after which the stream gives up (see ShardStream._decoded).
MAX_CONSECUTIVE_SKIPS = 1000
VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class Sample:
    """One decoded record: what every p2r module consumes."""

    record: VideoRecord
    clip: Clip
    skipped: int = 0  # malformed/undecodable samples this worker dropped just before this one
    benchmark: str = ""  # the evaluation set it came from (data.test_sets key), "" in training
    position: int = 0  # raw samples this worker had read when it yielded this one (the resume point)


def decode_sample(raw: dict[str, Any], frames: FrameSampling) -> Sample:
    """Turn one raw webdataset sample (bytes by extension) into a :class:`Sample`.

    Raises RecordError or MediaError naming the sample's key and shard.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if "json" not in raw:
        raise RecordError(f"{where}: sample has no .json record")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{where}: record is not valid JSON ({err})") from err
    record = parse_record(meta, where=where, default_id=raw.get("__key__"))
    video_key = next((k for k in VIDEO_EXTS if k in raw), None)
    image_key = next((k for k in IMAGE_EXTS if k in raw), None)
    if record.data_type == "video" and video_key:
        return Sample(record, decode_video(raw[video_key], frames, name=where))
    if image_key:
        return Sample(record, decode_image(raw[image_key], frames, name=where))
    raise MediaError(f"{where}: no {record.data_type} bytes in the sample (keys: {sorted(k for k in raw if not k.startswith('__'))})")


def count_samples(urls: list[str]) -> int | None:
    """Samples in local tar shards, from the tar headers only (None if a shard is not a local file).

    A truncated or damaged shard counts the samples before the damage, with a warning naming it.
    """
    total = 0
    for url in urls:
        if not Path(url).is_file():
            return None
        keys: set[str] = set()
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.isfile():
                        keys.add(member.name.split(".", 1)[0])
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s is damaged (%s): counting the %d samples before the damage", url, err, len(keys))
        total += len(keys)
    return total


def _skip_and_log(err: Exception) -> bool:
    """webdataset handler: log a broken shard or tar member and go on (its own sleeps 0.5 s each time)."""
    log.warning("skipping unreadable shard data: %s", err)
    return True


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Batches of decoded samples from shards, split over ranks and workers (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        frames: FrameSampling,
        batch_size: int,
        train: bool,
        batches_per_worker: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> None:
        self.urls = urls
        self.frames = frames
        self.batch_size = batch_size
        self.train = train
        self.batches_per_worker = batches_per_worker
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        # Resume point, set by the main process before workers start: the batches this rank had
        # trained on this epoch and, per worker slot, the raw samples read up to its last one.
        self.resume_trained = 0
        self.resume_raw: list[int] = []

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds  # here, not at import: modules and tools that only need Sample run without it

        if self.train:
            # Different shard order per rank/worker and epoch; reproducible from the seed.
            seed = self.seed + 1000 * self.epoch + slot
            # worker_seed: the order depends on our seed only (it already holds the worker slot),
            # not on the DataLoader's worker id, which a resumed loader maps to another slot.
            shards = wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
            stream = wds.tarfile_to_samples(handler=_skip_and_log)(iter(shards))
            if self.shuffle_buffer > 0:
                # Seeded: webdataset's default shuffle seeds from the pid and the clock.
                stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed)(stream)
            yield from stream
            return
        shards = ({"url": u} for u in self.urls)
        for i, raw in enumerate(wds.tarfile_to_samples(handler=_skip_and_log)(shards)):
            if i % slots == slot:
                yield raw

    def _decoded(self, slot: int, slots: int, start: int = 0) -> Iterator[Sample]:
        """Decoded samples; each carries the count of bad samples skipped just before it.

        One sample is held back so that bad samples after the last good one are counted on it.
        A training stream that meets MAX_CONSECUTIVE_SKIPS bad samples in a row stops with an error
        (resampled shards never run out, so shards without a usable sample would loop forever).
        """
        skipped, held = 0, None
        raws = self._raw_samples(slot, slots)
        for position, raw in enumerate(itertools.islice(raws, start, None), start=start + 1):
            try:
                sample = decode_sample(raw, self.frames)
            except (RecordError, MediaError, OSError) as err:
                skipped += 1
                log.warning("skipping sample: %s", err)
                if self.train and skipped >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(
                        f"{skipped} training samples in a row could not be used (last: {err}); "
                        "check data.train_shards (tools/make_shards.py validates records and media)"
                    ) from err
                continue
            sample.skipped, skipped = skipped, 0
            sample.position = position
            sample.benchmark = raw.get("__benchmark__", "")
            if held is not None:
                yield held
            held = sample
        if held is not None:
            held.skipped += skipped
            yield held

    def __iter__(self) -> Iterator[list[Sample]]:
        rank, world = _rank_and_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        # Batch i of an epoch comes from worker slot i % nworkers: a resumed loader's first worker
        # plays the slot whose batch was next, and each slot has already delivered its share.
        wid = (wid + self.resume_trained) % nworkers
        slot, slots = rank * nworkers + wid, world * nworkers
        start = self.resume_raw[wid] if wid < len(self.resume_raw) else 0
        emitted = len(range(wid, self.resume_trained, nworkers))
        batch: list[Sample] = []
        for sample in self._decoded(slot, slots, start):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch, emitted = [], emitted + 1
                if self.batches_per_worker is not None and emitted >= self.batches_per_worker:
                    break
        if batch and not self.train:
            yield batch


def _is_records_file(location: str) -> bool:
    return location.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))


def _record_file_samples(path: str, media_root: str, benchmark: str, slot: int, slots: int) -> Iterator[dict[str, Any]]:
    """Raw samples (webdataset layout) from a Video-R1 style records file + media folder.

    Only this worker's records (index % slots == slot) have their media read from disk.
    """
    from p2r.data.shards import load_raw_records

    for i, raw in enumerate(load_raw_records(Path(path))):
        if i % slots != slot:
            continue
        sample = {"__key__": str(raw.get("id", raw.get("problem_id", i))) if isinstance(raw, dict) else str(i),
                  "__url__": f"{path}[{i}]", "__benchmark__": benchmark}
        if isinstance(raw, dict):
            raw = {**raw, "id": sample["__key__"]}
            media = Path(media_root) / str(raw.get("path", ""))
            ext = media.suffix.lower().lstrip(".")
            if media.is_file() and ext in VIDEO_EXTS + IMAGE_EXTS:
                sample[ext] = media.read_bytes()
        sample["json"] = json.dumps(raw).encode()
        yield sample


class EvalStream(ShardStream):
    """Every sample of several named evaluation sets exactly once across ranks and workers.

    ``sets`` maps a benchmark name to shards (path, glob, brace pattern, URL) or to a records
    file (``eval_<name>.json``/``.jsonl``) whose media paths are relative to ``media_root``.
    Each sample is tagged with its benchmark name.
    """

    def __init__(self, sets: dict[str, list[str]], media_root: str, frames: FrameSampling, batch_size: int) -> None:
        super().__init__([u for urls in sets.values() for u in urls], frames, batch_size, train=False)
        self.sets = sets
        self.media_root = media_root

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        index = 0
        for name, urls in self.sets.items():
            if len(urls) == 1 and _is_records_file(urls[0]):
                for raw in _record_file_samples(urls[0], self.media_root, name, slot, slots):
                    yield raw
                continue
            shards = ({"url": u} for u in urls)
            for raw in wds.tarfile_to_samples(handler=_skip_and_log)(shards):
                if index % slots == slot:
                    yield {**raw, "__benchmark__": name}
                index += 1


class VideoDataModule(L.LightningDataModule):
    """Streams WebDataset shards of video/image + JSON records for fit, validate, test and predict."""

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        train_frames: FrameSampling | None = None,
        eval_frames: FrameSampling | None = None,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        test_sets: dict[str, str] | None = None,
        media_root: str = ".",
    ) -> None:
        """
        Args:
            train_shards: Training shards: a path, glob (data/train-*.tar), brace pattern
                (data/train-{000000..000009}.tar) or URL; several joined by "::".
            val_shards: Validation shards (used by fit's validation loop).
            test_shards: Test shards (used by ``p2r test`` and ``predict``).
            batch_size: Samples per batch per rank for training (prompts per step for PA-GRPO).
            eval_batch_size: Samples per batch for validation/test (default: batch_size).
            num_workers: DataLoader worker processes per rank that decode video.
            train_frames: Frame sampling and pixel budget for training (paper: 16 frames at 128*28*28).
            eval_frames: Frame sampling and pixel budget for evaluation (paper: 32 frames at 256*28*28).
            epoch_samples: Samples in one training epoch over all ranks (default: counted from local shards).
            shuffle_buffer: Samples held for shuffling while training (0: no shuffle beyond shard order).
            seed: Seed of shard order and shuffling.
            test_sets: Named evaluation sets for test/predict, e.g. {mvbench: data/eval/eval_mvbench.json,
                synthetic: data/synthetic/shards/test-*.tar}: shards or Video-R1 eval records files.
                Set this or test_shards, not both.
            media_root: Folder that the ``path`` of records in test_sets' JSON files is relative to.
        """
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_frames = train_frames or FrameSampling()
        self.eval_frames = eval_frames or FrameSampling(max_frames=32, max_pixels=256 * 28 * 28)
        self.epoch_samples = epoch_samples
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.test_sets = test_sets
        self.media_root = media_root

    @staticmethod
    def _expand(pattern: str | None, what: str) -> list[str]:
        if not pattern:
            raise ValueError(f"data.{what} is not set: point it at WebDataset shards (see tools/make_shards.py)")
        import glob

        import braceexpand

        urls = []
        for part in pattern.split("::"):
            for url in braceexpand.braceexpand(part):
                # A local glob (data/train-*.tar) expands to its sorted matches; a local path must
                # exist (webdataset would skip a missing shard silently); URLs pass through.
                local = "://" not in url and not url.startswith("pipe:")
                if any(c in url for c in "*?["):
                    matches = sorted(glob.glob(url))
                else:
                    matches = [url] if not local or Path(url).is_file() else []
                if not matches:
                    raise FileNotFoundError(f"data.{what}: no file matches {url!r}")
                urls.extend(matches)
        return urls

    def _world(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else _rank_and_world()[1]

    def train_dataloader(self) -> DataLoader:
        urls = self._expand(self.train_shards, "train_shards")
        total = self.epoch_samples or count_samples(urls)
        if total is None:
            raise ValueError("data.epoch_samples must be set when training shards are not local files")
        workers = max(1, self.num_workers)
        per_worker = max(1, math.ceil(total / (self._world() * workers * self.batch_size)))
        stream = SizedShardStream(
            urls, self.train_frames, self.batch_size, train=True, batches_per_worker=per_worker,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed,
        )
        stream.length = per_worker * workers
        self._train_loader = ResumableLoader(
            stream, num_workers=self.num_workers, prefetch_factor=2 if self.num_workers > 0 else None
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch the model is about to use (not for the one Lightning prefetched).
        if isinstance(batch, TrainBatch) and getattr(self, "_train_loader", None) is not None:
            self._train_loader.trained_on(batch)
        return batch

    def _eval_loader(self, pattern: str | None, what: str) -> DataLoader:
        if what == "test_shards" and self.test_sets and self.test_shards:
            raise ValueError(
                "data.test_sets and data.test_shards are both set: use one (test_sets names each set; "
                f"e.g. --data.test_sets='{{\"mine\": \"{self.test_shards}\"}}')"
            )
        if what == "test_shards" and self.test_sets:
            sets = {name: ([loc] if _is_records_file(loc) else self._expand(loc, f"test_sets.{name}"))
                    for name, loc in self.test_sets.items()}
        else:
            sets = {what.removesuffix("_shards"): self._expand(pattern, what)}
        return self._plain_loader(EvalStream(sets, self.media_root, self.eval_frames, self.eval_batch_size))

    def _plain_loader(self, stream: ShardStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []  # no validation set configured: fit runs without a validation loop
        return self._eval_loader(self.val_shards, "val_shards")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_shards, "test_shards")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_shards, "test_shards")


class SizedShardStream(ShardStream):
    """A training stream with a known number of batches per rank (for progress bars and schedules)."""

    length: int = 0

    def __len__(self) -> int:
        return self.length


class TrainBatch(list):
    """A training batch (a list of :class:`Sample`) that knows its place in the epoch."""

    epoch: int = 0
    index: int = 0  # batches before it in this epoch, on this rank
    position: int = 0  # raw samples its worker had read when the batch was complete


class ResumableLoader(DataLoader):
    """The training DataLoader, with its place in the stream saved in checkpoints.

    Lightning stores ``state_dict()`` in every checkpoint and hands it to ``load_state_dict`` on
    ``--ckpt_path`` resume. The state says which epoch it is (the shard order and shuffle derive
    from the seed and the epoch) and, per worker, how many batches and raw samples it had
    delivered up to the last batch the model TRAINED on (Lightning prefetches one batch ahead,
    so the datamodule reports each batch as it goes to the model: :meth:`trained_on`). A resumed
    worker skips its raw samples without decoding them and continues with the next batch, in
    the original order. Every rank is at the same batch; the raw positions of all ranks are
    gathered into the (rank 0) checkpoint. Resuming with another number of ranks or workers
    restarts the epoch's stream (with a warning): the model, optimizer and step still resume.
    """

    def __init__(self, stream: SizedShardStream, **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self.epoch = 0
        self.trained = 0  # batches of this epoch the model has trained on
        self.raw: list[int] = [0] * self._workers  # per worker: raw position after its last trained batch

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[TrainBatch]:
        stream: ShardStream = self.dataset
        stream.epoch = self.epoch
        start = stream.resume_trained = self.trained
        stream.resume_raw = list(self.raw)
        for i, batch in enumerate(super().__iter__()):
            out = TrainBatch(batch)
            out.epoch, out.index, out.position = self.epoch, start + i, batch[-1].position
            yield out
        self.epoch, self.trained, self.raw = self.epoch + 1, 0, [0] * self._workers

    def trained_on(self, batch: TrainBatch) -> None:
        """Record that the model took ``batch`` (called by the datamodule, batch by batch)."""
        if batch.epoch != self.epoch:
            return  # the epoch's last batch: the prefetch already ran the stream out and moved on
        self.trained = batch.index + 1
        self.raw[batch.index % self._workers] = batch.position

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "trained": self.trained, "workers": self._workers, "raw": [list(self.raw)]}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, list(self.raw))
            state["raw"] = gathered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = _rank_and_world()
        self.epoch, self.trained = int(state["epoch"]), int(state["trained"])
        if state["workers"] != self._workers or len(state["raw"]) != world:
            log.warning(
                "resuming with %d rank(s) x %d worker(s) where the checkpoint had %d x %d: the data stream restarts "
                "epoch %d from its beginning (model, optimizer and step resume exactly)",
                world, self._workers, len(state["raw"]), state["workers"], self.epoch,
            )
            self.trained, self.raw = 0, [0] * self._workers
            return
        self.raw = list(state["raw"][rank])
