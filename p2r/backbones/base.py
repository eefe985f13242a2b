"""The video LVLM behind one small interface: every Hugging Face specific lives in this package.

A backbone owns a model and its processor. It is constructed cheaply (the processor only); the
weights are built by :meth:`VideoBackbone.build`, which the LightningModules call from
``configure_model`` so that sharded strategies can build each rank's part. Subclasses say how to
make the processor and the model (:class:`p2r.backbones.hf.HFBackbone` from a hub id or folder,
:mod:`p2r.backbones.tiny` from a config with an in-process tokenizer).

Options applied on top of any model: dtype, attention implementation, gradient checkpointing,
a frozen vision tower, LoRA adapters (peft) and 4/8-bit loading (bitsandbytes), and
``weights_from``, a Lightning checkpoint of an earlier stage (e.g. the SFT run that PA-GRPO starts
from) whose ``backbone.*`` weights are loaded after building.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from p2r.backbones.batching import collate, left_align, move_to, pad
from p2r.backbones.decoding import DecodeEngine, Decoding, StaticDecoder, custom_mask_support, prefill
from p2r.checkpoints import read_backbone_options, read_backbone_state
from p2r.data.video import Clip
from p2r.strategies import gathered, is_sharded

log = logging.getLogger(__name__)

# The encode() entry marking target tokens (not a model input).
TARGET_MASK = "target_mask"
_VISUAL_NAMES = ("visual", "vision_tower", "vision_model")


@dataclass
class LoraOptions:
    """LoRA adapters on the language model (peft); the vision tower never gets adapters."""

    r: int = 16
    """Rank of the adapters."""
    alpha: int = 32
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the language-model linear layers that get adapters."""


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

    def build(self) -> None:
        """Create the weights and apply the options; a second call does nothing.

        ``weights_from`` (a p2r checkpoint of an earlier stage, the SFT run) becomes the plain model
        under this run's quantization and adapters, so that "adapters disabled" is the SFT model
        (PA-GRPO's reference with LoRA):
          - a full checkpoint is loaded into the plain model, then quantized if this run is QLoRA;
          - a LoRA checkpoint is rebuilt with ITS adapters (the options its run stored, see
            :meth:`stored_options`), which are merged into the base; this run's adapters start
            fresh on the merged model;
          - a QLoRA checkpoint (4/8-bit base) only feeds a run with the same quantization: its
            adapters are merged into the quantized layers (peft re-quantizes them, so the merged
            model equals the SFT model within the quantization error).
        """
        if self.is_built:
            return
        state = read_backbone_state(self.weights_from, "weights_from") if self.weights_from else None
        quantization = self._quantization_config()
        if state is None:
            model = self._make_model(self.torch_dtype, quantization)
        elif any("lora_" in k for k in state):
            model = self._merged_adapter_checkpoint(state, quantization)
        else:
            model = self._make_model(self.torch_dtype, None)
            _load_checked(model, _model_entries(state), self.weights_from)
            if quantization is not None:
                model = requantize(model, quantization, self.torch_dtype)
        if self.freeze_vision:
            for p in self.vision_tower(model).parameters():
                p.requires_grad_(False)
        if self.quantization is not None:
            from peft import prepare_model_for_kbit_training

            # bitsandbytes on CPUs with AVX512-BF16 repacks a 4-bit layer's weights the first time
            # it runs in eval mode (our rollouts) and cannot train them afterwards: keep the layout.
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            model = self._add_lora(model, self.lora)
        self.model = model

    def stored_options(self) -> dict[str, Any]:
        """What a checkpoint must record for a later stage to rebuild these weights: the adapters'
        options (their scale alpha / r is not in the weights) and the quantization."""
        return {"lora": asdict(self.lora) if self.lora is not None else None, "quantization": self.quantization}

    def _merged_adapter_checkpoint(self, state: dict[str, torch.Tensor], quantization: Any) -> nn.Module:
        """The model a LoRA/QLoRA checkpoint stands for, its adapters merged into the base."""
        path = self.weights_from
        stored = read_backbone_options(path, "weights_from")
        quantized = any(k.endswith((".absmax", ".quant_map")) or ".quant_state." in k or k.endswith(".SCB") for k in state)
        source_quantization = stored.get("quantization") if stored else ("4bit" if quantized else None)
        if quantized and source_quantization != self.quantization:
            raise ValueError(
                f"weights_from: {path!r} is a {source_quantization} (QLoRA) checkpoint; it can only start a run with "
                f"quantization: {source_quantization}, not {self.quantization!r} (its base weights exist only in "
                f"{source_quantization}). Start from the full-precision checkpoint the QLoRA run began with instead."
            )
        if stored is not None and stored.get("lora") is not None:
            adapters = LoraOptions(**stored["lora"])
        elif self.lora is not None:
            adapters = self.lora
            warnings.warn(
                f"weights_from: {path!r} holds LoRA adapters but not their options (a checkpoint from an older p2r); "
                f"merging them with this run's LoRA options ({self.lora}). If the SFT run used another alpha or rank, "
                "the merged model is not the SFT model.",
                stacklevel=2,
            )
        else:
            raise ValueError(
                f"weights_from: {path!r} holds LoRA adapters but not their options (alpha, rank, target modules), "
                "which are needed to merge them into the base; set backbone.lora to the SFT run's LoRA options."
            )
        model = self._make_model(self.torch_dtype, quantization if quantized else None)
        with_adapters = self._add_lora(model, adapters)
        if quantized:
            _load_quantized(with_adapters, _model_entries(state), path)
        else:
            _load_checked(with_adapters, _model_entries(state), path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear.*")
            merged = with_adapters.merge_and_unload()
        if quantization is not None and not quantized:
            merged = requantize(merged, quantization, self.torch_dtype)
        return merged

    def _quantization_config(self) -> Any:
        if self.quantization is None:
            return None
        from transformers import BitsAndBytesConfig

        # The vision tower and lm_head stay in full precision (QLoRA quantizes the language model).
        # Plain names for transformers versions that match substrings, ".*name" for those (5.2x)
        # that match from the start of the module path.
        skip = [*_VISUAL_NAMES, *(f".*{n}" for n in _VISUAL_NAMES), "lm_head"]
        if self.quantization == "4bit":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.torch_dtype,
                llm_int8_skip_modules=skip,
            )
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)

    def _add_lora(self, model: nn.Module, options: LoraOptions) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=list(options.target_modules),
            exclude_modules=r".*(" + "|".join(_VISUAL_NAMES) + r").*",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)

    @staticmethod
    def vision_tower(model: nn.Module) -> nn.Module:
        """The vision encoder submodule, found by the names Hugging Face VLMs use."""
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in _VISUAL_NAMES:
                return module
        raise AttributeError(f"{type(model).__name__} has no vision tower named one of {_VISUAL_NAMES}")

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

    def render_prompt(self, user_text: str, data_type: str) -> str:
        """The chat-formatted prompt (with the media placeholder) that generation continues."""
        content = [{"type": "image" if data_type == "image" else "video"}, {"type": "text", "text": user_text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def process_one(self, prompt: str, clip: Clip) -> dict[str, torch.Tensor]:
        """Processor outputs for one rendered prompt and its clip (batch dimension 1)."""
        if clip.is_image:
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

    def encode(self, prompts: list[str], clips: list[Clip], targets: list[str] | None = None) -> dict[str, torch.Tensor]:
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
        clips: list[Clip],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Completions (token ids, up to and including the end-of-turn token) for a batch of prompts.

        Prompts are left-padded so that every completion starts right after its own prompt.
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
                **kwargs,
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [trim_completion(ids, self.eos_token_ids, self.pad_token_id) for ids in new]

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits (B, L, V) for a batch from :meth:`encode`."""
        inputs = {k: v for k, v in inputs.items() if k != TARGET_MASK}
        return self.model(**inputs, use_cache=False).logits

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
        handles = [head.register_forward_pre_hook(keep_last_column), head.register_forward_hook(apply_fn)]
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
        """An eval-mode copy of the model that never trains, its parameters in ``dtype`` (buffers keep
        theirs, as a model loaded in ``dtype`` has them): PA-GRPO's reference policy.

        The parameters are copied straight into ``dtype``, so a bfloat16 reference of a float32 policy
        never holds a second float32 model in memory (7B: 15 GiB instead of 31 GiB more per process).
        """
        params = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in self.model.parameters()}
        return copy.deepcopy(self.model, memo=params).eval()

    def fsdp_block_classes(self) -> set[type[nn.Module]]:
        """Module classes to shard one by one: decoder layers and vision blocks."""
        return block_classes(self.model)


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated block classes of ``model`` (decoder layers, vision blocks): FSDP's units."""
    names = ("DecoderLayer", "VisionBlock", "Block", "EncoderLayer")
    return {type(m) for m in model.modules() if type(m).__name__.endswith(names) and m is not model}


def _model_entries(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``model.*`` entries of a backbone state, prefix removed (the keys of ``backbone.model``)."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], path: str, ignore: set[str] = frozenset()) -> None:
    """``module.load_state_dict(state)`` after checking that every key and shape matches (keys in
    ``ignore`` were loaded otherwise)."""
    own = {k: v for k, v in module.state_dict().items() if k not in ignore}
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or resized:
        raise ValueError(
            f"weights_from: {path!r} does not match this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(resized)} of another shape (e.g. {resized[:3]}); "
            "was it trained with the same backbone config (size, LoRA)?"
        )
    module.load_state_dict(state, strict=not ignore)


def _load_quantized(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a QLoRA state (4-bit packed weights with their quantization state, float adapters and
    the layers left in full precision) into a module of the same layout.

    ``load_state_dict`` cannot restore bitsandbytes' packed weights: each 4-bit layer's weight is
    rebuilt from its packed data and quantization statistics (``Params4bit.from_prequantized``, as
    transformers does when it loads a quantized folder); every other entry loads as usual.
    """
    from bitsandbytes.nn import Linear4bit, Params4bit

    if any(type(m).__name__.startswith("Linear8bit") for m in module.modules()):
        raise ValueError(f"weights_from: {path!r}: adapters over an 8-bit base cannot be loaded into a later stage; "
                         "start from the full-precision checkpoint the 8-bit run began with")
    taken: set[str] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        key = f"{name}.weight"
        stats = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if key not in state or not stats:
            raise ValueError(f"weights_from: {path!r} has no 4-bit weight {key!r}: was it trained with the same "
                             "backbone config (size, quantization)?")
        layer.weight = Params4bit.from_prequantized(state[key], stats, requires_grad=False,
                                                    device=layer.weight.device, module=layer)
        taken |= {key, *(f"{key}.{k}" for k in stats)}
    _load_checked(module, {k: v for k, v in state.items() if k not in taken}, path, ignore=taken)


def requantize(model: nn.Module, quantization_config: Any, torch_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes quantizes while loading: round-trip ``model`` through a temporary folder
    (the tiny presets, and full-precision weights loaded before QLoRA)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return type(model).from_pretrained(tmp, quantization_config=quantization_config, dtype=torch_dtype)


def trim_completion(ids: list[int], eos_ids: list[int], pad_id: int) -> list[int]:
    """Cut generated ids after the first end token (kept); drop trailing padding."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids
