"""Video LVLM backbones: one interface (base.VideoBackbone), hub models (hf) and tiny presets (tiny)."""

from p2r.backbones.base import VideoBackbone
from p2r.backbones.building import LoraOptions
from p2r.backbones.hf import HFBackbone
from p2r.backbones.tiny import TinyQwen2VL, TinyQwen3VL, TinyQwen25VL

__all__ = ["HFBackbone", "LoraOptions", "TinyQwen25VL", "TinyQwen2VL", "TinyQwen3VL", "VideoBackbone"]
