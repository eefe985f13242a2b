"""The WebDataset LightningDataModule: streams shards of videos/images + JSON records.

Shards come from ``tools/make_shards.py`` or ``tools/make_synthetic.py`` (any URL or brace
pattern webdataset accepts: local paths, ``pipe:``, ``https://``, ``s3`` via pipe). Each sample
is decoded in a worker (:func:`~p2r.data.video.decode_video` for video, PIL for images), its
frames sampled and resized by the split's :class:`~p2r.data.video.FrameSampling`, and yielded as
a :class:`Sample`; batches are plain lists of samples, because the backbone builds tensors itself.

Splitting: training streams resampled shards and every rank yields exactly the same number of
batches per epoch (so DDP/FSDP never waits on a rank that ran dry): ``ceil(samples / (batch x
ranks))``, whatever the number of workers, shared among them round robin
(:func:`batches_per_epoch`, :func:`worker_batches`). Evaluation reads every shard
in every worker and keeps sample ``i`` when ``i % (ranks x workers)`` is its slot, so each
sample is seen exactly once across ranks and workers, whatever the shard count.

Nothing in the data can crash, hang or exhaust a run. Shards are read by
:mod:`p2r.data.shard_reader` (links, duplicate and oversized members, non-tar and damaged shards
become named skips); records are size-capped (``record_limits``) and type-checked before any
tokenizing; any failure to decode one sample skips that sample. Each skip is warned about (the
first ones one by one, then in summaries) and counted on the batch that was being assembled when
it happened (``Sample.skipped`` of its first sample), so the module logs ``data/skipped_samples``
at that step. ``max_unusable_in_a_row`` unusable items in a row (samples or whole shards) stop a
training stream with an error: resampled shards never run out, so a shard set without a usable
sample would otherwise loop forever.

``predict`` with ``predict_file`` (or ``predict_video`` + ``predict_question``) answers questions
about the user's own media (:mod:`p2r.data.questions`) instead of the test sets, split over ranks
and workers as evaluation is. There nothing is skipped: a question whose video cannot be read or
decoded is yielded as a :class:`Sample` without a clip that carries its ``error``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from p2r.data.questions import Question, command_line_question, load_media, read_questions
from p2r.data.records import RecordError, RecordLimits, VideoRecord, parse_record
from p2r.data.shard_reader import (
    DEFAULT_MAX_MEDIA_BYTES,
    IMAGE_EXTENSIONS,
    MEDIA_EXTENSIONS,
    RECORD_EXT,
    VIDEO_EXTENSIONS,
    SkipLog,
    Unusable,
    count_samples,
    expand_shards,
    shard_items,
)
from p2r.data.video import Clip, FrameSampling, MediaError, decode_image, decode_video

log = logging.getLogger(__name__)



@dataclass
class Sample:
    """One decoded record: what every p2r module consumes."""

    record: VideoRecord
    clip: Clip | None  # None only for a predict question whose media failed (see ``error``)
    skipped: int = 0  # on a batch's first sample: what its worker skipped while assembling that batch
    benchmark: str = ""  # the evaluation set it came from (data.test_sets key), "" in training
    position: int = 0  # raw samples this worker had read when it yielded this one (the resume point)
    question: Question | None = None  # the questions-file line it answers (predict on data.predict_file)
    error: str = ""  # why a question's media gave no clip: its prediction reports it instead of an answer


def decode_sample(raw: dict[str, Any], frames: FrameSampling, limits: RecordLimits | None = None) -> Sample:
    """Turn one raw webdataset sample (bytes by extension) into a :class:`Sample`.

    ``limits`` caps the record's size (its JSON bytes, before parsing, and its texts). Raises
    RecordError or MediaError naming the sample's key and shard.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if RECORD_EXT not in raw:
        raise RecordError(f"{where}: sample has no .json record")
    if limits is not None and len(raw[RECORD_EXT]) > limits.max_record_bytes:
        raise RecordError(f"{where}: record is {len(raw[RECORD_EXT]):,} bytes, over max_record_bytes={limits.max_record_bytes:,}")
    try:
        meta = json.loads(raw[RECORD_EXT])
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        raise RecordError(f"{where}: record is not usable JSON ({type(err).__name__}: {str(err)[:200]})") from err
    record = parse_record(meta, where=where, default_id=raw.get("__key__"), limits=limits)
    video_key = next((k for k in VIDEO_EXTENSIONS if k in raw), None)
    image_key = next((k for k in IMAGE_EXTENSIONS if k in raw), None)
    if record.data_type == "video" and video_key:
        return Sample(record, decode_video(raw[video_key], frames, name=where))
    if image_key:
        return Sample(record, decode_image(raw[image_key], frames, name=where))
    raise MediaError(f"{where}: no {record.data_type} bytes in the sample (keys: {sorted(k for k in raw if not k.startswith('__'))})")


