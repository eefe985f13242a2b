"""Pack Video-R1 / VideoP2R records and their media into WebDataset shards for p2r.

Every record is validated before anything is written, so one run tells you about all the bad
records at once: counted by reason on screen with the first few, and every one of them (where,
id, path, cause) in OUT/PREFIX.bad-records.jsonl. The good ones are then written, and the shard
pattern to paste into a config is printed last. Exits 1 when no record is usable, or with
--strict when any record is bad.

With --verify every usable record's media is also decoded (a video's sampled frames, as the
DataModule will take them) in parallel worker processes; files that do not decode are reported
by cause (truncated, no video stream, an image, an unknown container, ...) and not written.
Without it, only existence and size are checked, and the tool says so.

    python tools/make_shards.py --records Video-R1-260k.json --media-root data/Video-R1 --out shards/sft --verify
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from p2r.data.records import VideoRecord
from p2r.data.shards import (
    count_reasons,
    load_raw_records,
    media_extension,
    reason_kind,
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


def report_bad(bad: list[tuple[str, str]], total: int, listing: Path) -> None:
    """Print how many records are bad, per reason, the first few with their position, and where
    the full list is (``listing``)."""
    print(f"{total - len(bad)} of {total} records are usable, {len(bad)} bad")
    if not bad:
        return
    for kind, count in count_reasons(bad).most_common():
        print(f"  {count:8d}  {kind}")
    print(f"first bad records (all {len(bad)} are listed in {listing}):")
    for where, reason in bad[:EXAMPLES_SHOWN]:
        print(f"  {where}: {reason}")


def rejected_row(raw: list[Any], source: str, where: str, reason: str) -> dict:
    """One bad record of validation as a line of the bad-record list: ``where`` is ``source[index]``
    (see validate_records), and the record's id and path are taken from it as written (None when
    it has none, or is not a JSON object)."""
    record = raw[int(where[len(source) + 1 : -1])]
    fields = record if isinstance(record, dict) else {}
    return {"where": where, "id": fields.get("id", fields.get("problem_id")), "path": fields.get("path"),
            "kind": reason_kind(reason), "cause": reason}


def undecodable_rows(checked: list[tuple[VideoRecord, Path]], kept: list[tuple[VideoRecord, Path]],
                     undecodable: list[tuple[str, str]]) -> list[dict]:
    """The records --verify dropped as lines of the bad-record list (verify_media lists them in the
    order of ``checked``; ids are unique once validated)."""
    kept_ids = {record.id for record, _ in kept}
    dropped = [record for record, _ in checked if record.id not in kept_ids]
    return [{"where": where, "id": record.id, "path": record.path, "kind": reason_kind(reason), "cause": reason}
            for record, (where, reason) in zip(dropped, undecodable, strict=True)]


def write_bad_list(rows: list[dict], path: Path) -> None:
    """Write the bad records one JSON object a line, empty when there are none (so a list left by
    an earlier run never stands for this one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def samples(good: list[tuple[VideoRecord, Path]]) -> Iterator[tuple[VideoRecord, bytes, str]]:
    for record, path in tqdm(good, desc="writing shards", unit="sample"):
        yield record, path.read_bytes(), media_extension(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = load_raw_records(args.records)
    good, bad = validate_records(raw, args.media_root, source=args.records.name)
    rows = [rejected_row(raw, args.records.name, where, reason) for where, reason in bad]
    if args.verify:
        checked = good
        good, undecodable = verify_media(checked, FrameSampling(max_frames=args.frames), args.workers)
        bad += undecodable
        rows += undecodable_rows(checked, good, undecodable)
    listing = args.out / f"{args.prefix}.bad-records.jsonl"
    write_bad_list(rows, listing)
    report_bad(bad, len(raw), listing)
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
