"""Skipping steps whose loss or gradients are not finite, and stopping when it keeps happening.

One NaN/inf step (an fp16/bf16 overflow, a degenerate batch) should not poison the weights or the
Adam moments: the step is skipped (no backward for a bad loss; for bad gradients the gradients are
dropped, so AdamW leaves every parameter and its moments untouched), counted and logged as
``train/nonfinite_steps``. ``max_in_a_row`` bad steps in a row mean something is broken (the lr,
the data, the weights): the run stops with an error that says what and where. Ranks decide
together (one bad rank skips the step on all), so DDP/FSDP never waits on a rank that skipped.
The learning-rate schedule still advances on a skipped step.

:class:`NonFiniteSteps` is a LightningModule's side of it (``module.nonfinite``): the base module
calls it from its hooks under automatic optimization (SFT), PA-GRPO's manual update calls
:meth:`NonFiniteSteps.count` itself.
"""

from __future__ import annotations

from typing import Any

import torch

from p2r.compat import attached_trainer


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


def agreed(module: Any, flag: bool) -> bool:
    """``flag`` if it holds on every rank of ``module``'s run (a collective: every rank must call it)."""
    trainer = attached_trainer(module)
    return trainer.strategy.reduce_boolean_decision(flag, all=True) if trainer is not None else flag


class NonFiniteSteps:
    """Skipping, counting and stopping for one LightningModule (see the module doc)."""

    def __init__(self, max_in_a_row: int) -> None:
        self.guard = NonFiniteGuard(max_in_a_row)
        self.bad_loss_in_step = False  # automatic optimization: this optimizer step saw a non-finite loss
        self.stop_error: FloatingPointError | None = None  # raised by raise_stop at on_train_end

    @property
    def total(self) -> int:
        """Non-finite steps skipped in this run."""
        return self.guard.total

    def count(self, module: Any, finite: bool, what: str) -> bool:
        """Record one optimizer step's outcome (already agreed across ranks): log the total of bad
        steps and, after too many in a row, stop the run. Called once per optimizer step; returns ``finite``.

        The stop is orderly: the trainer ends after this (skipped) step, so checkpoint callbacks
        see a finished step and ``last.ckpt`` holds the final weights; the error is raised at
        ``on_train_end`` (:meth:`raise_stop`), after them, so the run still fails with the guard's message.
        """
        try:
            self.guard.record(finite, what, module.global_step)
        except FloatingPointError as err:
            self.stop_error = err
            trainer = attached_trainer(module)
            if trainer is None:
                raise
            trainer.should_stop = True
        module.log("train/nonfinite_steps", float(self.guard.total), batch_size=1)
        return finite

    def skip_loss(self, module: Any, loss: torch.Tensor) -> bool:
        """True (counted once per optimizer step, and the step skipped) when ``loss`` is not finite on some rank."""
        if agreed(module, bool(torch.isfinite(loss))):
            return False
        if not self.bad_loss_in_step:
            self.bad_loss_in_step = True
            self.count(module, False, "loss")
        return True

    def drop_gradients(self, module: Any, optimizer: Any) -> None:
        """Before an automatic optimizer step: a step that saw a non-finite loss (in any accumulated
        batch) or has non-finite gradients loses its gradients, so AdamW leaves every parameter alone."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.bad_loss_in_step:  # counted when the loss was seen
            self.bad_loss_in_step = False
            finite = False
        else:
            finite = self.count(module, agreed(module, tensors_finite(p.grad for p in params)), "gradients")
        if not finite:
            for p in params:
                p.grad = None

    def raise_stop(self) -> None:
        """Raise the error that stopped the run, once (at ``on_train_end``)."""
        if self.stop_error is not None:
            error, self.stop_error = self.stop_error, None
            raise error
