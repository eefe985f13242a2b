"""AdamW with warmup and a cosine/linear/constant schedule, stepped every optimizer step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


def schedule_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine/linear decay or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def adamw_with_schedule(
    module: L.LightningModule, lr: float, weight_decay: float, warmup_ratio: float, kind: str, total_steps: int
) -> dict[str, Any]:
    """The optimizer config Lightning expects; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check freeze_vision / lora settings of the backbone")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = int(warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(step, total_steps, warmup, kind)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
