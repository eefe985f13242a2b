"""Make the synthetic video reasoning data set that the tiny CPU configs train and test on.

Writes OUT/videos/<id>.mp4, OUT/{train,val,test}.json (Video-R1 layout, paths relative to OUT)
and WebDataset shards OUT/shards/{train,val,test}-000000.tar ... The same seed gives the same
data set byte for byte.

    python tools/make_synthetic.py --out data/synthetic
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from p2r.data.shards import shard_pattern
from p2r.data.synthetic import make_synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="output folder")
    parser.add_argument("--train", type=int, default=6000, help="training clips")
    parser.add_argument("--val", type=int, default=200, help="validation clips")
    parser.add_argument("--test", type=int, default=200, help="test clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (each split draws from its own stream)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--fps", type=int, default=4, help="frames per second of the mp4 files")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="records per WebDataset shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    splits = make_synthetic(
        args.out, args.train, args.val, args.test, seed=args.seed,
        size=args.size, frames=args.frames, fps=args.fps, samples_per_shard=args.samples_per_shard,
    )
    print(f"made {sum(len(s.records) for s in splits.values())} clips in {time.perf_counter() - started:.1f} s")
    for name, split in splits.items():
        kinds = Counter(r.problem_type for r in split.records)
        print(f"{name}: {len(split.records)} records ({', '.join(f'{k} {v}' for k, v in kinds.most_common())})")
        if split.shards:
            print(f"  shards: {shard_pattern(split.shards)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