def _counts(data: dict[str, Any]) -> str:
    """``"3 shards, 1,200 samples"`` from a :meth:`VideoDataModule._train_data`, or ``"not counted"``."""
    if "shards" not in data:
        return "not counted"
    return f"{data['shards']:,} shards, {data['samples']:,} samples"


def _check_at_least(minimum: int, **settings: int) -> None:
    for name, value in settings.items():
        if value < minimum:
            raise ValueError(f"data.{name} must be at least {minimum}, got {value}")


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batches_per_epoch(samples: int, batch_size: int, world: int) -> int:
    """Training batches per rank in one epoch: ``ceil(samples / (batch_size x world))``, at least 1.

    Rounded once over all ranks, never per worker, so that the epoch (and with it ``max_epochs``,
    the schedule and the step count) is the same whatever ``num_workers`` is. Rounded up, so an
    epoch draws at least as many samples as the data set holds.

    >>> batches_per_epoch(40, 8, 1), batches_per_epoch(41, 8, 1), batches_per_epoch(18, 4, 2)
    (5, 6, 3)
    """
    return max(1, math.ceil(samples / (batch_size * world)))


def worker_batches(epoch_batches: int, slot: int, workers: int) -> int:
    """The share of worker slot ``slot`` (of ``workers``) in an epoch of ``epoch_batches`` batches.

    The DataLoader takes batch ``i`` from worker ``i % workers`` (round robin), so slot ``w``
    delivers the batches ``w, w + workers, ...`` below ``epoch_batches``: ``base + (w < remainder)``.
    The shares sum to ``epoch_batches``, and a resumed epoch (whose first worker plays the slot of
    the next batch) keeps the same assignment.

    >>> [worker_batches(5, w, 2) for w in range(2)], [worker_batches(5, w, 3) for w in range(3)]
    ([3, 2], [2, 2, 1])
    """
    return len(range(slot, epoch_batches, workers))


@dataclass(frozen=True)
class StreamLimits:
    """What one stream will read and how much failure it takes before giving up (see the module doc)."""

    record: RecordLimits = RecordLimits()
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    max_unusable_in_a_row: int = 1000  # training only; 0: never stop


