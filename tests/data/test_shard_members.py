"""Media members of local tar shards are read in place when decoded (p2r.data.shard_reader.TarMember),
never copied into memory by the shard reader, so a shuffle buffer holds records and file positions."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from p2r.data.shard_reader import TarMember, Unusable, media_bytes, shard_items
from p2r.data.video import FrameSampling, MediaError, decode_image, decode_video
from test_datamodule import write_tar  # tests/data is on sys.path (pytest rootdir import)

FRAMES = FrameSampling(fps=2.0, min_frames=4, max_frames=4, max_pixels=64 * 64)


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    return Path(write_tar(path, members))


def record(key: str) -> bytes:
    return json.dumps({"id": key, "problem": "q?", "problem_type": "free-form", "data_type": "video",
                       "path": f"{key}.mp4", "solution": "<answer>a</answer>"}).encode()


def test_a_local_shard_leaves_media_in_place_and_a_stream_reads_it(tmp_path, ramp_mp4):
    shard = write_shard(tmp_path / "s.tar", [("a.json", record("a")), ("a.mp4", ramp_mp4), ("b.json", record("b")),
                                            ("b.jpg", b"\xff\xd8 not really a jpeg")])
    local = list(shard_items(str(shard), 1 << 20, 1 << 30))
    assert [type(item["mp4" if "mp4" in item else "jpg"]) for item in local] == [TarMember, TarMember]
    assert local[0]["json"] == record("a")  # records are read: they are small and parsed at once
    assert media_bytes(local[0]["mp4"]) == ramp_mp4 and media_bytes(local[1]["jpg"]) == b"\xff\xd8 not really a jpeg"
    streamed = list(shard_items(f"pipe:cat {shard}", 1 << 20, 1 << 30))
    assert streamed[0]["mp4"] == ramp_mp4 and media_bytes(streamed[0]["mp4"]) == ramp_mp4


def test_a_member_window_reads_and_seeks_like_a_file(tmp_path):
    shard = write_shard(tmp_path / "w.tar", [("x.json", b"{}"), ("x.mp4", bytes(range(256)) * 4)])
    [item] = shard_items(str(shard), 1 << 20, 1 << 30)
    with item["mp4"].open() as f:
        assert f.read(3) == b"\x00\x01\x02" and f.seek(-2, io.SEEK_END) == 1022 and f.read() == b"\xfe\xff"
        assert f.read() == b"" and f.seek(10) == 10 and f.read(2) == b"\x0a\x0b"
        with pytest.raises(OSError, match="before the start"):
            f.seek(-1)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_a_member_decodes_exactly_as_its_bytes(tmp_path, ramp_mp4, decoder):
    shard = write_shard(tmp_path / "d.tar", [("a.json", record("a")), ("a.mp4", ramp_mp4)])
    [item] = shard_items(str(shard), 1 << 20, 1 << 30)
    frames = FrameSampling(**{**FRAMES.__dict__, "decoders": (decoder,)})
    in_place, in_memory = decode_video(item["mp4"], frames), decode_video(ramp_mp4, frames)
    assert np.array_equal(in_place.frames, in_memory.frames) and in_place.frame_indices == in_memory.frame_indices


def test_the_shard_reader_never_holds_a_large_member(tmp_path):
    big = bytes(48 * 1024**2)  # 48 MiB of media
    shard = write_shard(tmp_path / "big.tar", [("a.json", record("a")), ("a.mp4", big), ("b.json", record("b")), ("b.mp4", b"x")])
    del big
    tracemalloc.start()
    items = list(shard_items(str(shard), 1 << 20, 1 << 30))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [item["__key__"] for item in items] == ["a", "b"] and items[0]["mp4"].size == 48 * 1024**2
    assert peak < 4 * 1024**2, peak  # the stream path reads the whole member (48 MiB) at this point


def test_a_shard_cut_inside_a_member_costs_that_sample_only(tmp_path, ramp_mp4):
    shard = write_shard(tmp_path / "cut.tar", [("a.json", record("a")), ("a.mp4", ramp_mp4),
                                              ("b.json", record("b")), ("b.mp4", ramp_mp4)])
    data = shard.read_bytes()
    shard.write_bytes(data[: data.rindex(ramp_mp4[:64]) + len(ramp_mp4) // 3])  # b.mp4 cut to a third
    a, b, damage = shard_items(str(shard), 1 << 20, 1 << 30)
    assert isinstance(damage, Unusable) and damage.kind == "shard damaged part-way"  # the next header is missing
    assert decode_video(a["mp4"], FRAMES).frames.shape[0] == 4
    with pytest.raises(MediaError, match="b: cannot decode video"):  # b's header came before the cut: it fails alone
        decode_video(b["mp4"], FRAMES, name="cut.tar:b")


def test_an_image_member_decodes_in_place(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (200, 10, 10)).save(buffer, format="PNG")
    shard = write_shard(tmp_path / "i.tar", [("a.json", record("a")), ("a.png", buffer.getvalue())])
    [item] = shard_items(str(shard), 1 << 20, 1 << 30)
    clip = decode_image(item["png"], FRAMES)
    assert clip.is_image and clip.frames[0, 0, 0].tolist() == [200, 10, 10]
