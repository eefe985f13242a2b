"""Process-aware SFT: teach the backbone to answer in the observation -> think -> answer template.

Implements the SFT stage of VideoP2R (METHOD.md): one epoch over the process-aware CoT records,
target = ``<observation>...</observation> <think>...</think> <answer>...</answer>`` followed by
the end-of-turn token. The loss is the token-mean cross-entropy over the assistant's answer
only: the prompt, the video/image placeholder tokens and padding are masked (Video-R1 computed
the loss over the prompt too). The (batch x length x vocabulary) logits never exist: the LM head
runs on the answer positions only, ``loss_chunk_tokens`` at a time, each chunk's logits recomputed
in the backward (:func:`answer_loss`), as the RL log-probs do. Paper scale: batch 8 x
accumulation 2, Qwen2.5-VL-7B-Instruct, 16 frames at 128*28*28 pixels, bf16.

``target_template: video_r1`` trains Video-R1's think/answer target instead
(:func:`p2r.data.records.think_answer_target`): the SFT stage of the T-GRPO baseline
(configs/sft_video_r1.yaml), whose prompt must then be Video-R1's too (``prompt_template: video_r1``).

Departures: a record without a CoT trace (no ``output`` and no ``observation``+``process``) is
a data error: it is skipped with a warning and counted in ``data/skipped_samples``, not trained on
as a bare answer.

Launch:
    python -m p2r fit --config configs/sft.yaml                          # paper scale
    python -m p2r fit --config configs/sft.yaml --config configs/tiny.yaml  # CPU demo
    python -m p2r fit --config configs/sft_video_r1.yaml                 # Video-R1's SFT (T-GRPO's start)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from p2r.algorithms.base import VideoLVLMModule
from p2r.algorithms.rollout import LOGPROB_CHUNK_TOKENS, token_logprobs
from p2r.algorithms.settings import require
from p2r.backbones.base import TARGET_MASK, VideoBackbone
from p2r.backbones.batching import move_to
from p2r.data.datamodule import Sample
from p2r.data.records import SFT_TARGETS, RecordError, TargetTemplate
from p2r.data.shard_reader import SkipLog
from p2r.data.video import Clip

IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)


def answer_labels(input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, L): the token ids where ``target_mask`` (B, L) is True (the assistant's answer and
    its end-of-turn token), IGNORE_INDEX on the prompt, its vision placeholders and padding."""
    return input_ids.masked_fill(~target_mask, IGNORE_INDEX)


