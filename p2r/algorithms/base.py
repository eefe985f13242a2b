"""What every p2r LightningModule shares: the injected backbone, AdamW + schedule, and a plain
held-out accuracy check (greedy answers scored by the reasoning-accuracy and format rewards).

The full benchmark evaluation is a callback (callbacks/); this check is what ``p2r validate``
and ``p2r test`` log when no evaluation callback is configured: ``{stage}/accuracy``,
``{stage}/format`` and ``{stage}/accuracy/<problem type>``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch

from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.format import perception_format, reasoning_format
from p2r.backbones.base import VideoBackbone
from p2r.data.datamodule import Sample
from p2r.data.prompts import build_prompt
from p2r.optim import adamw_with_schedule


class VideoLVLMModule(L.LightningModule):
    """Base of SFTModule and PAGRPOModule (keep it small: each algorithm lives in its own file)."""

    def __init__(
        self,
        backbone: VideoBackbone,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        schedule: Literal["cosine", "linear", "constant"] = "cosine",
        eval_max_new_tokens: int = 256,
        prompt_template: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.schedule = schedule
        self.eval_max_new_tokens = eval_max_new_tokens
        self.prompt_template = prompt_template
        self.skipped_samples = 0

    def configure_model(self) -> None:
        self.backbone.build()

    def configure_optimizers(self) -> Any:
        total = int(self.trainer.estimated_stepping_batches)
        return adamw_with_schedule(self, self.lr, self.weight_decay, self.warmup_ratio, self.schedule, total)

    def prompts_of(self, batch: list[Sample]) -> list[str]:
        """Chat-rendered process-aware prompts for a batch (the video placeholder included)."""
        return [
            self.backbone.render_prompt(build_prompt(s.record, self.prompt_template), s.record.data_type) for s in batch
        ]

    def count_skipped(self, batch: list[Sample]) -> None:
        """Add the samples the data workers dropped (malformed/undecodable) and log the total."""
        self.skipped_samples += sum(s.skipped for s in batch)
        self.log("data/skipped_samples", float(self.skipped_samples), batch_size=len(batch))

    def _answer_check(self, batch: list[Sample], stage: str) -> None:
        ids = self.backbone.generate(self.prompts_of(batch), [s.clip for s in batch], self.eval_max_new_tokens)
        texts = self.backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)
        n = len(batch)
        acc = [reasoning_accuracy(t, s.record.solution, s.record.problem_type, s.record.options) for t, s in zip(texts, batch)]
        fmt = [perception_format(t) * reasoning_format(t) for t in texts]
        self.log(f"{stage}/accuracy", sum(acc) / n, batch_size=n, sync_dist=True, prog_bar=True)
        self.log(f"{stage}/format", sum(fmt) / n, batch_size=n, sync_dist=True, prog_bar=True)
        for kind in sorted({s.record.problem_type for s in batch}):
            vals = [a for a, s in zip(acc, batch) if s.record.problem_type == kind]
            self.log(f"{stage}/accuracy/{kind}", sum(vals) / len(vals), batch_size=len(vals), sync_dist=True)

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "val")

    def test_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "test")

    def predict_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:
        ids = self.backbone.generate(self.prompts_of(batch), [s.clip for s in batch], self.eval_max_new_tokens)
        texts = self.backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [{"id": s.record.id, "output": t} for s, t in zip(batch, texts)]

    def token_count(self, inputs: dict[str, torch.Tensor]) -> int:
        return int(inputs["attention_mask"].sum())
