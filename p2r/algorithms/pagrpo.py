"""PA-GRPO: process-aware GRPO with separate perception and reasoning advantages (VideoP2R).

Each step (METHOD.md, "PA-GRPO"):
  1. rollout: G completions per prompt (p2r.algorithms.rollout: the video encoded and the prompt
     prefilled once per prompt, the KV cache shared by the G samples);
  2. every reward callback on the trainer scores the Rollouts (callbacks/: reasoning accuracy,
     format, length, the perception judge, optionally the T-GRPO temporal bonus); the module sums
     them per process, R_i,k = sum of the rewards that feed process k;
  3. advantages: A_i,k = (R_i,k - mean_group) / (std_group + eps), separately for k in {P, R};
     A_i,P goes to the perception tokens of sample i, A_i,R to its reasoning tokens;
  4. loss: PPO clipped surrogate per token + beta * k3 KL to the reference (the SFT model:
     LoRA adapters disabled, or a frozen copy made before any update), aggregated per process
     segment (``loss_aggregation``), ``num_iterations`` optimizer steps per rollout batch.

``mode: grpo`` is plain GRPO (one reward summed over all callbacks, one advantage on every
token); plain GRPO + a TemporalBonusReward callback is Video-R1's T-GRPO.

Departures / choices where the paper is silent (all configurable):
  - a reward of NaN (the judge's drop_group failure policy) removes the sample's whole group
    from the update; a truncated completion can be removed too (``mask_truncated``);
  - log-probs divide logits by the sampling temperature (as TRL does);
  - the reference policy is built from the same weights the policy starts from (``weights_from``),
    before a resumed checkpoint is restored, so resuming never moves the reference.

Launch:
    python -m p2r fit --config configs/pagrpo.yaml                          # paper scale
    python -m p2r fit --config configs/pagrpo.yaml --config configs/tiny.yaml  # CPU, tiny SFT start
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Literal

import numpy as np
import torch

from callbacks.reward_callbacks import needs_shuffled_frames, notify_rollouts_scored, score_all
from callbacks.rollouts import Rollouts
from p2r.algorithms.advantages import group_advantages, group_dropped, process_advantages, token_advantages
from p2r.algorithms.base import VideoLVLMModule
from p2r.algorithms.nonfinite import tensors_finite
from p2r.algorithms.policy_loss import pagrpo_loss
from p2r.algorithms.rollout import (
    GroupRollout,
    build_train_batch,
    completion_logprobs,
    generate_groups,
    perception_masks,
)
from p2r.algorithms.shared_prompt import shared_prompt_logprobs, supports_shared_prompt
from p2r.backbones.decoding import DecodeEngine
from p2r.data.datamodule import Sample
from p2r.data.prompts import build_question
from p2r.data.video import Clip
from p2r.strategies import gathered

Aggregation = Literal["segment_mean", "token_mean", "sequence_mean", "constant"]


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Row indices 0..n-1 in consecutive chunks of at most ``size``."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def micro_weight(mode: str, rows_mask: torch.Tensor, all_mask: torch.Tensor) -> float:
    """Share of the whole-batch loss that a micro-batch's aggregated loss stands for.

    Summing weight x micro-loss over the micro-batches gives the loss of the whole batch:
    token_mean weighs by tokens; the per-sample modes by samples that have tokens; constant
    (Dr. GRPO) by rows.
    """
    if mode == "token_mean":
        return float(rows_mask.sum()) / max(1.0, float(all_mask.sum()))
    if mode == "constant":
        return rows_mask.shape[0] / all_mask.shape[0]
    return float(rows_mask.any(1).sum()) / max(1.0, float(all_mask.any(1).sum()))


def completion_mask_of(rollout: GroupRollout, rows: list[int]) -> torch.Tensor:
    """(n, T) True on the real tokens of completions ``rows``; T is the longest of them."""
    lengths = torch.tensor([len(rollout.completion_ids[i]) for i in rows])  # (n,)
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (n, T)


def shuffled_clip(clip: Clip, rng: random.Random) -> Clip:
    """The same frames in a random temporal order (T-GRPO's contrast)."""
    order = list(range(len(clip.frames)))
    rng.shuffle(order)
    return Clip(clip.frames[order], clip.fps, clip.frame_indices, clip.total_frames, clip.is_image)


class PAGRPOModule(VideoLVLMModule):
    """Process-aware GRPO (and plain GRPO / T-GRPO) on a video LVLM backbone."""

    def __init__(
        self,
        *args: Any,
        mode: Literal["pa_grpo", "grpo"] = "pa_grpo",
        group_size: int = 8,
        max_completion_length: int = 768,
        temperature: float = 1.0,
        top_p: float = 0.95,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        loss_aggregation: Aggregation = "segment_mean",
        scale_rewards: bool = True,
        advantage_eps: float = 1e-4,
        mask_truncated: bool = False,
        micro_batch_size: int = 8,
        shared_prompt: bool = True,
        max_grad_norm: float = 5.0,
        rollout_seed: int = 0,
        rollout_engine: DecodeEngine = "compiled",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            mode: "pa_grpo": per-process rewards and advantages (VideoP2R); "grpo": one summed reward
                and one advantage for all tokens (plain GRPO; add TemporalBonusReward for T-GRPO).
            group_size: Completions sampled per prompt (G; paper 8).
            max_completion_length: Most tokens generated per completion (paper 768).
            temperature: Sampling temperature of rollouts (paper 1.0).
            top_p: Nucleus mass of rollouts (paper 0.95).
            beta: Weight of the k3 KL to the reference policy (0 skips the reference pass).
            epsilon: Clip range below (and above, unless epsilon_high) the ratio 1.
            epsilon_high: Upper clip range (DAPO's clip-higher); None: same as epsilon.
            num_iterations: Optimizer steps on each rollout batch (>1 uses stored old log-probs).
            loss_aggregation: "segment_mean" (mean per process segment, then per sample, the paper's
                reading), "token_mean" (DAPO), "sequence_mean" (GRPO), "constant" (Dr. GRPO).
            scale_rewards: Divide by the group std (False: Dr. GRPO's mean-centering only).
            advantage_eps: Added to the group std.
            mask_truncated: Leave completions that hit max_completion_length out of the loss.
            micro_batch_size: Completions per forward/backward in the log-prob and update passes
                (with shared_prompt, whole groups: max(1, micro_batch_size // group_size) prompts).
            shared_prompt: Run each prompt and its video once per group in the log-prob and update
                passes (one packed row, 4-D mask; p2r.algorithms.shared_prompt); False: one row per
                completion, the prompt repeated G times (TRL/Video-R1's way).
            max_grad_norm: Gradient-norm clip per optimizer step (paper 5).
            rollout_seed: Seed of rollout sampling (offset by step and by each prompt's index in the global batch).
            rollout_engine: Decode steps of rollouts: "compiled" (static KV cache, torch.compile'd step, CUDA
                graphs on GPU; falls back to "eager", with the reason logged, where the model cannot) or
                "eager" (dynamic cache, no compile time); p2r.backbones.decoding.
            *args, **kwargs: The arguments of :class:`p2r.algorithms.base.VideoLVLMModule`.
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.mode = mode
        self.group_size = group_size
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.beta = beta
        self.epsilon = epsilon
        self.epsilon_high = epsilon_high
        self.num_iterations = num_iterations
        self.loss_aggregation = loss_aggregation
        self.scale_rewards = scale_rewards
        self.advantage_eps = advantage_eps
        self.mask_truncated = mask_truncated
        self.micro_batch_size = micro_batch_size
        self.shared_prompt = shared_prompt
        self.max_grad_norm = max_grad_norm
        self.rollout_seed = rollout_seed
        self.rollout_engine = rollout_engine
        self.optimizer_steps_per_batch = num_iterations

    # --- set-up ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.shared_prompt:
            ok, why = supports_shared_prompt(self.backbone)
            if not ok:
                raise ValueError(
                    f"model.init_args.shared_prompt: true is not possible with this backbone: {why}. "
                    "Set shared_prompt: false to use the per-sample passes."
                )

    def on_backbone_built(self) -> None:
        if self.beta > 0 and self.backbone.lora is None:
            # Copied now, before sharding and before Lightning restores a resumed checkpoint: the
            # reference stays the starting (SFT) policy. Kept out of the module's registry so it is
            # never saved.
            reference = copy.deepcopy(self.backbone.model).eval().requires_grad_(False)
            object.__setattr__(self, "_reference_model", reference)

    def models_to_shard(self) -> list[torch.nn.Module]:
        reference = getattr(self, "_reference_model", None)
        return super().models_to_shard() + ([reference] if reference is not None else [])

    def on_fit_start(self) -> None:
        reference = getattr(self, "_reference_model", None)
        if reference is not None:
            reference.to(self.device)

    # --- the step --------------------------------------------------------------------------------
    def _generators(self, num_prompts: int) -> list[torch.Generator]:
        """One generator per prompt, seeded by step and the prompt's index in the global batch
        (rank-major): the same samples whatever the number of ranks the batch is split over."""
        first = self.global_rank * num_prompts
        gens = []
        for index in range(first, first + num_prompts):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.rollout_seed + 1_000_003 * self.global_step + index)
            gens.append(gen)
        return gens

    def _rollout(self, batch: list[Sample]) -> tuple[GroupRollout, Rollouts, list[list[bool]]]:
        prompts, clips = self.prompts_of(batch), [s.clip for s in batch]
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with gathered(self.backbone.model):
                gen = self._generators(len(batch))
                rollout = generate_groups(
                    self.backbone, prompts, clips, self.group_size, self.max_completion_length,
                    self.temperature, self.top_p, gen, engine=self.rollout_engine,
                )
                shuffled = None
                if needs_shuffled_frames(self.trainer.callbacks):
                    rng = random.Random(self.rollout_seed + self.global_step)
                    other = generate_groups(
                        self.backbone, prompts, [shuffled_clip(c, rng) for c in clips], self.group_size,
                        self.max_completion_length, self.temperature, self.top_p, gen, engine=self.rollout_engine,
                    )
                    shuffled = self.backbone.tokenizer.batch_decode(other.completion_ids, skip_special_tokens=True)
        finally:
            self.backbone.train(was_training)
        texts, masks = perception_masks(self.backbone.tokenizer, rollout.completion_ids)
        rollouts = Rollouts(
            group_size=self.group_size,
            prompts=[self._prompt_meta(s) for s in batch],
            completions=texts,
            completion_ids=rollout.completion_ids,
            truncated=rollout.truncated,
            perception_token_lengths=[sum(m) for m in masks],
            reasoning_token_lengths=[len(m) - sum(m) for m in masks],
            shuffled_completions=shuffled,
        )
        return rollout, rollouts, masks

    @staticmethod
    def _prompt_meta(sample: Sample) -> dict[str, Any]:
        r = sample.record
        return {
            "id": r.id,
            "question": build_question(r),
            "options": r.options,
            "answer": r.answer,
            "problem_type": r.problem_type,
            "data_type": r.data_type,
            "facts": r.facts,
        }

    def _advantages(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_P, A_R, keep) per sample; keep is False for dropped groups and masked truncations."""
        totals = {k: torch.tensor(v, dtype=torch.float32) for k, v in rollouts.process_totals().items()}
        summed = torch.tensor(rollouts.total(), dtype=torch.float32)  # (N,)
        if self.mode == "pa_grpo":
            adv = process_advantages(totals, self.group_size, self.advantage_eps, self.scale_rewards)
            adv_p, adv_r = adv["perception"], adv["reasoning"]
        else:
            adv_p = adv_r = group_advantages(summed, self.group_size, self.advantage_eps, self.scale_rewards)
        keep = ~group_dropped(summed, self.group_size)
        if self.mask_truncated:
            keep &= ~torch.tensor(rollouts.truncated, dtype=torch.bool)
        return adv_p, adv_r, keep

    def _token_tensors(
        self, rows: list[int], masks: list[list[bool]], adv_p: torch.Tensor, adv_r: torch.Tensor, keep: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = completion_mask.shape[1]
        perception = torch.zeros(len(rows), t, dtype=torch.bool)
        for r, i in enumerate(rows):
            perception[r, : len(masks[i])] = torch.tensor(masks[i], dtype=torch.bool)
        perception = perception.to(self.device)
        comp = completion_mask & keep[rows].to(self.device)[:, None]  # (n, T)
        adv = token_advantages(adv_p[rows].to(self.device), adv_r[rows].to(self.device), perception & comp, comp)
        return adv, perception & comp, comp

    def _chunks(self, num_prompts: int) -> list[list[int]]:
        """Sample indices per micro-batch; whole groups when the prompt is shared."""
        g = self.group_size
        if not self.shared_prompt:
            return micro_batches(num_prompts * g, self.micro_batch_size)
        groups = micro_batches(num_prompts, max(1, self.micro_batch_size // g))
        return [[p * g + j for p in prompts for j in range(g)] for prompts in groups]

    def _logprobs(self, rollout: GroupRollout, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (n, T) of the completions ``rows`` and their mask, under the current model."""
        if self.shared_prompt:
            prompts = sorted({i // self.group_size for i in rows})
            return shared_prompt_logprobs(self.backbone, rollout, prompts, self.temperature)
        batch = build_train_batch(self.backbone, rollout, rows)
        return completion_logprobs(self.backbone, batch, self.temperature), batch.completion_mask

    def _reference_logprobs(self, rollout: GroupRollout, rows: list[int]) -> torch.Tensor | None:
        if self.beta == 0:
            return None
        if self.backbone.lora is not None:
            with self.backbone.adapters_disabled():
                return self._logprobs(rollout, rows)[0]
        policy = self.backbone.model
        self.backbone.model = self._reference_model
        try:
            return self._logprobs(rollout, rows)[0]
        finally:
            self.backbone.model = policy

    def training_step(self, batch: list[Sample], batch_idx: int) -> None:
        self.count_skipped(batch)
        t0 = time.perf_counter()
        rollout, rollouts, masks = self._rollout(batch)
        t1 = time.perf_counter()
        score_all(self.trainer, self, rollouts)
        notify_rollouts_scored(self.trainer, self, rollouts)
        t2 = time.perf_counter()
        adv_p, adv_r, keep = self._advantages(rollouts)
        prepared = []
        with torch.no_grad():
            for rows in self._chunks(rollouts.num_prompts):
                completion_mask = completion_mask_of(rollout, rows).to(self.device)
                adv, perception, comp = self._token_tensors(rows, masks, adv_p, adv_r, keep, completion_mask)
                # With one update per rollout batch the old policy is the current one: no extra pass.
                old = self._logprobs(rollout, rows)[0] if self.num_iterations > 1 else None
                prepared.append((rows, adv, perception, comp, old, self._reference_logprobs(rollout, rows)))
        all_mask = torch.cat([self._pad_cols(p[3], self.max_completion_length) for p in prepared])
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, float] = {}
        for _ in range(self.num_iterations):
            if self._update(rollout, prepared, all_mask, stats):
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        t3 = time.perf_counter()
        self._log_step(rollouts, adv_p, adv_r, keep, stats, rollout_s=t1 - t0, score_s=t2 - t1, update_s=t3 - t2)

    def _update(self, rollout: GroupRollout, prepared: list, all_mask: torch.Tensor, stats: dict[str, float]) -> bool:
        """Backward over every micro-batch; False (and no step) when a loss or gradient is not finite."""
        for rows, adv, perception, comp, old, ref in prepared:
            logp = self._logprobs(rollout, rows)[0]
            loss, metrics = pagrpo_loss(
                logp, old if old is not None else logp.detach(), ref, adv, comp,
                beta=self.beta, eps_low=self.epsilon, eps_high=self.epsilon_high, mode=self.loss_aggregation,
                perception_mask=perception, max_completion_length=self.max_completion_length,
            )
            if not self.agreed(bool(torch.isfinite(loss))):
                return self.count_step(False, "loss")
            w = micro_weight(self.loss_aggregation, self._pad_cols(comp, self.max_completion_length), all_mask)
            self.manual_backward(loss * w)
            for k, v in {"loss": loss, **metrics}.items():
                stats[k] = stats.get(k, 0.0) + w * float(v.detach()) / self.num_iterations
        finite = self.agreed(tensors_finite(p.grad for p in self.parameters() if p.requires_grad))
        return self.count_step(finite, "gradients")

    @staticmethod
    def _pad_cols(mask: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(mask, (0, max(0, width - mask.shape[1])))

    def _log_step(self, rollouts: Rollouts, adv_p, adv_r, keep, stats, rollout_s, score_s, update_s) -> None:
        n = len(rollouts)
        log = lambda name, value, bar=False: self.log(name, float(value), batch_size=n, prog_bar=bar)  # noqa: E731
        totals = rollouts.process_totals()
        for process, values in totals.items():
            log(f"train/reward/{process}", np.nanmean(values) if values else 0.0, bar=True)
        log("train/reward/total", np.nanmean(rollouts.total()))
        for name, adv in (("perception", adv_p), ("reasoning", adv_r)):
            log(f"train/advantage_abs/{name}", adv[keep].abs().mean() if keep.any() else 0.0)
        groups = adv_r.view(-1, self.group_size)
        log("train/zero_advantage_groups", (groups.abs().sum(1) == 0).float().mean())
        log("train/dropped_fraction", 1 - keep.float().mean())
        for k, v in stats.items():
            log(f"train/{k}", v, bar=k in ("loss", "kl"))
        lengths = [len(ids) for ids in rollouts.completion_ids]
        log("train/completion_length", np.mean(lengths))
        log("train/perception_length", np.mean(rollouts.perception_token_lengths))
        log("train/reasoning_length", np.mean(rollouts.reasoning_token_lengths))
        log("train/truncated_fraction", np.mean(rollouts.truncated))
        log("time/rollout_s", rollout_s)
        log("time/reward_s", score_s)
        log("time/update_s", update_s)
        log("train/lr", self.optimizers().param_groups[0]["lr"])