class ShardStream(IterableDataset):
    """Batches of decoded samples from shards, split over ranks and workers (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        frames: FrameSampling,
        batch_size: int,
        train: bool,
        epoch_batches: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        limits: StreamLimits | None = None,
    ) -> None:
        self.urls = urls
        self.frames = frames
        self.batch_size = batch_size
        self.train = train
        self.epoch_batches = epoch_batches  # training batches per rank per epoch (None: no limit)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.limits = limits or StreamLimits()
        self.epoch = 0
        # Resume point, set by the main process before workers start: the batches this rank had
        # trained on this epoch and, per worker slot, the raw items read up to its last one.
        self.resume_trained = 0
        self.resume_raw: list[int] = []

    def _shard_items(self, url: str) -> Iterator[dict[str, Any] | Unusable]:
        return shard_items(url, self.limits.record.max_record_bytes, self.limits.max_media_bytes)

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any] | Unusable]:
        """Raw samples and unusable items of this slot, in order (each counts as one resume position)."""
        if self.train:
            import webdataset as wds  # here, not at import: modules and tools that only need Sample run without it

            # Different shard order per rank/worker and epoch; reproducible from the seed.
            seed = self.seed + 1000 * self.epoch + slot
            # worker_seed: the order depends on our seed only (it already holds the worker slot),
            # not on the DataLoader's worker id, which a resumed loader maps to another slot.
            shards = wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
            stream = (item for shard in shards for item in self._shard_items(shard["url"]))
            if self.shuffle_buffer > 0:
                # Seeded: webdataset's default shuffle seeds from the pid and the clock.
                stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed)(stream)
            yield from stream
            return
        items = (item for url in self.urls for item in self._shard_items(url))
        yield from itertools.islice(items, slot, None, slots)

    def _decode(self, item: dict[str, Any] | Unusable, skips: SkipLog) -> Sample | None:
        """The decoded sample, or None (warned about and noted in ``skips``) when it cannot be used."""
        if isinstance(item, Unusable):
            skips.skip(item.kind, str(item))
            return None
        try:
            item = {k: v.read() if isinstance(v, _LazyBytes) else v for k, v in item.items()}
            sample = decode_sample(item, self.frames, self.limits.record)
        except Exception as err:  # whatever one sample does, it costs that sample only
            message = str(err)[:500]  # RecordError and MediaError name the sample themselves
            if not isinstance(err, (RecordError, MediaError)):
                message = f"{item.get('__url__', '?')}:{item.get('__key__', '?')}: {type(err).__name__}: {message}"
            skips.skip(type(err).__name__, message)
            return None
        sample.benchmark = item.get("__benchmark__", "")
        return sample

    def _outcomes(self, slot: int, slots: int, start: int = 0) -> Iterator[Sample | None]:
        """Each raw item of this slot from position ``start`` on: its Sample, or None when it was skipped.

        A training stream that meets ``max_unusable_in_a_row`` unusable items in a row stops with
        an error (resampled shards never run out, so shards without a usable sample would loop forever).
        """
        what = f"{'training' if self.train else 'evaluation'} data (worker slot {slot} of {slots})"
        skips = SkipLog(log, what)
        limit = self.limits.max_unusable_in_a_row if self.train else 0
        in_a_row = 0
        try:
            for position, item in enumerate(itertools.islice(self._raw_samples(slot, slots), start, None), start=start + 1):
                sample = self._decode(item, skips)
                if sample is None:
                    in_a_row += 1
                    if limit and in_a_row >= limit:
                        raise RuntimeError(
                            f"{in_a_row} training items in a row could not be used ({dict(skips.kinds)}; last: "
                            f"{skips.last}); check data.train_shards (tools/make_shards.py validates records and "
                            "media) or raise data.max_unusable_in_a_row"
                        )
                    yield None
                    continue
                in_a_row = 0
                sample.position = position
                yield sample
        finally:
            skips.close()

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
        quota = worker_batches(self.epoch_batches, wid, nworkers) if self.epoch_batches is not None else None
        if quota is not None and emitted >= quota:
            return
        # Skips are counted on the batch being assembled when they were read (on its first sample).
        # An evaluation batch is held until the next good sample or the end of the stream, so the
        # skips after the last sample are counted too.
        batch: list[Sample] = []
        skipped = 0
        ready: list[Sample] | None = None
        for outcome in self._outcomes(slot, slots, start):
            if outcome is None:
                skipped += 1
                continue
            if ready is not None:
                yield ready
                ready = None
            batch.append(outcome)
            if len(batch) < self.batch_size:
                continue
            batch[0].skipped, skipped = skipped, 0
            if not self.train:
                ready, batch = batch, []
                continue
            yield batch
            batch, emitted = [], emitted + 1
            if quota is not None and emitted >= quota:
                return
        if self.train:
            return
        last = batch or ready
        if last:
            last[0].skipped += skipped
        elif skipped:
            log.warning("evaluation worker slot %d of %d: %d item(s) skipped and no usable sample", slot, slots, skipped)
        if ready is not None:
            yield ready
        if batch:
            yield batch


def _expand(pattern: str | None, what: str) -> list[str]:
    """The shard URLs of the data setting ``what`` (:func:`p2r.data.shard_reader.expand_shards`)."""
    return expand_shards(pattern, f"data.{what}")


def _is_records_file(location: str) -> bool:
    return location.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))


def _record_file_samples(path: str, media_root: str, benchmark: str, max_media_bytes: int) -> Iterator[dict[str, Any] | Unusable]:
    """Raw samples (webdataset layout) from a Video-R1 style records file + media folder.

    Media are read lazily: the bytes of a record are read only when the stream reaches it (the
    caller slices the stream per worker before decoding, and a record of another worker is never
    read past its JSON). A records file that cannot be read at all is an error naming it.
    """
    from p2r.data.shards import load_raw_records

    try:
        records = load_raw_records(Path(path))
    except Exception as err:
        raise ValueError(f"data.test_sets.{benchmark}: cannot read records file {path} ({type(err).__name__}: {str(err)[:300]})") from err
    for i, raw in enumerate(records):
        where = f"{path}[{i}]"
        try:
            key = str(raw.get("id", raw.get("problem_id", i))) if isinstance(raw, dict) else str(i)
            sample: dict[str, Any] = {"__key__": key, "__url__": where, "__benchmark__": benchmark}
            if isinstance(raw, dict):
                raw = {**raw, "id": key}
                media = Path(media_root) / str(raw.get("path", ""))
                ext = media.suffix.lower().lstrip(".")
                if media.is_file() and ext in MEDIA_EXTENSIONS:
                    size = media.stat().st_size
                    if size > max_media_bytes:
                        yield Unusable(where, "media over its size cap", f"{media}: {size:,} bytes, max_media_bytes={max_media_bytes:,}")
                        continue
                    sample[ext] = _LazyBytes(media)
            sample[RECORD_EXT] = json.dumps(raw).encode()
        except Exception as err:  # a record that cannot even be written back as JSON
            yield Unusable(where, "record cannot be read", f"{type(err).__name__}: {str(err)[:300]}")
            continue
        yield sample


class _LazyBytes:
    """A media file's bytes, read when its sample is decoded (only by the worker that decodes it;
    a file that cannot be read then costs that sample only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> bytes:
        return self.path.read_bytes()


