"""Skipping steps whose loss or gradients are not finite, and stopping when it keeps happening.

One NaN/inf step (an fp16/bf16 overflow, a degenerate batch) should not poison the weights or the
Adam moments: the step is skipped (no backward for a bad loss; for bad gradients the gradients are
dropped, so AdamW leaves every parameter and its moments untouched), counted and logged as
``train/nonfinite_steps``. ``max_in_a_row`` bad steps in a row mean something is broken (the lr,
the data, the weights): the run stops with an error that says what and where. Ranks decide
together (one bad rank skips the step on all), so DDP/FSDP never waits on a rank that skipped.
The learning-rate schedule still advances on a skipped step.
"""

from __future__ import annotations

import torch


def tensors_finite(tensors) -> bool:
    """True when every given tensor (DTensor shards included, None ignored) is free of NaN and inf."""
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if not bool(torch.isfinite(local).all()):
            return False
    return True


class NonFiniteGuard:
    """Counts non-finite steps; raises after ``max_in_a_row`` consecutive ones (0: never)."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def record(self, finite: bool, what: str, step: int) -> bool:
        """Note one step's outcome; returns ``finite``. Raises when the limit is reached."""
        if finite:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"non-finite {what} at {self.in_a_row} optimizer steps in a row (up to global step {step}; "
                f"{self.total} skipped in this run): the weights were not updated on those steps. Lower the "
                "learning rate, check the data of those steps, or use bf16/fp32 instead of fp16 "
                "(model.init_args.max_nonfinite_steps sets the limit)."
            )
        return False
