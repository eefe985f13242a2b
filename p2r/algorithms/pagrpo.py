"""PA-GRPO: process-aware GRPO with separate perception and reasoning advantages (VideoP2R).

Each step (METHOD.md, "PA-GRPO"):
  1. rollout: G completions per prompt (p2r.algorithms.rollout: the video encoded and the prompt
     prefilled once per prompt, the KV cache shared by the G samples);
  2. every reward callback on the trainer scores the Rollouts (callbacks/: reasoning accuracy,
     format, length, the perception judge, T-GRPO's temporal bonus); the module sums them per
     process, R_i,k = sum of the rewards that feed process k;
  3. advantages: A_i,k = (R_i,k - mean_group) / (std_group + eps), separately for k in {P, R};
     A_i,P goes to the perception tokens of sample i (a sample with no observation: its first
     token, where it chose not to observe), A_i,R to its reasoning tokens;
  4. loss: PPO clipped surrogate per token + beta * k3 KL to the reference (the SFT model),
     aggregated per group and process (``loss.aggregation: process_mean``: the mean over a
     group's perception tokens plus the mean over its reasoning tokens), ``num_iterations``
     optimizer steps per rollout batch.

``loss.mode: grpo`` sums every configured reward into one, with one advantage on every token:
with the reasoning rewards only and ``sequence_mean`` it is process-agnostic GRPO
(configs/grpo.yaml), with both processes' rewards the paper's "without separate assignment"
(configs/joint.yaml; ``sum_of_advantages`` is the other reading: A_P + A_R on every token). With
a TemporalBonusReward callback the module also samples ``rollout.shuffled_samples`` completions
per video prompt on shuffled frames: Video-R1's T-GRPO (configs/tgrpo.yaml).

Logged every step besides the rewards (why a run is flat should be readable from its log): KL,
entropy (mean -log p of the sampled tokens), clip fractions, zero-advantage groups per process,
the share of rows with no perception token, the mean token advantage per segment.

The reference policy is the model the run starts from (``backbone.weights_from``: the SFT model;
LoRA SFT adapters are merged into the base first, p2r.backbones.base). With LoRA it is the policy
with its adapters disabled; otherwise a frozen copy made before any update (and before a resumed
checkpoint is restored), its parameters in the dtype the policy computes in (bf16 under
configs' FSDP2), passed explicitly to the log-prob functions and never saved in checkpoints.

Departures / choices where the paper is silent (all configurable):
  - a reward of NaN (the judge's drop_group failure policy) removes the sample's whole group
    from the update; a truncated completion can be removed too (``loss.mask_truncated``);
  - log-probs divide logits by the sampling temperature (as TRL does).

Launch:
    python -m p2r fit --config configs/pagrpo.yaml                          # paper scale
    python -m p2r fit --config configs/pagrpo.yaml --config configs/tiny.yaml --config configs/tiny_rl.yaml  # CPU
    python -m p2r fit --config configs/grpo.yaml     # process-agnostic GRPO (ablation)
    python -m p2r fit --config configs/joint.yaml    # without separate assignment (ablation)
    python -m p2r fit --config configs/tgrpo.yaml    # Video-R1's T-GRPO
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from callbacks.reward_callbacks import needs_shuffled_frames, notify_rollouts_scored, score_all
from callbacks.rollouts import Rollouts
from p2r.algorithms.advantages import (
    group_advantages,
    group_dropped,
    process_advantages,
    token_advantages,
    with_choice_token,
)
from p2r.algorithms.base import VideoLVLMModule
from p2r.algorithms.nonfinite import agreed, tensors_finite
from p2r.algorithms.policy_loss import pagrpo_loss
from p2r.algorithms.rollout import (
    GroupRollout,
    build_train_batch,
    completion_logprobs,
    generate_groups,
    perception_masks,
)
from p2r.algorithms.settings import LossSettings, RolloutSettings, require
from p2r.algorithms.shared_prompt import shared_prompt_logprobs, supports_shared_prompt
from p2r.compat import attached_trainer
from p2r.data.datamodule import Sample
from p2r.data.prompts import build_question
from p2r.data.video import Clip
from p2r.strategies import gathered


class MicroBatch(NamedTuple):
    """One micro-batch of the update, prepared once per rollout batch (n samples, T = their longest completion)."""

    rows: list[int]  # (n,) sample indices into the rollout
    advantages: torch.Tensor  # (n, T) A_P on perception tokens, A_R on reasoning tokens, 0 elsewhere
    perception: torch.Tensor  # (n, T) bool, perception tokens of kept samples
    completion: torch.Tensor  # (n, T) bool, completion tokens of kept samples
    old_logp: torch.Tensor | None  # (n, T) sampling policy's log-probs (num_iterations > 1), else None
    ref_logp: torch.Tensor | None  # (n, T) reference log-probs (beta > 0), else None


@dataclass
class Reference:
    """The KL's reference policy. ``model`` is a frozen copy, or None: the policy with its LoRA adapters off.

    Held in this plain container, not as a submodule, so that checkpoints, ``.train()`` and the
    optimizer never see the copy; the module shards it and moves it to the device itself.
    """

    model: nn.Module | None


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Row indices 0..n-1 in consecutive chunks of at most ``size``."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def micro_weight(mode: str, rows_mask: torch.Tensor, all_mask: torch.Tensor, group_size: int = 1) -> float:
    """Share of the whole-batch loss that a micro-batch's aggregated loss stands for.

    Summing weight x micro-loss over the micro-batches gives the loss of the whole batch:
    token_mean weighs by tokens; sequence_mean by samples that have tokens; process_mean by
    groups that have tokens (its micro-batches hold whole groups of ``group_size`` rows);
    constant (Dr. GRPO) by rows.
    """
    if mode == "token_mean":
        return float(rows_mask.sum()) / max(1.0, float(all_mask.sum()))
    if mode == "constant":
        return rows_mask.shape[0] / all_mask.shape[0]
    if mode == "process_mean":
        groups = lambda m: float(m.reshape(-1, group_size * m.shape[1]).any(1).sum())  # noqa: E731
        return groups(rows_mask) / max(1.0, groups(all_mask))
    return float(rows_mask.any(1).sum()) / max(1.0, float(all_mask.any(1).sum()))


def completion_mask_of(rollout: GroupRollout, rows: list[int]) -> torch.Tensor:
    """(n, T) True on the real tokens of completions ``rows``; T is the longest of them."""
    lengths = torch.tensor([len(rollout.completion_ids[i]) for i in rows])  # (n,)
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (n, T)


def shuffled_clip(clip: Clip, rng: random.Random) -> Clip:
    """The same frames in a random temporal order (T-GRPO's contrast); the timestamps stay the
    ordered clip's, so only the content moves, as in Video-R1 (which permutes the frame tensor)."""
    order = list(range(len(clip.frames)))
    rng.shuffle(order)
    return replace(clip, frames=clip.frames[order])


def segment_advantage_means(prepared: list[MicroBatch]) -> dict[str, float]:
    """Mean per-token advantage on the perception and on the reasoning tokens of the kept samples
    (``advantage_mean/perception``, ``advantage_mean/reasoning``; 0 where a segment has no token)."""
    sums, counts = {"perception": 0.0, "reasoning": 0.0}, {"perception": 0, "reasoning": 0}
    for mb in prepared:
        for name, mask in (("perception", mb.perception), ("reasoning", mb.completion & ~mb.perception)):
            sums[name] += float(mb.advantages[mask].sum())
            counts[name] += int(mask.sum())
    return {f"advantage_mean/{k}": sums[k] / counts[k] if counts[k] else 0.0 for k in sums}


class PAGRPOModule(VideoLVLMModule):
    """Process-aware GRPO (and plain GRPO / T-GRPO) on a video LVLM backbone."""

    def __init__(
        self,
        *args: Any,
        rollout: RolloutSettings = RolloutSettings(),
        loss: LossSettings = LossSettings(),
        num_iterations: int = 1,
        micro_batch_size: int = 8,
        shared_prompt: bool = True,
        max_grad_norm: float = 5.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            rollout: How completions are sampled (group size, length, temperature, top_p, seed).
            loss: How rewards become advantages and the loss (mode, aggregation, beta, clip range).
            num_iterations: Optimizer steps on each rollout batch (>1 uses stored old log-probs).
            micro_batch_size: Completions per forward/backward in the log-prob and update passes
                (with shared_prompt, whole groups: max(1, micro_batch_size // group_size) prompts).
            shared_prompt: Run each prompt and its video once per group in the log-prob and update
                passes (one packed row, 4-D mask; p2r.algorithms.shared_prompt); False: one row per
                completion, the prompt repeated G times (TRL/Video-R1's way).
            max_grad_norm: Gradient-norm clip per optimizer step (paper 5).
            *args, **kwargs: The arguments of :class:`p2r.algorithms.base.VideoLVLMModule`.
        """
        require("num_iterations", num_iterations, num_iterations >= 1, ">= 1")
        require("micro_batch_size", micro_batch_size, micro_batch_size >= 1, ">= 1")
        require("max_grad_norm", max_grad_norm, max_grad_norm > 0, "> 0")
        super().__init__(*args, **kwargs)
        self.rollout = rollout
        self.loss = loss
        # Plain dicts in hparams: checkpoints stay loadable with weights_only=True.
        self.save_hyperparameters(ignore=["backbone", "rollout", "loss"])
        self.hparams.update(rollout=asdict(self.rollout), loss=asdict(self.loss))
        self.automatic_optimization = False
        self.num_iterations = num_iterations
        self.micro_batch_size = micro_batch_size
        self.shared_prompt = shared_prompt
        self.max_grad_norm = max_grad_norm
        self.optimizer_steps_per_batch = num_iterations
        self.reference: Reference | None = None

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
        if self.loss.beta == 0:
            return
        if self.backbone.lora is not None:
            self.reference = Reference(None)
            return
        # Copied now, before sharding and before Lightning restores a resumed checkpoint: the
        # reference stays the starting (SFT) policy. In the dtype the policy computes in (the
        # FSDP2 strategy's param_dtype, else the parameters'), so the KL is 0 at the first step.
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        dtype = getattr(strategy, "compute_dtype", None) or next(self.backbone.model.parameters()).dtype
        self.reference = Reference(self.backbone.frozen_copy(dtype))

    def models_to_shard(self) -> list[nn.Module]:
        frozen = [self.reference.model] if self.reference is not None and self.reference.model is not None else []
        return super().models_to_shard() + frozen

    def on_fit_start(self) -> None:
        if self.reference is not None and self.reference.model is not None:
            self.reference.model.to(self.device)

    # --- the step --------------------------------------------------------------------------------
    def _generators(self, num_prompts: int) -> list[torch.Generator]:
        """One generator per prompt, seeded by step and the prompt's index in the global batch
        (rank-major): the same samples whatever the number of ranks the batch is split over."""
        first = self.global_rank * num_prompts
        gens = []
        for index in range(first, first + num_prompts):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.rollout.seed + 1_000_003 * self.global_step + index)
            gens.append(gen)
        return gens

    def _shuffled_completions(self, prompts: list[str], clips: list[Clip], gens: list[torch.Generator]) -> list[str]:
        """T-GRPO's contrast: ``shuffled_samples`` completions per video prompt on its frames in a
        random order (B * shuffled_samples texts; empty for image prompts, which have no order)."""
        k, r = self.rollout.shuffled_samples, self.rollout
        videos = [i for i, clip in enumerate(clips) if not clip.is_image]
        texts = [""] * (len(prompts) * k)
        if not videos:
            return texts
        # One frame order per prompt, seeded like its sampling generator (step, global prompt index).
        first = self.global_rank * len(prompts)
        orders = [random.Random(r.seed + 1_000_003 * self.global_step + first + i) for i in videos]
        other = generate_groups(
            self.backbone, [prompts[i] for i in videos], [shuffled_clip(clips[i], rng) for i, rng in zip(videos, orders)], k,
            r.max_completion_length, r.temperature, r.top_p, [gens[i] for i in videos], engine=r.engine,
        )
        decoded = self.backbone.tokenizer.batch_decode(other.completion_ids, skip_special_tokens=True)
        for j, i in enumerate(videos):
            texts[i * k : (i + 1) * k] = decoded[j * k : (j + 1) * k]
        return texts

    def _rollout(self, batch: list[Sample]) -> tuple[GroupRollout, Rollouts, list[list[bool]]]:
        prompts, clips, r = self.prompts_of(batch), [s.clip for s in batch], self.rollout
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with gathered(self.backbone.model):
                gens = self._generators(len(batch))
                rollout = generate_groups(
                    self.backbone, prompts, clips, r.group_size, r.max_completion_length, r.temperature, r.top_p, gens,
                    engine=r.engine,
                )
                shuffled = None
                if needs_shuffled_frames(self.trainer.callbacks):
                    shuffled = self._shuffled_completions(prompts, clips, gens)
        finally:
            self.backbone.train(was_training)
        texts, masks = perception_masks(self.backbone.tokenizer, rollout.completion_ids)
        rollouts = Rollouts(
            group_size=r.group_size,
            prompts=[self._prompt_meta(s) for s in batch],
            completions=texts,
            completion_ids=rollout.completion_ids,
            truncated=rollout.truncated,
            perception_token_lengths=[sum(m) for m in masks],
            reasoning_token_lengths=[len(m) - sum(m) for m in masks],
            shuffled_completions=shuffled,
            shuffled_group_size=r.shuffled_samples if shuffled is not None else None,
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
            "solution": r.solution,
            "problem_type": r.problem_type,
            "data_type": r.data_type,
            "facts": r.facts,
        }

    def _advantages(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_P, A_R, keep) per sample; keep is False for dropped groups and masked truncations."""
        g, loss = self.rollout.group_size, self.loss
        totals = {k: torch.tensor(v, dtype=torch.float32) for k, v in rollouts.process_totals().items()}
        summed = torch.tensor(rollouts.total(), dtype=torch.float32)  # (N,)
        if loss.mode == "pa_grpo":
            adv = process_advantages(totals, g, loss.advantage_eps, loss.scale_rewards)
            adv_p, adv_r = adv["perception"], adv["reasoning"]
        elif loss.mode == "sum_of_advantages":
            adv = process_advantages(totals, g, loss.advantage_eps, loss.scale_rewards)
            adv_p = adv_r = adv["perception"] + adv["reasoning"]
        else:
            adv_p = adv_r = group_advantages(summed, g, loss.advantage_eps, loss.scale_rewards)
        keep = ~group_dropped(summed, g)
        if loss.mask_truncated:
            keep &= ~torch.tensor(rollouts.truncated, dtype=torch.bool)
        return adv_p, adv_r, keep

    def _token_tensors(
        self, rows: list[int], masks: list[list[bool]], adv_p: torch.Tensor, adv_r: torch.Tensor, keep: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, perception, completion), each (n, T), for the samples ``rows``; a row with no
        perception token gets its first token as one (:func:`with_choice_token`)."""
        t = completion_mask.shape[1]
        perception = torch.zeros(len(rows), t, dtype=torch.bool)  # (n, T)
        for r, i in enumerate(rows):
            perception[r, : len(masks[i])] = torch.tensor(masks[i], dtype=torch.bool)
        perception = perception.to(self.device)
        comp = completion_mask & keep[rows].to(self.device)[:, None]  # (n, T)
        perception = with_choice_token(perception, comp)  # (n, T)
        adv = token_advantages(adv_p[rows].to(self.device), adv_r[rows].to(self.device), perception, comp)
        return adv, perception, comp

    def _chunks(self, num_prompts: int) -> list[list[int]]:
        """Sample indices per micro-batch; whole groups when the prompt is shared or the loss averages per group."""
        g = self.rollout.group_size
        if not self.shared_prompt and self.loss.aggregation != "process_mean":
            return micro_batches(num_prompts * g, self.micro_batch_size)
        groups = micro_batches(num_prompts, max(1, self.micro_batch_size // g))
        return [[p * g + j for p in prompts for j in range(g)] for prompts in groups]

    def _logprobs(self, model: nn.Module, rollout: GroupRollout, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (n, T) of the completions ``rows`` under ``model``, and their mask (n, T)."""
        t = self.rollout.temperature
        if self.shared_prompt:
            prompts = sorted({i // self.rollout.group_size for i in rows})
            return shared_prompt_logprobs(self.backbone, rollout, prompts, t, model=model)
        batch = build_train_batch(self.backbone, rollout, rows)
        return completion_logprobs(self.backbone, batch, t, model=model), batch.completion_mask

    def _reference_logprobs(self, rollout: GroupRollout, rows: list[int]) -> torch.Tensor | None:
        """Log-probs (n, T) under the reference policy; None when the loss has no KL term."""
        if self.reference is None:
            return None
        if self.reference.model is not None:
            return self._logprobs(self.reference.model, rollout, rows)[0]
        with self.backbone.adapters_disabled():
            return self._logprobs(self.backbone.model, rollout, rows)[0]

    def _prepare(
        self, rollout: GroupRollout, masks: list[list[bool]], adv_p: torch.Tensor, adv_r: torch.Tensor, keep: torch.Tensor,
        num_prompts: int,
    ) -> list[MicroBatch]:
        """Per micro-batch: token advantages and masks, and the old-policy and reference log-probs.

        ``adv_p``, ``adv_r`` (N,) per-sample advantages; ``keep`` (N,) bool, samples in the loss.
        """
        prepared = []
        with torch.no_grad():
            for rows in self._chunks(num_prompts):
                completion_mask = completion_mask_of(rollout, rows).to(self.device)  # (n, T)
                adv, perception, comp = self._token_tensors(rows, masks, adv_p, adv_r, keep, completion_mask)
                # With one update per rollout batch the old policy is the current one: no extra pass.
                old = self._logprobs(self.backbone.model, rollout, rows)[0] if self.num_iterations > 1 else None
                prepared.append(MicroBatch(rows, adv, perception, comp, old, self._reference_logprobs(rollout, rows)))
        return prepared

    def training_step(self, batch: list[Sample], batch_idx: int) -> None:
        self.count_skipped(batch)
        t0 = time.perf_counter()
        rollout, rollouts, masks = self._rollout(batch)
        t1 = time.perf_counter()
        score_all(self.trainer, self, rollouts)
        notify_rollouts_scored(self.trainer, self, rollouts)
        t2 = time.perf_counter()
        adv_p, adv_r, keep = self._advantages(rollouts)
        prepared = self._prepare(rollout, masks, adv_p, adv_r, keep, rollouts.num_prompts)
        width = self.rollout.max_completion_length
        all_mask = torch.cat([self._pad_cols(p.completion, width) for p in prepared])  # (N, L)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, float] = {}
        for _ in range(self.num_iterations):
            if self._update(rollout, prepared, all_mask, stats):
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        t3 = time.perf_counter()
        stats.update(segment_advantage_means(prepared))
        self._log_step(rollouts, adv_p, adv_r, keep, stats, rollout_s=t1 - t0, score_s=t2 - t1, update_s=t3 - t2)

    def _update(self, rollout: GroupRollout, prepared: list[MicroBatch], all_mask: torch.Tensor, stats: dict[str, float]) -> bool:
        """Backward over every micro-batch; False (and no step) when a loss or gradient is not finite."""
        loss_cfg, width = self.loss, self.rollout.max_completion_length
        for mb in prepared:
            logp = self._logprobs(self.backbone.model, rollout, mb.rows)[0]  # (n, T)
            loss, metrics = pagrpo_loss(
                logp, mb.old_logp if mb.old_logp is not None else logp.detach(), mb.ref_logp, mb.advantages, mb.completion,
                beta=loss_cfg.beta, eps_low=loss_cfg.epsilon, eps_high=loss_cfg.epsilon_high, mode=loss_cfg.aggregation,
                perception_mask=mb.perception, max_completion_length=width, kl_log_ratio_clip=loss_cfg.kl_log_ratio_clip,
                group_size=self.rollout.group_size,
            )
            if not agreed(self, bool(torch.isfinite(loss))):
                return self.nonfinite.count(self, False, "loss")
            w = micro_weight(loss_cfg.aggregation, self._pad_cols(mb.completion, width), all_mask, self.rollout.group_size)
            self.manual_backward(loss * w)
            for k, v in {"loss": loss, **metrics}.items():
                stats[k] = stats.get(k, 0.0) + w * float(v.detach()) / self.num_iterations
        finite = agreed(self, tensors_finite(p.grad for p in self.parameters() if p.requires_grad))
        return self.nonfinite.count(self, finite, "gradients")

    @staticmethod
    def _pad_cols(mask: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(mask, (0, max(0, width - mask.shape[1])))

    def _log_step(self, rollouts: Rollouts, adv_p, adv_r, keep, stats, rollout_s, score_s, update_s) -> None:
        n = len(rollouts)
        log = lambda name, value, bar=False: self.log(name, float(value), batch_size=n, prog_bar=bar)  # noqa: E731
        fed = set(rollouts.reward_process.values())  # a process with no reward (grpo: perception) is not logged as 0
        for process, values in rollouts.process_totals().items():
            if process in fed:
                log(f"train/reward/{process}", np.nanmean(values) if values else 0.0, bar=True)
        log("train/reward/total", np.nanmean(rollouts.total()))
        for name, adv in (("perception", adv_p), ("reasoning", adv_r)):
            log(f"train/advantage_abs/{name}", adv[keep].abs().mean() if keep.any() else 0.0)
        # Why a flat run is flat: groups with no signal, rows that skipped the observation.
        for name, adv in (("perception", adv_p), ("reasoning", adv_r)):
            log(f"train/zero_advantage_groups/{name}", (adv.view(-1, self.rollout.group_size).abs().sum(1) == 0).float().mean())
        log("train/no_perception_rows", np.mean([length == 0 for length in rollouts.perception_token_lengths]))
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
