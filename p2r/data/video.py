"""Video and image decoding, frame sampling and the per-run pixel budget.

Every number here comes from the run's config (``FrameSampling``): Video-R1 hard-coded its
frame counts and pixel limits, which was its users' top complaint. Frames are sampled by a
target fps, clamped to [min_frames, max_frames] and rounded to a multiple of the temporal patch
(2 for Qwen-VL), evenly spaced over the clip. Each frame is then resized so that its area lies
within [min_pixels, max_pixels] with sides that are multiples of ``size_factor`` (28 = patch 14 x
merge 2 for Qwen-VL), keeping the aspect ratio: the same rule as Qwen's ``smart_resize``, applied
here so the processor never resizes again and the vision-token count is known from the config.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


class MediaError(ValueError):
    """A video or image that cannot be decoded; the message names it."""


@dataclass
class FrameSampling:
    """How frames are taken from a clip and how large each frame may be."""

    fps: float = 2.0
    """Target sampling rate in frames per second of video."""
    min_frames: int = 4
    """Fewest frames taken from any clip (short clips repeat no frame: indices are spread)."""
    max_frames: int = 16
    """Most frames taken from any clip (paper: 16 for training, 32 for evaluation)."""
    frame_multiple: int = 2
    """Frame counts are rounded to a multiple of this (Qwen-VL's temporal patch is 2)."""
    min_pixels: int = 16 * 28 * 28
    """Smallest area of a frame after resizing, in pixels."""
    max_pixels: int = 128 * 28 * 28
    """Largest area of a frame after resizing (paper: 128*28*28 training, 256*28*28 evaluation)."""
    size_factor: int = 28
    """Frame sides are multiples of this (patch size x spatial merge)."""


@dataclass
class Clip:
    """Decoded frames of one video (or one image as a single frame) and where they came from."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float  # the source video's frame rate (1.0 for an image)
    frame_indices: list[int] = field(default_factory=list)
    total_frames: int = 1
    is_image: bool = False

    @property
    def sampled_fps(self) -> float:
        """Frames per second of video covered by the sampled frames (for temporal position ids)."""
        if self.is_image or len(self.frame_indices) < 2:
            return self.fps
        span = (self.frame_indices[-1] - self.frame_indices[0]) / max(len(self.frame_indices) - 1, 1)
        return self.fps / max(span, 1e-6)


def num_frames_to_sample(total_frames: int, video_fps: float, cfg: FrameSampling) -> int:
    """How many frames to take: duration x target fps, clamped and rounded to the frame multiple."""
    duration = total_frames / video_fps if video_fps > 0 else total_frames
    wanted = round(duration * cfg.fps)
    wanted = max(cfg.min_frames, min(cfg.max_frames, wanted))
    wanted = max(cfg.frame_multiple, (wanted // cfg.frame_multiple) * cfg.frame_multiple)
    if wanted < cfg.min_frames:  # rounding down must not go below min_frames: round up instead
        wanted += cfg.frame_multiple
    return wanted


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``total_frames`` (centre of each equal bin).

    A clip shorter than ``num_frames`` repeats frames rather than returning fewer, so the
    vision-token count stays what the config promised.
    """
    if total_frames <= 0:
        raise MediaError("video has no frames")
    step = total_frames / num_frames
    return [min(total_frames - 1, int(step * (i + 0.5))) for i in range(num_frames)]


def fit_pixels(height: int, width: int, cfg: FrameSampling) -> tuple[int, int]:
    """The (height, width) to resize to: multiples of size_factor, area within the pixel budget."""
    f = cfg.size_factor
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > cfg.max_pixels:
        scale = math.sqrt(height * width / cfg.max_pixels)
        h = max(f, math.floor(height / scale / f) * f)
        w = max(f, math.floor(width / scale / f) * f)
    elif h * w < cfg.min_pixels:
        scale = math.sqrt(cfg.min_pixels / (height * width))
        h = math.ceil(height * scale / f) * f
        w = math.ceil(width * scale / f) * f
    return h, w


def resize_frames(frames: np.ndarray, cfg: FrameSampling) -> np.ndarray:
    """Resize (T, H, W, 3) frames to the budgeted size (bicubic, as Qwen's processor does)."""
    h, w = fit_pixels(frames.shape[1], frames.shape[2], cfg)
    if (h, w) == frames.shape[1:3]:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])


def decode_video(data: bytes | str, cfg: FrameSampling, name: str = "video") -> Clip:
    """Decode a video from bytes or a path with decord, sample and resize its frames.

    Raises :class:`MediaError` naming ``name`` when the bytes are not a readable video.
    """
    import decord  # imported here: decord is heavy and only the data path needs it

    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        video_fps = float(reader.get_avg_fps()) or 1.0
        indices = sample_frame_indices(total, num_frames_to_sample(total, video_fps, cfg))
        frames = reader.get_batch(indices).asnumpy()
    except MediaError:
        raise
    except Exception as err:  # decord raises its own DECORDError and RuntimeError types
        raise MediaError(f"{name}: cannot decode video ({type(err).__name__}: {str(err)[:200]})") from err
    return Clip(resize_frames(frames, cfg), fps=video_fps, frame_indices=indices, total_frames=total)


def decode_image(data: bytes | str, cfg: FrameSampling, name: str = "image") -> Clip:
    """Decode an image into a one-frame clip, resized to the pixel budget."""
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with Image.open(source) as img:
            frame = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ...
        raise MediaError(f"{name}: cannot decode image ({type(err).__name__}: {str(err)[:200]})") from err
    return Clip(resize_frames(frame[None], cfg), fps=1.0, frame_indices=[0], total_frames=1, is_image=True)
