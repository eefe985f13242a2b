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
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from p2r.data.records import RecordError, VideoRecord, parse_record
from p2r.data.video import Clip, FrameSampling, MediaError, decode_image, decode_video

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class Sample:
    """One decoded record: what every p2r module consumes."""

    record: VideoRecord
    clip: Clip
    skipped: int = 0  # malformed/undecodable samples this worker dropped just before this one
    benchmark: str = ""  # the evaluation set it came from (data.test_sets key), "" in training


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
    """Samples in local tar shards, from the tar headers only (None if a shard is not a local file)."""
    total = 0
    for url in urls:
        try:
            with tarfile.open(url) as tar:
                total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
        except (OSError, tarfile.TarError):
            return None
    return total


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

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        if self.train:
            # Different shard order per rank/worker and epoch; reproducible from the seed.
            seed = self.seed + 1000 * self.epoch + slot
            shards = wds.ResampledShards(self.urls, seed=seed, deterministic=True)
            stream = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter(shards))
            if self.shuffle_buffer > 0:
                # Seeded: webdataset's default shuffle seeds from the pid and the clock.
                stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed)(stream)
            yield from stream
            return
        shards = ({"url": u} for u in self.urls)
        for i, raw in enumerate(wds.tarfile_to_samples(handler=wds.warn_and_continue)(shards)):
            if i % slots == slot:
                yield raw

    def _decoded(self, slot: int, slots: int) -> Iterator[Sample]:
        skipped = 0
        for raw in self._raw_samples(slot, slots):
            try:
                sample = decode_sample(raw, self.frames)
            except (RecordError, MediaError, OSError) as err:
                skipped += 1
                log.warning("skipping sample: %s", err)
                continue
            sample.skipped, skipped = skipped, 0
            sample.benchmark = raw.get("__benchmark__", "")
            yield sample

    def __iter__(self) -> Iterator[list[Sample]]:
        rank, world = _rank_and_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = rank * nworkers + wid, world * nworkers
        batch: list[Sample] = []
        emitted = 0
        for sample in self._decoded(slot, slots):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch, emitted = [], emitted + 1
                if self.batches_per_worker is not None and emitted >= self.batches_per_worker:
                    break
        if batch and not self.train:
            yield batch
        self.epoch += 1


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
        index = 0
        for name, urls in self.sets.items():
            if len(urls) == 1 and _is_records_file(urls[0]):
                for raw in _record_file_samples(urls[0], self.media_root, name, slot, slots):
                    yield raw
                continue
            shards = ({"url": u} for u in urls)
            for raw in wds.tarfile_to_samples(handler=wds.warn_and_continue)(shards):
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
        return self._plain_loader(stream)

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
