"""What every p2r LightningModule shares: the injected backbone, AdamW + schedule, and a plain
held-out accuracy check (greedy answers scored by the reasoning-accuracy and format rewards).

The full benchmark evaluation is a callback (callbacks/); this check is what ``p2r validate``
and ``p2r test`` log when no evaluation callback is configured: ``{stage}/accuracy``,
``{stage}/format``, ``{stage}/accuracy/<problem type>`` and, for records with structured facts
(the synthetic set), ``{stage}/perception``: the share of generated observations from which the
rule judge can deduce the answer (does the model look at the video?).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from callbacks.evaluation import Generation
from callbacks.rewards.accuracy import reasoning_accuracy
from callbacks.rewards.format import perception_format, reasoning_format
from callbacks.rewards.judges import JudgeRequest, RuleBasedJudge
from callbacks.segments import split_segments
from p2r.algorithms.nonfinite import NonFiniteGuard, tensors_finite
from p2r.algorithms.settings import require
from p2r.algorithms.update_check import FirstStepUpdateCheck, warn_once
from p2r.backbones.base import VideoBackbone
from p2r.checkpoints import BACKBONE_OPTIONS
from p2r.compat import attached_trainer
from p2r.data.datamodule import Sample
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.shard_reader import SkipLog
from p2r.strategies import is_sharded
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
        eval_temperature: float = 0.0,
        eval_top_p: float = 1.0,
        prompt_template: PromptTemplate = "videop2r",
        max_nonfinite_steps: int = 3,
    ) -> None:
        """
        Args:
            backbone: The video LVLM (``p2r.backbones.*``).
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay (not applied to biases and norms).
            warmup_ratio: Fraction of the optimizer steps spent warming the learning rate up linearly.
            schedule: Learning-rate decay after warmup.
            eval_max_new_tokens: Longest answer generated in validation/test/predict.
            eval_temperature: Sampling temperature when evaluating; 0 is greedy (the paper's
                temperature 0.01 / top_p 0.001 is greedy in all but name).
            eval_top_p: Nucleus mass when evaluating with a temperature above 0.
            prompt_template: Reasoning template of the prompt: videop2r (observation/think/answer), video_r1
                (Video-R1's think/answer training prompt), video_r1_eval (its eval_bench.py prompt), none (bare question).
            max_nonfinite_steps: A step with a NaN/inf loss or gradient is skipped and counted; this
                many in a row stop the run with an error (0: never stop).
        """
        require("lr", lr, lr >= 0, ">= 0")
        require("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        require("warmup_ratio", warmup_ratio, 0 <= warmup_ratio <= 1, "in [0, 1]")
        require("eval_max_new_tokens", eval_max_new_tokens, eval_max_new_tokens >= 1, ">= 1")
        require("eval_temperature", eval_temperature, eval_temperature >= 0, ">= 0 (0: greedy)")
        require("eval_top_p", eval_top_p, 0 < eval_top_p <= 1, "in (0, 1]")
        require("max_nonfinite_steps", max_nonfinite_steps, max_nonfinite_steps >= 0, ">= 0 (0: never stop)")
        super().__init__()
        self.backbone = backbone
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.schedule = schedule
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_temperature = eval_temperature
        self.eval_top_p = eval_top_p
        self.prompt_template = prompt_template
        self.skipped_samples = 0
        self._backbone_ready = False
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.update_check: FirstStepUpdateCheck | None = None
        self._bad_loss_in_step = False
        self._stop_error: FloatingPointError | None = None  # raised at on_train_end (see count_step)
        self.skip_log = SkipLog(logging.getLogger(__name__), "training records")

    def configure_model(self) -> None:
        self.backbone.build()
        if not self._backbone_ready:
            self._backbone_ready = True
            self.on_backbone_built()
        for model in self.models_to_shard():
            self.shard(model)

    def on_backbone_built(self) -> None:
        """Runs once, at the first ``configure_model``: the weights exist, nothing is sharded or restored yet."""

    def models_to_shard(self) -> list[torch.nn.Module]:
        """The models a sharded strategy splits over the ranks (PA-GRPO adds its reference copy)."""
        return [self.backbone.model]

    def shard(self, model: torch.nn.Module) -> None:
        """Apply the strategy's FSDP2 sharding (p2r.strategies.FSDP2Strategy) to ``model``, if any."""
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy) and not hasattr(strategy, "parallelize"):
            raise ValueError(
                "trainer.strategy: Lightning's ModelParallelStrategy leaves sharding to the module; p2r shards "
                "with p2r.strategies.FSDP2Strategy (configs/strategy/fsdp2.yaml). Use that instead."
            )
        if strategy is not None and hasattr(strategy, "parallelize"):
            strategy.parallelize(model, self.backbone.fsdp_block_classes())

    # Optimizer steps per training batch (PA-GRPO's num_iterations); sizes the schedule.
    optimizer_steps_per_batch = 1

    def configure_optimizers(self) -> Any:
        if self.trainer.max_steps > 0:
            total = self.trainer.max_steps  # counts optimizer steps, also under manual optimization
        else:
            total = int(self.trainer.estimated_stepping_batches) * self.optimizer_steps_per_batch
        config = adamw_with_schedule(self, self.lr, self.weight_decay, self.warmup_ratio, self.schedule, total)
        self.update_check = FirstStepUpdateCheck([p for p in self.parameters() if p.requires_grad])
        self.update_check.attach(config["optimizer"])
        return config

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the first optimizer step: log how many weight updates were rounded away (warn when
        # the weights are 16-bit; p2r.algorithms.update_check).
        check = self.update_check
        if check is not None and check.result is not None:
            self.log("train/update_lost_fraction", check.result.lost_fraction, batch_size=1)
            self.log("train/update_changed_fraction", check.result.changed_fraction, batch_size=1)
            if self.global_rank == 0:
                warn_once(check)
            self.update_check = None

    def agreed(self, flag: bool) -> bool:
        """``flag`` if it holds on every rank (a collective: every rank must call it)."""
        return self.trainer.strategy.reduce_boolean_decision(flag, all=True) if attached_trainer(self) is not None else flag

    def count_step(self, finite: bool, what: str) -> bool:
        """Record one optimizer step's outcome (already agreed across ranks): log the total of bad
        steps and, after too many in a row, stop the run. Called once per optimizer step; returns ``finite``.

        The stop is orderly: the trainer ends after this (skipped) step, so checkpoint callbacks
        see a finished step and ``last.ckpt`` holds the final weights; the error is raised at
        ``on_train_end``, after them, so the run still fails with the guard's message.
        """
        try:
            self.nonfinite.record(finite, what, self.global_step)
        except FloatingPointError as err:
            self._stop_error = err
            if attached_trainer(self) is None:
                raise
            self.trainer.should_stop = True
        self.log("train/nonfinite_steps", float(self.nonfinite.total), batch_size=1)
        return finite

    def on_train_end(self) -> None:
        if self._stop_error is not None:
            error, self._stop_error = self._stop_error, None
            raise error

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self._drop_nonfinite_gradients(optimizer)
        if self.update_check is not None:
            self.update_check.before_step()

    def _drop_nonfinite_gradients(self, optimizer: Any) -> None:
        # Automatic optimization: a step that saw a non-finite loss (in any accumulated batch) or
        # has non-finite gradients loses its gradients, so AdamW leaves every parameter alone.
        if not self.automatic_optimization:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._bad_loss_in_step:  # counted when the loss was seen
            self._bad_loss_in_step = False
            finite = False
        else:
            finite = self.count_step(self.agreed(tensors_finite(p.grad for p in params)), "gradients")
        if not finite:
            for p in params:
                p.grad = None

    def skip_nonfinite_loss(self, loss: torch.Tensor) -> bool:
        """True (counted once per optimizer step, and the step skipped) when ``loss`` is not finite on some rank."""
        if self.agreed(bool(torch.isfinite(loss))):
            return False
        if not self._bad_loss_in_step:
            self._bad_loss_in_step = True
            self.count_step(False, "loss")
        return True

    def prompts_of(self, batch: list[Sample], user_texts: list[str] | None = None) -> list[str]:
        """Chat-rendered prompts for a batch (the video placeholder included): the given user texts,
        by default each record's process-aware prompt."""
        if user_texts is None:
            user_texts = [build_prompt(s.record, self.prompt_template) for s in batch]
        return [self.backbone.render_prompt(u, s.record.data_type) for u, s in zip(user_texts, batch)]

    def count_skipped(self, batch: list[Sample], dropped: int = 0) -> None:
        """Count what was skipped for this step: the items the data workers could not use while
        assembling ``batch`` and ``dropped`` samples the algorithm could not use; log the run's total.

        Every rank calls this once per training batch (a collective): the total is summed over the
        ranks and saved in checkpoints, so ``data/skipped_samples`` counts every skip of the run.
        """
        step = torch.tensor(float(sum(s.skipped for s in batch) + dropped), device=self.device)
        if attached_trainer(self) is not None and self.trainer.world_size > 1:
            step = self.trainer.strategy.reduce(step, reduce_op="sum")
        self.skipped_samples += int(step.item())
        self.log("data/skipped_samples", float(self.skipped_samples), batch_size=max(1, len(batch)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A later stage's weights_from needs the adapters' options to merge them (p2r.backbones.base).
        checkpoint[BACKBONE_OPTIONS] = self.backbone.stored_options()
        checkpoint["p2r_skipped_samples"] = self.skipped_samples

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_samples = int(checkpoint.get("p2r_skipped_samples", 0))

    def generate_answers(self, batch: list[Sample], prompts: list[str] | None = None,
                         generation: Generation | None = None) -> list[str]:
        """Decoded answers for a batch.

        ``prompts`` are user texts (an evaluation callback's benchmark-specific prompts); by
        default the process-aware prompt of each record. ``generation`` (new tokens, temperature,
        top_p; temperature 0 is greedy) replaces the module's ``eval_*`` settings, for protocols
        that prescribe their own. Documented hook for callbacks.
        """
        if generation is None:
            generation = Generation(self.eval_max_new_tokens, self.eval_temperature, self.eval_top_p)
        ids = self.backbone.generate(
            self.prompts_of(batch, prompts), [s.clip for s in batch], generation.max_new_tokens,
            do_sample=generation.temperature > 0, temperature=generation.temperature or 1.0, top_p=generation.top_p,
        )
        return self.backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _evaluation_callback_present(self) -> bool:
        return any(getattr(cb, "generates_answers", False) for cb in self.trainer.callbacks)

    def _answer_check(self, batch: list[Sample], stage: str) -> None:
        if self._evaluation_callback_present():
            return  # the evaluation callback generates and scores this batch itself
        texts = self.generate_answers(batch)
        n = len(batch)
        acc = [reasoning_accuracy(t, s.record.solution, s.record.problem_type, s.record.options) for t, s in zip(texts, batch)]
        fmt = [perception_format(t) * reasoning_format(t) for t in texts]
        self.log(f"{stage}/accuracy", sum(acc) / n, batch_size=n, sync_dist=True, prog_bar=True)
        self.log(f"{stage}/format", sum(fmt) / n, batch_size=n, sync_dist=True, prog_bar=True)
        for kind in sorted({s.record.problem_type for s in batch}):
            vals = [a for a, s in zip(acc, batch) if s.record.problem_type == kind]
            self.log(f"{stage}/accuracy/{kind}", sum(vals) / len(vals), batch_size=len(vals), sync_dist=True)
        judged = [
            JudgeRequest(s.record.problem, s.record.answer, split_segments(t).observation, s.record.facts)
            for t, s in zip(texts, batch)
            if s.record.facts and s.record.facts.get("evidence")
        ]
        if judged:
            verdicts = [r.score or 0.0 for r in RuleBasedJudge(cache_size=0).judge(judged)]
            self.log(f"{stage}/perception", sum(verdicts) / len(verdicts), batch_size=len(verdicts), sync_dist=True)

    def _refuse_sharded_evaluation(self, stage: str) -> None:
        # Evaluation streams give each sample to exactly one rank, so ranks get unequal numbers of
        # batches; a sharded model needs every rank in every forward (all-gathers): it would hang.
        if self.trainer.world_size > 1 and is_sharded(self.backbone.model):
            raise RuntimeError(
                f"{stage} with an FSDP2-sharded model on {self.trainer.world_size} ranks would deadlock (ranks get "
                "unequal numbers of evaluation batches). Evaluate with strategy ddp (configs/eval.yaml) on the "
                "checkpoint or an exported folder (tools/export_hf.py); during fit set trainer.limit_val_batches=0."
            )

    def on_validation_start(self) -> None:
        self._refuse_sharded_evaluation("validation")

    def on_test_start(self) -> None:
        self._refuse_sharded_evaluation("test")

    def on_predict_start(self) -> None:
        self._refuse_sharded_evaluation("predict")

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "val")

    def test_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "test")

    def predict_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:
        texts = self.generate_answers(batch)
        return [{"id": s.record.id, "output": t} for s, t in zip(batch, texts)]
