"""What every p2r LightningModule shares: the injected backbone, AdamW + schedule, sharding in
``configure_model``, skipped non-finite steps (:mod:`p2r.algorithms.nonfinite`), the count of
skipped samples, the lost-update check of the first step, answer generation, the rows that
``p2r predict`` writes (:mod:`p2r.predictions`) and, without an evaluation callback, the plain
held-out check of ``p2r validate`` / ``p2r test`` (:mod:`p2r.evaluation.answer_check`:
``{stage}/accuracy``, ``{stage}/format``, ...).

Evaluation on a model sharded over several ranks (FSDP2) holds the model whole for the pass
(:func:`p2r.strategies.held_whole`), so ranks with unequal numbers of evaluation batches never
wait on each other; evaluation callbacks get the same through :meth:`VideoLVLMModule.evaluating`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch

from callbacks.evaluation import Generation
from p2r.algorithms.nonfinite import NonFiniteSteps
from p2r.algorithms.settings import require
from p2r.algorithms.update_check import FirstStepUpdateCheck, warn_once
from p2r.backbones.base import VideoBackbone
from p2r.checkpoints import BACKBONE_OPTIONS
from p2r.compat import attached_trainer
from p2r.data.datamodule import Sample
from p2r.data.prompts import PromptTemplate, build_prompt
from p2r.data.video import Clip
from p2r.evaluation.answer_check import PROGRESS_BAR_METRICS, answer_check
from p2r.optim import adamw_with_schedule
from p2r.predictions import prediction_row
from p2r.strategies import held_whole, load_from_rank0, shard


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
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.update_check: FirstStepUpdateCheck | None = None
        self._evaluation_hold: contextlib.ExitStack | None = None
        self._answer_totals: dict[str, list[float]] = {}  # metric name -> [sum, samples] of the current pass, this rank

    def configure_model(self) -> None:
        """Build the backbone (and, through :meth:`on_backbone_built`, any copy of it), then shard what
        :meth:`models_to_shard` names. Under FSDP2 on several ranks the models are built empty (meta
        device) and sharded, and rank 0 alone makes the weights and sends each rank its shard."""
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        from_rank0 = (not self.backbone.is_built and getattr(strategy, "builds_on_rank0", False)
                      and self.backbone.quantization is None)  # quantized: FSDP2 refuses it in shard()
        self.backbone.build(empty=from_rank0)
        if not self._backbone_ready:
            self._backbone_ready = True
            self.on_backbone_built()
        models = self.models_to_shard()
        for model in models:
            shard(strategy, model, self.backbone.fsdp_block_classes())
        if from_rank0:
            source = self.backbone.full_model() if strategy.global_rank == 0 else None
            for model in models:
                load_from_rank0(model, source, strategy.root_device)

    def on_backbone_built(self) -> None:
        """Runs once, at the first ``configure_model``: the weights exist, nothing is sharded or restored yet."""

    def models_to_shard(self) -> list[torch.nn.Module]:
        """The models a sharded strategy splits over the ranks (PA-GRPO adds its reference copy)."""
        return [self.backbone.model]

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

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.automatic_optimization:  # PA-GRPO's manual update checks its own steps
            self.nonfinite.drop_gradients(self, optimizer)
        if self.update_check is not None:
            self.update_check.before_step()

    def on_train_end(self) -> None:
        self.nonfinite.raise_stop()  # after the checkpoint callbacks saved the final step

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
        return self._decode(self.prompts_of(batch, prompts), [s.clip for s in batch], generation)

    def generate_text(self, prompts: list[str], generation: Generation | None = None) -> list[str]:
        """Decoded answers to text-only user turns: the backbone with no video (what an analysis asks
        when a text model answers from a description). ``generation`` as in :meth:`generate_answers`.
        Documented hook for callbacks."""
        return self._decode([self.backbone.render_prompt(p, None) for p in prompts], [None] * len(prompts), generation)

    def _decode(self, rendered: list[str], clips: list[Clip | None], generation: Generation | None) -> list[str]:
        if generation is None:
            generation = Generation(self.eval_max_new_tokens, self.eval_temperature, self.eval_top_p)
        ids = self.backbone.generate(
            rendered, clips, generation.max_new_tokens,
            do_sample=generation.temperature > 0, temperature=generation.temperature or 1.0, top_p=generation.top_p,
        )
        return self.backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _evaluation_callback_present(self) -> bool:
        return any(getattr(cb, "generates_answers", False) for cb in self.trainer.callbacks)

    def _answer_check(self, batch: list[Sample], stage: str) -> None:
        if self._evaluation_callback_present():
            return  # the evaluation callback generates and scores this batch itself
        for name, (value, n) in answer_check(self.generate_answers(batch), [s.record for s in batch]).items():
            total = self._answer_totals.setdefault(name, [0.0, 0])
            total[0] += value * n
            total[1] += n

    def _log_answer_totals(self, stage: str) -> None:
        """Log the pass's answer-check means, summed over the ranks.

        Summed here rather than by ``self.log(sync_dist=True)``: ranks see different problem types,
        and a rank may have had no batch at all, so each would log other names and Lightning's
        per-name reductions would not pair up across ranks (a hang, or a crash at the first rank
        that finished). Every rank takes part in the same two collectives over the union of names.
        """
        totals, self._answer_totals = self._answer_totals, {}
        if self._evaluation_callback_present():
            return
        names = set(totals)
        if self.trainer.world_size > 1:
            every: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(every, sorted(names))
            names = set().union(*every)
        names = sorted(names)
        sums = torch.tensor([totals.get(name, [0.0, 0]) for name in names], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1 and names:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for name, (total, n) in zip(names, sums.tolist()):
            if n:
                # Equal on every rank already: sync_dist only keeps Lightning from warning (a mean of equal values).
                self.log(f"{stage}/{name}", total / n, batch_size=int(n), prog_bar=name in PROGRESS_BAR_METRICS, sync_dist=True)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode, and a sharded model held whole, for an evaluation pass a callback runs itself
        (its ranks may then run different numbers of batches). Documented hook for callbacks."""
        was_training = self.training
        self.eval()
        try:
            with held_whole(self.backbone.model):
                yield
        finally:
            self.train(was_training)

    def _hold_for_evaluation(self) -> None:
        # Lightning's evaluation loops: held from the stage's start hook to its end hook.
        self._evaluation_hold = contextlib.ExitStack()
        self._evaluation_hold.enter_context(held_whole(self.backbone.model))

    def _release_after_evaluation(self) -> None:
        if self._evaluation_hold is not None:
            self._evaluation_hold.close()
            self._evaluation_hold = None

    def on_validation_start(self) -> None:
        self._hold_for_evaluation()

    def on_validation_end(self) -> None:
        self._release_after_evaluation()

    def on_test_start(self) -> None:
        self._hold_for_evaluation()

    def on_test_end(self) -> None:
        self._release_after_evaluation()

    def on_predict_start(self) -> None:
        self._hold_for_evaluation()

    def on_predict_end(self) -> None:
        self._release_after_evaluation()

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_answer_totals("val")

    def test_step(self, batch: list[Sample], batch_idx: int) -> None:
        self._answer_check(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_answer_totals("test")

    def predict_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:
        """One predictions.jsonl row per sample (:func:`p2r.predictions.prediction_row`): the process-aware
        prompt, the generated output and its parsed parts; a sample whose media failed is not generated
        for and keeps its error."""
        answerable = [s for s in batch if not s.error]
        outputs = iter(self.generate_answers(answerable) if answerable else [])
        return [prediction_row(s, build_prompt(s.record, self.prompt_template), None if s.error else next(outputs))
                for s in batch]