class EvalStream(ShardStream):
    """Every sample of several named evaluation sets exactly once across ranks and workers.

    ``sets`` maps a benchmark name to shards (path, glob, brace pattern, URL) or to a records
    file (``eval_<name>.json``/``.jsonl``) whose media paths are relative to ``media_root``.
    Each sample is tagged with its benchmark name.
    """

    def __init__(self, sets: dict[str, list[str]], media_root: str, frames: FrameSampling, batch_size: int,
                 limits: StreamLimits | None = None) -> None:
        super().__init__([u for urls in sets.values() for u in urls], frames, batch_size, train=False, limits=limits)
        self.sets = sets
        self.media_root = media_root

    def _set_items(self) -> Iterator[dict[str, Any] | Unusable]:
        for name, urls in self.sets.items():
            if len(urls) == 1 and _is_records_file(urls[0]):
                yield from _record_file_samples(urls[0], self.media_root, name, self.limits.max_media_bytes)
                continue
            for url in urls:
                for item in self._shard_items(url):
                    yield item if isinstance(item, Unusable) else {**item, "__benchmark__": name}

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any] | Unusable]:
        return itertools.islice(self._set_items(), slot, None, slots)


class QuestionStream(ShardStream):
    """The questions of ``p2r predict`` (:mod:`p2r.data.questions`), each once across ranks and
    workers, in batches of ``batch_size`` per worker.

    Nothing is skipped: a question whose video or image cannot be read or decoded becomes a
    :class:`Sample` without a clip that carries the error, so that every question gets its line in
    predictions.jsonl. ``workers`` (the DataLoader's ``num_workers``) makes the batch count known
    (:meth:`__len__`), so the progress bar shows the share done and the time left.
    """

    def __init__(self, questions: list[Question], frames: FrameSampling, batch_size: int, workers: int,
                 limits: StreamLimits | None = None) -> None:
        super().__init__([], frames, batch_size, train=False, limits=limits)
        self.questions = questions
        self.workers = workers

    def _raw_samples(self, slot: int, slots: int) -> Iterator[Question]:
        return itertools.islice(self.questions, slot, None, slots)

    def _decode(self, item: Question, skips: SkipLog) -> Sample:
        try:
            return Sample(item.record, load_media(item, self.frames, self.limits.max_media_bytes), question=item)
        except Exception as err:  # whatever one question's media do, it costs that question's answer only
            message = str(err)[:500] if isinstance(err, MediaError) else f"{item.media}: {type(err).__name__}: {str(err)[:500]}"
            log.warning("question at line %d: %s", item.line, message)
            return Sample(item.record, None, question=item, error=message)

    def __len__(self) -> int:
        rank, world = _rank_and_world()
        return question_batches(len(self.questions), self.batch_size, rank, world, max(1, self.workers))


