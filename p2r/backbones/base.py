"""The video LVLM behind one small interface: every Hugging Face specific lives in this package.

A backbone owns a model and its processor. It is constructed cheaply (the processor only); the
weights are built by :meth:`VideoBackbone.build`, which the LightningModules call from
``configure_model`` so that sharded strategies can build each rank's part. Subclasses say how to
make the processor and the model (:class:`p2r.backbones.hf.HFBackbone` from a hub id or folder,
:mod:`p2r.backbones.tiny` from a config with an in-process tokenizer).

Building (:mod:`p2r.backbones.building`): the options applied on top of any model: dtype,
attention implementation, gradient checkpointing, a frozen vision tower, LoRA adapters (peft),
4/8-bit loading (bitsandbytes), ``weights_from`` (a Lightning checkpoint of an earlier stage, e.g.
the SFT run that PA-GRPO starts from) and frozen copies. The runtime interface is this class:
prompts and batches (:mod:`p2r.backbones.batching`), generate, the forward with its log-prob head
(:meth:`VideoBackbone.apply_head`), prefill and decode steps (:mod:`p2r.backbones.decoding`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from p2r.backbones.batching import collate, left_align, move_to, pad
from p2r.backbones.building import LoraOptions, block_classes, build_model, frozen_copy, stored_options, vision_tower
from p2r.backbones.decoding import DecodeEngine, Decoding, StaticDecoder, custom_mask_support, prefill
from p2r.data.video import Clip
from p2r.strategies import gathered, is_sharded

log = logging.getLogger(__name__)

# The encode() entry marking target tokens (not a model input).
TARGET_MASK = "target_mask"


class VideoBackbone(nn.Module):
    """A video LVLM (model + processor) with the options every p2r job shares."""

    def __init__(
        self,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        freeze_vision: bool = False,
        lora: LoraOptions | None = None,
        quantization: Literal["4bit", "8bit"] | None = None,
        weights_from: str | None = None,
    ) -> None:
        """
        Args:
            dtype: Parameter dtype of the model (use bfloat16 on GPUs; mixed precision is the Trainer's).
            attn_implementation: "sdpa", "eager" or "flash_attention_2".
            gradient_checkpointing: Recompute activations in the backward pass to save memory.
            freeze_vision: Keep the vision tower's weights fixed.
            lora: Train LoRA adapters instead of the full language model (None: full fine-tuning).
            quantization: Load the base weights in 4-bit NF4 (QLoRA) or 8-bit via bitsandbytes.
            weights_from: A Lightning checkpoint whose ``backbone.*`` weights are loaded after building.
        """
        super().__init__()
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.freeze_vision = freeze_vision
        self.lora = lora
        self.quantization = quantization
        self.weights_from = weights_from
        self.model: nn.Module | None = None
        self.processor = self._make_processor()
        self._decoder: StaticDecoder | None = None
        self._decode_fallback_logged: str | None = None

    # --- what subclasses provide -------------------------------------------------------------
    def _make_processor(self) -> Any:
        raise NotImplementedError

    def _make_model(self, torch_dtype: torch.dtype, quantization_config: Any) -> nn.Module:
        raise NotImplementedError

    # --- building ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def is_built(self) -> bool:
        return self.model is not None

    def _make_empty_model(self, torch_dtype: torch.dtype) -> nn.Module:
        """The plain model's structure on the meta device: shapes and dtypes, no weights, nothing read.
        Subclasses that load weights (a hub folder) or create them on a set device override this."""
        with torch.device("meta"):
            return self._make_model(torch_dtype, None)

    def build(self, empty: bool = False) -> None:
        """Create the weights and apply the options (:func:`p2r.backbones.building.build_model`);
        a second call does nothing.

        ``empty``: build the structure only, on the meta device (LoRA adapters, frozen vision tower
        and checkpointing included; ``weights_from`` is not read): what a sharded run's ranks shard
        before rank 0 sends each its part of :meth:`full_model` (:func:`p2r.strategies.load_from_rank0`).
        """
        if self.is_built:
            return
        if empty:
            if self.quantization is not None:
                raise ValueError("an empty (meta-device) build cannot hold 4/8-bit quantized weights")
            self.model = build_model(lambda dtype, _: self._make_empty_model(dtype), self.torch_dtype, None, self.lora,
                                     None, self.freeze_vision, self.gradient_checkpointing)
        else:
            self.model = self.full_model()

    def full_model(self) -> nn.Module:
        """A new model with every option applied and its weights made or loaded (``weights_from``
        included), in host memory: what :meth:`build` holds, or, in a sharded run, rank 0's source."""
        return build_model(
            self._make_model, self.torch_dtype, self.quantization, self.lora, self.weights_from, self.freeze_vision,
            self.gradient_checkpointing,
        )

    def stored_options(self) -> dict[str, Any]:
        """What a checkpoint must record for a later stage to rebuild these weights (LoRA options,
        quantization)."""
        return stored_options(self.lora, self.quantization)

    @staticmethod
    def vision_tower(model: nn.Module) -> nn.Module:
        """The vision encoder submodule of ``model`` (the policy, or a copy of it)."""
        return vision_tower(model)

    # --- the interface the modules use ---------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a completion: the chat turn end and the tokenizer's eos."""
        ids = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        unk = self.tokenizer.unk_token_id
        return sorted(i for i in ids if i is not None and i != unk)

    @property
    def media_token_ids(self) -> list[int]:
        """Vision placeholder tokens: a completion must never contain one (the model would look for
        pixels to put there), so generation suppresses them."""
        names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                 getattr(self.tokenizer, "image_token", None), getattr(self.tokenizer, "video_token", None))
        ids = {self.tokenizer.convert_tokens_to_ids(n) for n in names if n}
        unk = self.tokenizer.unk_token_id
        return sorted(i for i in ids if i is not None and i != unk and i >= 0)

    @property
    def device(self) -> torch.device:
        """Where the built model's parameters are: batches go there."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The built model's parameter dtype: pixels and additive attention masks take it."""
        return self.model.dtype

    def move(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on the model's device, its pixel tensors in the model's dtype."""
        return move_to(batch, self.device, self.dtype)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    def render_prompt(self, user_text: str, data_type: str | None) -> str:
        """The chat-formatted prompt (with the media placeholder; none for ``data_type=None``, a text-only
        turn) that generation continues."""
        content = [{"type": "text", "text": user_text}]
        if data_type is not None:
            content.insert(0, {"type": "image" if data_type == "image" else "video"})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def process_one(self, prompt: str, clip: Clip | None) -> dict[str, torch.Tensor]:
        """Processor outputs for one rendered prompt and its clip (batch dimension 1); ``clip=None``
        for a text-only prompt."""
        if clip is None:
            out = self.processor(text=[prompt], return_tensors="pt")
        elif clip.is_image:
            out = self.processor(text=[prompt], images=[clip.frames[0]], return_tensors="pt")
        else:
            from transformers.video_utils import VideoMetadata

            # Real timestamps reach the processor as positions in units of the average frame period:
            # Qwen3-VL prints position / fps (= the frame's timestamp, uneven for VFR clips) and
            # Qwen2.5-VL spaces frames by duration / frame count; a constant-rate clip gives its indices.
            meta = VideoMetadata(
                total_num_frames=clip.total_frames,
                fps=clip.fps,
                frames_indices=[t * clip.fps for t in clip.timestamps],
                height=clip.frames.shape[1],
                width=clip.frames.shape[2],
            )
            out = self.processor(
                text=[prompt], videos=[clip.frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt"
            )
        return dict(out)

    def encode(self, prompts: list[str], clips: list[Clip | None], targets: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Batch model inputs for rendered prompts (+ optional target completions), right-padded.

        With ``targets`` the target text and an end-of-turn token follow each prompt, and
        ``target_mask`` (B, L) is True on exactly those tokens (what SFT trains on,
        ``p2r.algorithms.sft``). Targets are tokenized on their own, exactly as generation would
        produce them after the prompt.
        """
        items = [self.process_one(p, c) for p, c in zip(prompts, clips)]
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        seqs, in_target = [], []
        for i, item in enumerate(items):
            ids = item["input_ids"][0]
            tgt = ids[:0]
            if targets is not None:
                tgt = torch.tensor(self.tokenizer(targets[i], add_special_tokens=False)["input_ids"] + [end], dtype=ids.dtype)
            seqs.append(torch.cat([ids, tgt]))
            in_target.append(torch.cat([torch.zeros(len(ids), dtype=torch.bool), torch.ones(len(tgt), dtype=torch.bool)]))
        batch = collate(items, seqs, self.pad_token_id)
        if targets is not None:
            batch[TARGET_MASK] = pad(in_target, False)
        return batch

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        clips: list[Clip | None],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Completions (token ids, up to and including the end-of-turn token) for a batch of prompts.

        A ``None`` clip is a text-only prompt (rendered with ``data_type=None``). Prompts are left-padded so that every completion starts right after its own prompt.
        """
        batch = self.encode(prompts, clips)
        batch = self.move(left_align(batch))
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        with gathered(self.model):
            out = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.media_token_ids,
                # transformers turns this on for FSDP models on several ranks: an all-reduce per token so
                # that ranks decode in lock-step. The parameters stay gathered for the whole call
                # (gathered / held_whole), so the decode needs no collective and ranks may stop apart.
                synced_gpus=False,
                **kwargs,
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [trim_completion(ids, self.eos_token_ids, self.pad_token_id) for ids in new]

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits (B, L, V) for a batch from :meth:`encode`."""
        inputs = {k: v for k, v in inputs.items() if k != TARGET_MASK}
        handle = self.model.register_forward_hook(_logits_only, prepend=True)
        try:
            return self.model(**inputs, use_cache=False).logits
        finally:
            handle.remove()

    def position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Explicit positions for a padded batch: (3, B, L) for mrope models, else (B, L).

        Computed from the whole sequence by the model's ``get_rope_index`` (padding excluded via
        the attention mask), never from its stateful ``rope_deltas``.
        """
        rope = self._rope_index_fn()
        if rope is None:
            mask = batch["attention_mask"]
            return (mask.long().cumsum(-1) - 1).clamp(min=0)
        params = inspect.signature(rope).parameters
        kwargs = {k: v for k, v in batch.items() if k in params and k != "input_ids"}
        return rope(batch["input_ids"], **kwargs)[0]

    @property
    def architecture(self) -> str:
        """The built model's Hugging Face ``model_type`` (e.g. ``qwen2_5_vl``)."""
        return self.model.config.model_type

    def custom_mask_support(self) -> tuple[bool, str]:
        """Whether the built model takes a custom additive 4-D attention mask as given, and why (not)
        (what packed shared-prompt rows and the compiled decode need)."""
        return custom_mask_support(self.model, self.attn_implementation)

    @torch.no_grad()
    def prefill(
        self,
        tensors: dict[str, torch.Tensor],
        position_ids: torch.Tensor,
        group_size: int,
        max_new_tokens: int,
        engine: DecodeEngine = "eager",
    ) -> tuple[torch.Tensor, Decoding]:
        """Prefill B left-padded prompts once; return the first logits (B*G, V) and the decoder of
        the B*G rows (row i continues prompt i // G), whose ``step`` feeds one token per row.

        ``engine``: "eager" (dynamic cache) or "compiled" (static cache, compiled step; falls back
        to eager, with the reason logged, where the model cannot; :mod:`p2r.backbones.decoding`).
        """
        static = self._static_decoder() if engine == "compiled" else None
        return prefill(self.model, tensors, position_ids, group_size, max_new_tokens, static)

    def _static_decoder(self) -> StaticDecoder | None:
        """The compiled engine's state (made on first use), or None (logged) where it cannot run."""
        ok, why = self.custom_mask_support()
        if self._decoder is not None and self._decoder.failure is not None:
            ok, why = False, f"compiling failed earlier ({self._decoder.failure})"
        if not ok:
            if why != self._decode_fallback_logged:
                log.warning("rollout.engine 'compiled' is not possible: %s; using the eager engine", why)
                self._decode_fallback_logged = why
            return None
        if self._decoder is None:
            self._decoder = StaticDecoder(self.pad_token_id, sharded=is_sharded(self.model))
        return self._decoder

    def apply_head(
        self,
        fn: Callable[[torch.Tensor, Callable], torch.Tensor],
        logits_to_keep: int,
        model: nn.Module | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Run ``model``'s forward (default: the policy, ``self.model``) with ``fn(hidden, head)`` in
        place of its LM head and return that tensor. ``model`` is any module with the backbone's
        architecture and inputs, e.g. PA-GRPO's frozen reference copy.

        ``hidden`` (B, K, H) are the final hidden states of the last K positions, ``head`` maps
        hidden states to logits. The head's own call computes nothing but this: no (B, K, V) logits
        exist unless ``fn`` makes them. ``fn`` runs inside the forward and its result is the
        forward's output, so FSDP2 gathers the head's weights for it in the forward and again
        before its backward (FSDP2 reshards the root after the forward and gathers it when the
        gradient reaches the root's outputs); FSDP, LoRA and checkpointing hooks all apply.
        Valid where logits are head(hidden) with nothing after it (Qwen-VL; not Gemma's softcapping).
        """
        model = self.model if model is None else model
        if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
            raise NotImplementedError(f"{self.architecture} caps its logits after the head; apply_head would skip that")
        full: list[torch.Tensor] = []

        def keep_last_column(module: nn.Module, args: tuple) -> tuple:
            full.append(args[0])  # (B, K, H)
            return (args[0][:, -1:],)

        def apply_fn(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return fn(full.pop(), module.forward)  # forward, not __call__: these hooks must not run again

        head = model.get_output_embeddings()
        handles = [head.register_forward_pre_hook(keep_last_column), head.register_forward_hook(apply_fn),
                   model.register_forward_hook(_logits_only, prepend=True)]
        try:
            return model(**inputs, use_cache=False, logits_to_keep=logits_to_keep).logits
        finally:
            for handle in handles:
                handle.remove()

    def _rope_index_fn(self) -> Any:
        for module in self.model.modules():
            if hasattr(module, "get_rope_index") and hasattr(module, "visual"):
                return module.get_rope_index
        return None

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within this context the model is the base model (LoRA off): the free reference policy."""
        if self.lora is None:
            raise RuntimeError("adapters_disabled() needs LoRA; without LoRA the reference is a frozen copy")
        with self.model.disable_adapter():
            yield

    def frozen_copy(self, dtype: torch.dtype) -> nn.Module:
        """An eval-mode copy of the model that never trains, its parameters in ``dtype``: PA-GRPO's
        reference policy (:func:`p2r.backbones.building.frozen_copy`)."""
        return frozen_copy(self.model, dtype)

    def fsdp_block_classes(self) -> set[type[nn.Module]]:
        """Module classes to shard one by one: decoder layers and vision blocks."""
        return block_classes(self.model)


def _logits_only(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook on the whole model, run before FSDP2's own (``prepend``): its output reduced to
    the logits. Qwen-VL models also return their vision encoder's outputs, whose per-clip features
    are ``torch.split`` views that require grad; FSDP2 warns about every view a unit returns
    ("returned a view tensor"), and nothing reads those features after the forward."""
    return type(output)(logits=output.logits)


def trim_completion(ids: list[int], eos_ids: list[int], pad_id: int) -> list[int]:
    """Cut generated ids after the first end token (kept); drop trailing padding."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids
