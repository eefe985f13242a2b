"""Pack Video-R1 / VideoP2R records and their media into WebDataset shards for p2r.

Every record is validated before anything is written, so one run tells you about all the bad
records at once; the good ones are then written, and the shard pattern to paste into a config
is printed last. Exits 1 when no record is usable, or with --strict when any record is bad.

With --verify every usable record's media is also decoded (a video's sampled frames, as the
DataModule will take them) in parallel worker processes; files that do not decode are reported
by cause (truncated, no video stream, an image, an unknown container, ...) and not written.
Without it, only existence and size are checked, and the tool says so.

    python tools/make_shards.py --records Video-R1-260k.json --media-root data/Video-R1 --out shards/sft --verify
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from p2r.data.records import VideoRecord
from p2r.data.shards import (
    count_reasons,
    load_raw_records,
    media_extension,
    shard_pattern,
    validate_records,
    verify_media,
    write_shards,
)
from p2r.data.video import FrameSampling

EXAMPLES_SHOWN = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--records", required=True, type=Path,
                        help="record file: a JSON list (.json, .json.gz) or JSON Lines (.jsonl); "
                             "the RL layout with every value a string is accepted")
    parser.add_argument("--media-root", required=True, type=Path,
                        help="folder the records' 'path' fields are relative to")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the shards into")
    parser.add_argument("--prefix", default="train", help="shard file name prefix: PREFIX-000000.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="records per shard (the last may hold fewer)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when any record is bad (the good ones are still written)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every video's sampled frames (and every image) first; undecodable media is not written")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes for --verify")
    parser.add_argument("--frames", type=int, default=32,
                        help="most frames decoded per video by --verify (at 2 fps; 32 is the paper's evaluation count)")
    return parser.parse_args(argv)


def report_bad(bad: list[tuple[str, str]], total: int) -> None:
    """Print how many records are bad, per reason, and the first few with their position."""
    print(f"{total - len(bad)} of {total} records are usable, {len(bad)} bad")
    if not bad:
        return
    for kind, count in count_reasons(bad).most_common():
        print(f"  {count:8d}  {kind}")
    print("first bad records:")
    for where, reason in bad[:EXAMPLES_SHOWN]:
        print(f"  {where}: {reason}")


def samples(good: list[tuple[VideoRecord, Path]]) -> Iterator[tuple[VideoRecord, bytes, str]]:
    for record, path in tqdm(good, desc="writing shards", unit="sample"):
        yield record, path.read_bytes(), media_extension(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = load_raw_records(args.records)
    good, bad = validate_records(raw, args.media_root, source=args.records.name)
    if args.verify:
        good, undecodable = verify_media(good, FrameSampling(max_frames=args.frames), args.workers)
        bad += undecodable
    report_bad(bad, len(raw))
    if not args.verify:
        print("decodability was not checked (media exist and are not empty); --verify decodes every file first")
    paths = write_shards(samples(good), args.out, args.prefix, args.samples_per_shard)
    if paths:
        print(f"wrote {len(good)} samples in {len(paths)} shard(s); use in configs:")
        print(shard_pattern(paths))
    else:
        print("no usable records: no shards written")
    return 1 if (args.strict and bad) or not paths else 0


if __name__ == "__main__":
    sys.exit(main())