def sft_batch(backbone: VideoBackbone, prompts: list[str], clips: list[Clip], targets: list[str]) -> tuple[dict, torch.Tensor]:
    """Model inputs for rendered prompts followed by their targets, and the labels (B, L) of the
    answer-only loss (:func:`answer_labels`)."""
    inputs = backbone.encode(prompts, clips, targets)
    return inputs, answer_labels(inputs["input_ids"], inputs.pop(TARGET_MASK))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE_INDEX, from full logits.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) hold the target ids at
    their own positions, so both are shifted by one before comparing. The plain definition of the
    SFT loss; training computes the same value without the logits (:func:`answer_loss`).
    """
    pred = logits[:, :-1].flatten(0, 1).float()  # (B*(L-1), V)
    gold = labels[:, 1:].flatten()  # (B*(L-1),)
    return F.cross_entropy(pred, gold, ignore_index=IGNORE_INDEX)


def answer_span(labels: torch.Tensor) -> int:
    """How many final positions of the rows the loss reads (the model's ``logits_to_keep``): from the
    first position that predicts a labelled token, in any row, to the end. labels (B, L); 1 if none is labelled."""
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0)  # (L-1,): position t predicts label t+1
    if not scored.any():
        return 1
    return labels.shape[1] - int(scored.nonzero()[0])


def chunked_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> torch.Tensor:
    """:func:`masked_lm_loss` of ``head(hidden)`` without those logits: from the final hidden states
    (B, K, H) of the rows' last K positions, the LM ``head`` (hidden -> logits) and labels (B, L), K <= L
    (at least :func:`answer_span`).

    Only the M positions that predict a labelled token go through the head, ``chunk_tokens`` at a
    time in float32, each chunk's logits recomputed in the backward
    (:func:`p2r.algorithms.rollout.token_logprobs`): at most (chunk_tokens x V) logits exist at once,
    in either pass, instead of (B x L x V).
    """
    gold = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[:, -hidden.shape[1] :]  # (B, K): position t's next token
    scored = gold != IGNORE_INDEX  # (B, K)
    return -token_logprobs(hidden[scored], head, gold[scored], chunk_tokens=chunk_tokens).mean()  # over the M of (M, H)


def answer_loss(
    backbone: VideoBackbone, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> torch.Tensor:
    """``masked_lm_loss(backbone(**inputs), labels)`` computed inside the model's forward by
    :func:`chunked_lm_loss` on the hidden states of the answer span (:func:`answer_span`), through
    :meth:`VideoBackbone.apply_head` (so FSDP2, LoRA and checkpointing hooks apply as usual)."""
    loss_of = partial(chunked_lm_loss, labels=labels, chunk_tokens=chunk_tokens)
    return backbone.apply_head(loss_of, answer_span(labels), **inputs)


class SFTModule(VideoLVLMModule):
    """Supervised fine-tuning on chain-of-thought targets, process-aware by default (answer tokens only)."""

    def __init__(
        self,
        *args: Any,
        target_template: TargetTemplate = "videop2r",
        loss_chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            target_template: Assistant text trained on: videop2r (observation/think/answer, METHOD.md),
                video_r1 (Video-R1's <think>...</think> then <answer>...</answer>, the T-GRPO baseline's SFT).
            loss_chunk_tokens: Answer tokens whose logits the loss computes at once (fewer: less memory, more head calls).
            *args, **kwargs: The arguments of :class:`p2r.algorithms.base.VideoLVLMModule` (backbone, lr, schedule, ...).
        """
        require("target_template", target_template, target_template in SFT_TARGETS, f"one of {', '.join(SFT_TARGETS)}")
        require("loss_chunk_tokens", loss_chunk_tokens, loss_chunk_tokens >= 1, ">= 1")
        super().__init__(*args, **kwargs)
        self.target_template = target_template
        self.loss_chunk_tokens = loss_chunk_tokens
        self.save_hyperparameters(ignore=["backbone"])
        self.skip_log = SkipLog(logging.getLogger(__name__), "training records")
        self._step_start = 0.0

    def _trainable(self, batch: list[Sample]) -> tuple[list[Sample], list[str]]:
        keep, targets = [], []
        for s in batch:
            try:
                targets.append(SFT_TARGETS[self.target_template](s.record))
                keep.append(s)
            except RecordError as err:
                self.skip_log.skip("no CoT target", str(err))
        return keep, targets

    def training_step(self, batch: list[Sample], batch_idx: int) -> torch.Tensor | None:
        trainable, targets = self._trainable(batch)
        self.count_skipped(batch, dropped=len(batch) - len(trainable))
        batch = trainable
        if not batch:
            return None
        inputs, labels = sft_batch(self.backbone, self.prompts_of(batch), [s.clip for s in batch], targets)
        inputs, labels = move_to(inputs, self.device, self.backbone.torch_dtype), labels.to(self.device)
        loss = answer_loss(self.backbone, inputs, labels, self.loss_chunk_tokens)
        n = len(batch)
        if self.nonfinite.skip_loss(self, loss):
            return None  # no backward for this batch and no update for this step, on every rank
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/target_tokens", float((labels != IGNORE_INDEX).sum()), batch_size=n)
        self._tokens = int(inputs["attention_mask"].sum())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # Wall time between batch ends: data wait, forward, backward and optimizer step all count.
        now = time.perf_counter()
        if self._step_start and getattr(self, "_tokens", 0):
            self.log("train/tokens_per_s", self._tokens / (now - self._step_start), prog_bar=True, batch_size=1)
        self._step_start = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