def question_batches(questions: int, batch_size: int, rank: int, world: int, workers: int) -> int:
    """Batches rank ``rank`` yields for ``questions`` items dealt round robin over ``world x workers``
    slots (slot ``rank x workers + w``), each worker batching its own items.

    >>> question_batches(7, 2, 0, 1, 1), question_batches(7, 2, 0, 1, 2), question_batches(7, 2, 1, 2, 2)
    (4, 4, 2)
    """
    slots = world * workers
    return sum(math.ceil(len(range(rank * workers + w, questions, slots)) / batch_size) for w in range(workers))


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
        val_sets: dict[str, str] | None = None,
        media_root: str = ".",
        record_limits: RecordLimits | None = None,
        max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES,
        max_unusable_in_a_row: int = 1000,
        predict_file: str | None = None,
        predict_video: str | None = None,
        predict_question: str | None = None,
        predict_options: list[str] | None = None,
    ) -> None:
        """
        Args:
            train_shards: Training shards: a path, glob (data/train-*.tar), brace pattern
                (data/train-{000000..000009}.tar) or URL; several joined by "::".
            val_shards: Validation shards (used by fit's validation loop).
            test_shards: Test shards (used by ``p2r test``, and by ``predict`` without predict_file).
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
            val_sets: Named validation sets, as test_sets (e.g. a benchmark to watch during RL:
                {vsibench: data/eval/eval_vsibench.json}); set this or val_shards, not both.
            media_root: Folder that the ``path`` of records in test_sets' and val_sets' JSON files is relative to.
            record_limits: Size caps on each record, checked before it is tokenized: its JSON bytes
                (default 1,000,000), problem plus options (8,192 characters) and any other text field
                (16,384 characters). A record over a cap is skipped and counted.
            max_media_bytes: Largest video or image file read into memory (default 4 GiB); larger ones
                are skipped unread and counted.
            max_unusable_in_a_row: Training stops with an error after this many unusable samples or
                shards in a row (0: never; resampled shards with no usable sample would loop forever).
            predict_file: Questions for ``p2r predict``: a JSON Lines file, one {"video": path or URL,
                "question": ..., "options": [...]} per line (p2r/data/questions.py). When set (or
                predict_video), predict answers these instead of the test sets.
            predict_video: One video (or image) for ``p2r predict``, with predict_question: the
                command-line form of a one-line predict_file (a path relative to the working directory).
            predict_question: The question about predict_video.
            predict_options: Answer options of predict_question (makes it multiple choice).
        """
        super().__init__()
        _check_at_least(batch_size=batch_size, max_media_bytes=max_media_bytes, minimum=1,
                        **{k: v for k, v in (("eval_batch_size", eval_batch_size), ("epoch_samples", epoch_samples)) if v is not None})
        _check_at_least(num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                        max_unusable_in_a_row=max_unusable_in_a_row, minimum=0)
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
        self.val_sets = val_sets
        self.media_root = media_root
        self.limits = StreamLimits(record_limits or RecordLimits(), max_media_bytes, max_unusable_in_a_row)
        self.predict_file = predict_file
        self.predict_video = predict_video
        self.predict_question = predict_question
        self.predict_options = predict_options
        self._questions: list[Question] | None = None  # read and checked by setup("predict")
        self._train_plan: tuple[list[str], int] | None = None  # (shard URLs, samples per epoch), from setup
        self._restored_position: dict[str, Any] | None = None  # the training stream's position in a resumed checkpoint

    def setup(self, stage: str) -> None:
        """Check the data settings of ``stage`` before the model is built: every shard pattern
        matches, every records file exists, local training shards hold samples."""
        if stage == "fit":
            self._train_plan = self._plan_training()
            trainer = getattr(self, "trainer", None)
            # limit_val_batches 0: Lightning's loop never validates, but named val_sets feed the periodic
            # evaluation of callbacks (BenchmarkEvaluation.every_n_train_steps): check those anyway.
            if self.val_sets or (self.val_shards and (trainer is None or trainer.limit_val_batches)):
                self._eval_sets("val")
        elif stage == "validate":
            self._eval_sets("val")
        elif stage == "predict" and self._asks_questions():
            self._questions = self._read_questions()
        else:
            self._eval_sets("test")

    def _asks_questions(self) -> bool:
        return any(v is not None for v in (self.predict_file, self.predict_video, self.predict_question, self.predict_options))

    def _read_questions(self) -> list[Question]:
        """The questions of ``predict_file`` or of the ``predict_video`` form, checked (errors name file:line)."""
        if self.predict_file is not None:
            if any(v is not None for v in (self.predict_video, self.predict_question, self.predict_options)):
                raise ValueError("data.predict_file and data.predict_video/predict_question/predict_options are both set: use one")
            return read_questions(self.predict_file, self.limits.record)
        if self.predict_video is None or self.predict_question is None:
            raise ValueError("data.predict_video and data.predict_question go together (or give data.predict_file)")
        return [command_line_question(self.predict_video, self.predict_question, self.predict_options, self.limits.record)]

    def _plan_training(self) -> tuple[list[str], int]:
        urls = _expand(self.train_shards, "train_shards")
        total = self.epoch_samples or count_samples(urls)
        if total is None:
            raise ValueError("data.epoch_samples must be set when training shards are not local files")
        if total == 0:
            raise ValueError(
                f"data.train_shards: the {len(urls)} shard(s) matching {self.train_shards!r} hold no sample "
                "(no KEY.json member in a readable tar); see tools/make_shards.py"
            )
        return urls, total

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _world(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else _rank_and_world()[1]

    def train_dataloader(self) -> DataLoader:
        urls, total = self._train_plan or self._plan_training()
        stream = SizedShardStream(
            urls, self.train_frames, self.batch_size, train=True,
            epoch_batches=batches_per_epoch(total, self.batch_size, self._world()),
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, limits=self.limits,
        )
        self._train_loader = ResumableLoader(
            stream, trainer_epoch=self._trainer_epoch, num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        if self._restored_position is not None:  # restored before the loader existed
            self._train_loader.restore(self._restored_position)
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints keep of the data module: the training stream's position (see
        ResumableLoader) and which data it is a position in (:meth:`_train_data`)."""
        loader = getattr(self, "_train_loader", None)
        position = loader.position() if loader is not None else self._restored_position
        state: dict[str, Any] = {"train_position": position} if position is not None else {}
        if self.train_shards:
            state["train_data"] = self._train_data()
        return state

    def _train_data(self) -> dict[str, Any]:
        """The training data as configured: the shard pattern and, once planned, the shard and sample counts."""
        data: dict[str, Any] = {"train_shards": self.train_shards}
        if self._train_plan is not None:
            data.update(shards=len(self._train_plan[0]), samples=self._train_plan[1])
        return data

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trained_on, now = state_dict.get("train_data"), self._train_data() if self.train_shards else None
        if trained_on is not None and now is not None and any(
                trained_on.get(k) != now.get(k) for k in ("train_shards", "shards", "samples") if k in trained_on and k in now):
            # The restored position (epoch, batches done, items each worker read) counts in the old data.
            log.warning("resuming a run trained on data.train_shards=%r (%s) with data.train_shards=%r (%s): the "
                        "restored data position refers to the old data, so this epoch's order and length are not "
                        "the old run's; ignore this if the same shards only moved",
                        trained_on["train_shards"], _counts(trained_on), now["train_shards"], _counts(now))
        self._restored_position = state_dict.get("train_position")
        loader = getattr(self, "_train_loader", None)
        if loader is not None and self._restored_position is not None:
            loader.restore(self._restored_position)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch the model is about to use (not for the one Lightning prefetched).
        if isinstance(batch, EpochBatch) and getattr(self, "_train_loader", None) is not None:
            self._train_loader.trained_on(batch)
        return batch

    def _eval_sets(self, split: str) -> dict[str, list[str]]:
        """The ``split`` ("val": validation, "test": test/predict) sets: name -> shard URLs, or a
        one-element list holding a records file. Plain ``<split>_shards`` form one set named ``split``."""
        named, shards = getattr(self, f"{split}_sets"), getattr(self, f"{split}_shards")
        if named and shards:
            raise ValueError(
                f"data.{split}_sets and data.{split}_shards are both set: use one ({split}_sets names each set; "
                f"e.g. --data.{split}_sets='{{\"mine\": \"{shards}\"}}')"
            )
        if not named:
            return {split: _expand(shards, f"{split}_shards")}
        sets = {}
        for name, loc in named.items():
            if _is_records_file(loc) and "://" not in loc and not Path(loc).is_file():
                raise FileNotFoundError(f"data.{split}_sets.{name}: no records file at {loc!r}")
            sets[name] = [loc] if _is_records_file(loc) else _expand(loc, f"{split}_sets.{name}")
        return sets

    def _eval_loader(self, sets: dict[str, list[str]]) -> DataLoader:
        return self._plain_loader(EvalStream(sets, self.media_root, self.eval_frames, self.eval_batch_size, self.limits))

    def _plain_loader(self, stream: ShardStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards and not self.val_sets:
            return []  # no validation set configured: fit runs without a validation loop
        return self._eval_loader(self._eval_sets("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._eval_sets("test"))

    def predict_dataloader(self) -> DataLoader:
        """The questions of ``predict_file`` / ``predict_video`` when given, else the test sets."""
        if not self._asks_questions():
            return self._eval_loader(self._eval_sets("test"))
        questions = self._questions if self._questions is not None else self._read_questions()
        return self._plain_loader(QuestionStream(questions, self.eval_frames, self.eval_batch_size, self.num_workers, self.limits))


class SizedShardStream(ShardStream):
    """A training stream with a known number of batches per rank (for progress bars and schedules)."""

    def __len__(self) -> int:
        return self.epoch_batches or 0


class EpochBatch(list):
    """A training batch (a list of :class:`Sample`) that knows its place in the epoch."""

    epoch: int = 0
    index: int = 0  # batches before it in this epoch, on this rank
    position: int = 0  # raw samples its worker had read when the batch was complete


class ResumableLoader(DataLoader):
    """The training DataLoader, with its place in the stream saved in checkpoints.

    The datamodule stores :meth:`position` in every checkpoint and hands it back to :meth:`restore`
    on ``--ckpt_path`` resume (Lightning's own loader-state mechanism is not used: it loads nothing
    when the schedule asked for ``estimated_stepping_batches`` before the checkpoint was restored,
    which every ``max_epochs`` run does). The state says which epoch it is (the shard order and shuffle derive
    from the seed and the epoch) and, per worker, how many batches and raw samples it had
    delivered up to the last batch the model TRAINED on (Lightning prefetches one batch ahead,
    so the datamodule reports each batch as it goes to the model: :meth:`trained_on`). A resumed
    worker skips its raw samples without decoding them and continues with the next batch, in
    the original order. Every rank is at the same batch; the raw positions of all ranks are
    gathered into the (rank 0) checkpoint. Resuming with another number of ranks or workers
    restarts the epoch's stream (with a warning): the model, optimizer and step still resume.

    An epoch is exactly ``len(self)`` batches: it ends when the model has trained on the last of
    them (Lightning stops iterating at the loader's length and never runs the iterator out), or
    when a plain loop runs the iterator out, whichever comes first; the next ``iter`` starts the
    next epoch. ``trainer_epoch`` (the trainer's current epoch, when there is a trainer) is obeyed
    when it is ahead: Lightning does not hand the loader its saved state when it resumes from a
    checkpoint taken at the last batch of an epoch, and a loader still at that epoch would replay
    it; ``limit_train_batches`` epochs likewise each start their own epoch's order.
    """

    def __init__(self, stream: SizedShardStream, trainer_epoch: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self.trainer_epoch = trainer_epoch
        self.epoch = 0
        self.trained = 0  # batches of this epoch the model has trained on
        self.raw: list[int] = [0] * self._workers  # per worker: raw position after its last trained batch

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _next_epoch(self) -> None:
        self.epoch, self.trained, self.raw = self.epoch + 1, 0, [0] * self._workers

    def __iter__(self) -> Iterator[EpochBatch]:
        # Runs at the first next(), when the trainer's epoch is the one that consumes these batches.
        ahead = self.trainer_epoch() if self.trainer_epoch is not None else None
        if ahead is not None and ahead > self.epoch:
            self.epoch, self.trained, self.raw = ahead, 0, [0] * self._workers
        if self.trained >= len(self):  # a state saved as the epoch ended, before the epoch was advanced
            self._next_epoch()
        epoch = self.epoch
        stream: ShardStream = self.dataset
        stream.epoch = epoch
        start = stream.resume_trained = self.trained
        stream.resume_raw = list(self.raw)
        for i, batch in enumerate(super().__iter__()):
            out = EpochBatch(batch)
            out.epoch, out.index, out.position = epoch, start + i, batch[-1].position
            yield out
        if self.epoch == epoch:  # ran out without the model taking the last batch (a plain loop)
            self._next_epoch()

    def trained_on(self, batch: EpochBatch) -> None:
        """Record that the model took ``batch`` (called by the datamodule, batch by batch)."""
        if batch.epoch != self.epoch:
            return  # a batch of an epoch that has already ended
        self.trained = batch.index + 1
        self.raw[batch.index % self._workers] = batch.position
        if self.trained >= len(self):
            self._next_epoch()

    def position(self) -> dict[str, Any]:
        """Where the stream is (a collective under DDP: every rank must call it)."""
        state = {"epoch": self.epoch, "trained": self.trained, "workers": self._workers, "raw": [list(self.raw)]}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, list(self.raw))
            state["raw"] = gathered
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`position` (before the next ``iter``)."""
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
