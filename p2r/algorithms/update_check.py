"""Measure, at the first optimizer step, how many weight updates were rounded away.

At the paper's learning rate (1e-6) an AdamW step moves a weight by about 1e-6, less than half
the spacing of bfloat16 numbers for almost every weight (spacing 2^-8 x |w|: 7.6e-5 at |w| = 0.02).
Weights stored in bfloat16 and updated by a plain optimizer then barely move: 1M weights drawn
N(0, 0.02), 10 AdamW steps at lr 1e-6: 1.9 % changed in bf16, 99.99 % in float32. Video-R1 trains
bf16 under DeepSpeed ZeRO, which keeps float32 master weights; p2r's paper configs do the same
with FSDP2 (float32 parameters and optimizer state, bf16 compute). A user can still ask for
16-bit weights (``precision: bf16-true`` or ``backbone.dtype: bfloat16``): then this check warns
with the measured fraction of lost updates.

How it measures (cheap, once): just before the first optimizer step that has gradients (from the
module's ``on_before_optimizer_step``, after gradient-dropping for non-finite steps), a strided
sample of at most ``per_tensor`` entries of every trainable tensor (this rank's shard under FSDP2)
and its gradient are copied; just after the step the same entries are compared. An update is
*lost* when the entry had a nonzero gradient and its value did not change. Entries without a
gradient (embedding rows of tokens not in the batch) are left out: no optimizer moves them, in
any precision. The result is logged as ``train/update_lost_fraction`` (and the share of all
sampled entries that changed as ``train/update_changed_fraction``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class UpdateCheckResult:
    """What the first optimizer step did to the sampled entries (this rank's shard)."""

    sampled: int  # sampled trainable entries
    with_gradient: int  # of those, entries with a nonzero gradient
    lost: int  # entries with a nonzero gradient whose value did not change
    changed: int  # sampled entries whose value changed
    low_precision: bool  # some trainable tensor is stored in bf16/fp16

    @property
    def lost_fraction(self) -> float:
        return self.lost / max(1, self.with_gradient)

    @property
    def changed_fraction(self) -> float:
        return self.changed / max(1, self.sampled)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard), flattened."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach().reshape(-1)


def _sample(t: torch.Tensor, per_tensor: int) -> torch.Tensor:
    """Evenly strided entries of a flat tensor, at most ``per_tensor`` (a copy)."""
    stride = max(1, t.numel() // per_tensor)
    return t[::stride][:per_tensor].clone()


class FirstStepUpdateCheck:
    """Measures the first step's lost updates: :meth:`before_step` samples, a post-step hook on the
    optimizer compares and then removes itself."""

    def __init__(self, params: list[nn.Parameter], per_tensor: int = 1024) -> None:
        self.params = params
        self.per_tensor = per_tensor
        self.result: UpdateCheckResult | None = None
        self._before: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure after ``optimizer``'s next step that follows a :meth:`before_step`."""
        self._handles = [optimizer.register_step_post_hook(self._post)]

    def before_step(self) -> None:
        """Sample weights and gradients; call once the gradients are final (Lightning's
        ``on_before_optimizer_step``: an optimizer's own pre-step hook runs before a closure computes them)."""
        if self.result is not None:
            return
        with torch.no_grad():
            before = [(_sample(_local(p), self.per_tensor), _sample(_local(p.grad), self.per_tensor))
                      for p in self.params if p.grad is not None]
        self._before = before or None  # a skipped step (gradients dropped) measures nothing

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._before is None:
            return
        sampled = with_gradient = lost = changed = 0
        with torch.no_grad():
            live = [p for p in self.params if p.grad is not None]
            for p, (value, grad) in zip(live, self._before):
                moved = _sample(_local(p), self.per_tensor) != value
                has_grad = grad != 0
                sampled += value.numel()
                with_gradient += int(has_grad.sum())
                lost += int((has_grad & ~moved).sum())
                changed += int(moved.sum())
        low = any(_local(p).dtype in LOW_PRECISION for p in self.params)
        self.result = UpdateCheckResult(sampled, with_gradient, lost, changed, low)
        self._before = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def warning(self) -> str | None:
        """The warning to show for the measured step, or None (float32 weights, or nothing measured)."""
        r = self.result
        if r is None or not r.low_precision:
            return None
        dtypes = sorted({str(_local(p).dtype).removeprefix("torch.") for p in self.params})
        return (
            f"trainable weights are stored in {'/'.join(dtypes)} and updated by a plain optimizer: the first "
            f"optimizer step lost {100 * r.lost_fraction:.1f} % of the weight updates ({r.lost} of {r.with_gradient} "
            "sampled weights with a nonzero gradient did not change; updates smaller than half the 16-bit spacing "
            "round away). For float32 master weights with bf16 compute keep backbone.dtype float32 and "
            "trainer.precision 32-true under p2r.strategies.FSDP2Strategy (param_dtype bfloat16, as configs/sft.yaml), "
            "or use trainer.precision bf16-mixed."
        )


def warn_once(check: FirstStepUpdateCheck) -> None:
    """Issue the check's warning (if any); called once, on rank 0."""
    message = check.warning()
    if message is not None:
        warnings.warn(message, stacklevel=2)
