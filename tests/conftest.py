"""Shared fixtures: a small synthetic data set made once per session, and tiny backbone sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2r.data.synthetic import encode_mp4, make_synthetic

# Small enough that a backbone builds in ~0.1 s and a forward takes a few ms on one core.
TINY_SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1, vocab_size=512)
# Synthetic split sizes: odd counts and 5 samples per shard, so shards and batches are uneven.
SPLIT_SIZES = dict(n_train=18, n_val=7, n_test=6)


@pytest.fixture(scope="session")
def tiny_sizes() -> dict:
    return dict(TINY_SIZES)


@pytest.fixture(scope="session")
def split_sizes() -> dict:
    return dict(SPLIT_SIZES)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """videos/, {train,val,test}.json and shards/{split}-00000N.tar (5 samples per shard)."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, **SPLIT_SIZES, seed=0, samples_per_shard=5, progress=False)
    return root


@pytest.fixture(scope="session")
def ramp_mp4() -> bytes:
    """A real 64x64 H.264 clip, 48 frames at 8 fps, frame t uniformly grey at level 20 + 4 t."""
    frames = [np.full((64, 64, 3), 20 + 4 * t, dtype=np.uint8) for t in range(48)]
    return encode_mp4(frames, fps=8)


@pytest.fixture(scope="session")
def tiny25(tiny_sizes):
    """A built tiny Qwen2.5-VL in eval mode; tests must not change its weights."""
    from p2r.backbones import TinyQwen25VL

    backbone = TinyQwen25VL(**tiny_sizes)
    backbone.build()
    return backbone.eval()
