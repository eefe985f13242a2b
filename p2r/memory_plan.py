"""Per-GPU memory plan of a fit run, before launch: ``python -m p2r fit --config ... --print_memory``.

The plan reads the run's own config (model, backbone options, strategy, precision, devices,
nodes, PA-GRPO shape, frame budget) and prints, per GPU, the bytes of:

  weights, optimizer state, PA-GRPO reference   exact: parameter shapes of the real architecture
      on the meta device (hub ids from p2r/backbones/architectures/*.json, folders from their
      config.json, tiny presets from their config), sharded as the strategy shards them;
  gradients                                     exact, likewise (DDP adds its reduction buckets);
  gathered rollout weights                      exact for FSDP2 (every unit all-gathered in the
      compute dtype for the whole rollout, p2r.strategies.gathered); an estimate for FSDP1;
  autocast weight copies                        exact count, DDP/single device with *-mixed only:
      autocast caches a compute-dtype copy of every trainable Linear/Conv weight and bias for the
      whole step (embeddings and norms are not cast);
  rollout KV cache, activations, FSDP working set, optimizer temporaries   estimates: they depend
      on prompt and answer lengths; the assumptions are printed with the numbers. The compiled
      decode engine's static KV cache (each prompt once, rounded up to a multiple of 256 columns,
      plus max_completion_length columns per sequence) stays allocated between rollouts, so it is
      persistent; the eager engine's dynamic cache (prompt + completion per sequence) exists during
      the rollout only.

Phases do not overlap: the rollout (gathered weights, KV cache) ends before the training passes
(gradients, activations) begin, and both end before the optimizer step (its temporaries), so the
peak is the persistent bytes plus the largest phase. It fits when the peak plus a reserve for the
CUDA context, NCCL buffers and allocator slack stays within the device memory.

Rules (read from p2r's code; change them here when the code changes):
  - stored dtype: the Trainer's ``*-true`` precision casts the model; otherwise the backbone's
    ``dtype``. QLoRA: peft's ``prepare_model_for_kbit_training`` keeps every non-quantized
    parameter (vision tower, embeddings, lm_head, norms, biases, adapters) in float32; 4-bit
    weights take numel/2 bytes plus one uint8 absmax per 64 and one float32 per 256 blocks; their
    biases are cast to the compute dtype by bitsandbytes at the first forward (counted so).
  - compute dtype: FSDP2Strategy's ``param_dtype``; FSDPStrategy/DDP ``bf16-mixed`` -> bfloat16.
  - sharding: FSDP2 shards every parameter on dim 0 over all ranks (rank 0 holds the padded
    ceil share); FSDP1 FULL_SHARD shards each unit's flat parameter; SHARD_GRAD_OP shards
    gradients and optimizer state only; NO_SHARD / DDP shard nothing; HYBRID_SHARD within a node.
  - PA-GRPO's reference (beta > 0, no LoRA) is a copy of the policy in the dtype it computes in
    (FSDP2's ``param_dtype``, FSDP1's mixed-precision dtype, else the stored dtype): sharded with
    the policy under FSDP2 (``models_to_shard``), whole on every GPU otherwise (under
    FSDPStrategy it is not part of the wrapped module). LoRA/QLoRA: adapters off, no copy.
  - AdamW keeps two states per trainable parameter in that parameter's dtype.
  - log-probs of the PA-GRPO passes and SFT's loss run the LM head on LOGPROB_CHUNK_TOKENS
    positions at a time (p2r.algorithms.rollout.token_logprobs; SFT's ``loss_chunk_tokens`` default),
    so one chunk of (tokens x vocabulary) logits exists at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from p2r.algorithms.rollout import LOGPROB_CHUNK_TOKENS
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.backbones.decoding import CACHE_LENGTH_MULTIPLE

# Bytes left for the CUDA context, NCCL buffers and allocator fragmentation (an estimate).
RESERVE_BYTES = 3 * 2**30
# Text tokens of a prompt besides the vision tokens (chat wrapper, question, options, template).
PROMPT_TEXT_TOKENS = 256
# SFT target length assumed for activations: an observation + think + answer trace.
SFT_TARGET_TOKENS = 768
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Setup:
    """What the plan needs from a run's config (all read by :func:`setup_from_config`)."""

    job: str  # "sft" | "pagrpo"
    strategy: str  # "single" | "ddp" | "fsdp2" | "fsdp1"
    world: int  # ranks in total (devices x nodes)
    shard: int  # ranks a parameter is sharded over (1: not sharded)
    shard_weights: bool  # False for FSDP1 SHARD_GRAD_OP: only gradients and optimizer state sharded
    stored: str  # dtype of the stored (master) parameters
    compute: str  # dtype of matmuls and activations
    autocast: bool  # *-mixed precision under DDP / one device: autocast caches weight copies
    precision: str  # the Trainer's precision string, for the report
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()
    quantization: str | None = None
    quant_compute: str = "bfloat16"  # bitsandbytes compute dtype (the backbone's dtype); 4-bit layers' biases end in it
    freeze_vision: bool = False
    checkpointing: bool = False
    group_size: int = 8
    completion_tokens: int = 768
    beta: float = 0.04
    micro_batch_size: int = 8
    shared_prompt: bool = True
    rollout_engine: str = "compiled"  # "compiled": static KV cache kept between rollouts; "eager": dynamic
    prompts_per_rank: int = 1
    vision_tokens: int = 1024  # per prompt, upper bound from the frame budget
    text_tokens: int = PROMPT_TEXT_TOKENS
    per_node: int = 1  # ranks on one node (devices)
    weights_from_rank0: bool = True  # FSDP2Strategy: only rank 0 builds the weights in host memory


@dataclass
class Counts:
    """Exact per-GPU parameter bytes and element counts of one model under one setup."""

    total_params: int
    trainable_params: int
    weight_bytes: int  # stored, this rank's share
    trainable_bytes: int  # stored bytes of the trainable parameters, this rank's share
    full_compute_bytes: int  # every parameter once, whole, in the compute dtype (padded for FSDP2)
    autocast_bytes: int  # compute-dtype copies of trainable matmul weights
    root_compute_bytes: int  # parameters outside every block, in the compute dtype
    block_compute_bytes: int  # the largest block, in the compute dtype
    dims: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    """Rows of (name, bytes, kind) per section; kind is "exact" or "estimate"."""

    setup: Setup
    counts: Counts
    persistent: list[tuple[str, int, str]]
    phases: dict[str, list[tuple[str, int, str]]]
    notes: list[str]

    def phase_total(self, phase: str) -> int:
        return sum(b for _, b, _ in self.phases[phase])

    @property
    def persistent_total(self) -> int:
        return sum(b for _, b, _ in self.persistent)

    @property
    def peak(self) -> int:
        return self.persistent_total + max((self.phase_total(p) for p in self.phases), default=0)


# --- reading the config --------------------------------------------------------------------------
def _init_args(node: Any) -> dict[str, Any]:
    return dict(node.get("init_args") or {}) if isinstance(node, dict) else {}


def _count(value: Any, default: int = 1) -> int:
    """A Trainer ``devices``/``num_nodes`` value as a number ("auto" or -1: unknown -> default)."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return default


def setup_from_config(cfg: dict[str, Any], devices: int | None = None) -> Setup:
    """A :class:`Setup` from a LightningCLI fit config as a plain dict (``namespace.as_dict()``).

    ``devices`` overrides ``trainer.devices``; a value that is not a count ("auto") plans one GPU.
    """
    trainer, model = cfg.get("trainer") or {}, cfg.get("model") or {}
    margs = _init_args(model)
    bargs = _init_args(margs.get("backbone"))
    job = "pagrpo" if "pagrpo" in str(model.get("class_path", "")).lower() else "sft"
    world = (devices or _count(trainer.get("devices"))) * _count(trainer.get("num_nodes"))
    precision = str(trainer.get("precision") or "32-true")
    precision = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(precision, precision)
    backbone_dtype = bargs.get("dtype") or "float32"
    true_dtype = {"bf16-true": "bfloat16", "16-true": "float16"}.get(precision)
    mixed_dtype = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision)

    strategy_node = trainer.get("strategy") or "auto"
    sargs = _init_args(strategy_node)
    name = str(strategy_node.get("class_path") if isinstance(strategy_node, dict) else strategy_node).lower()
    stored = true_dtype or backbone_dtype
    compute, autocast, shard, shard_weights = true_dtype or mixed_dtype or stored, False, 1, True
    if "fsdp2" in name or "modelparallel" in name:
        kind = "fsdp2"
        compute = sargs.get("param_dtype", "bfloat16") or stored
        shard = world
    elif "fsdp" in name:
        kind = "fsdp1"
        mode = str(sargs.get("sharding_strategy") or "FULL_SHARD").upper()
        shard = {"NO_SHARD": 1, "HYBRID_SHARD": _count(trainer.get("devices"))}.get(mode, world)
        shard_weights = mode != "SHARD_GRAD_OP"
    else:
        kind = "ddp" if world > 1 else "single"
        autocast = mixed_dtype is not None
    # PA-GRPO's typed settings, with the module's defaults for what the config leaves out.
    rollout, loss = RolloutSettings(**(margs.get("rollout") or {})), LossSettings(**(margs.get("loss") or {}))
    lora = bargs.get("lora") or None
    quantization = bargs.get("quantization")
    if quantization:
        stored = "float32"  # prepare_model_for_kbit_training: every non-quantized parameter in float32
        compute = "float32"  # 4-bit layers cast back to their float32 input: hidden states stay float32
    frames = (cfg.get("data") or {}).get("train_frames") or {}
    merged = 28 * 28  # pixels per vision token: patch 14 x spatial merge 2 (Qwen-VL)
    vision_tokens = math.ceil(int(frames.get("max_frames", 16)) / 2) * (int(frames.get("max_pixels", 128 * merged)) // merged)
    return Setup(
        job=job, strategy=kind, world=world, shard=shard, shard_weights=shard_weights, stored=stored, compute=compute,
        autocast=autocast, precision=precision,
        lora_r=int(lora["r"]) if lora else 0, lora_targets=tuple(lora.get("target_modules") or ()) if lora else (),
        quantization=quantization, quant_compute=backbone_dtype, freeze_vision=bool(bargs.get("freeze_vision")),
        checkpointing=bool(bargs.get("gradient_checkpointing")),
        group_size=rollout.group_size, completion_tokens=rollout.max_completion_length,
        beta=loss.beta, micro_batch_size=int(margs.get("micro_batch_size", 8)),
        shared_prompt=bool(margs.get("shared_prompt", True)),
        rollout_engine=rollout.engine,
        prompts_per_rank=int((cfg.get("data") or {}).get("batch_size", 1)), vision_tokens=vision_tokens,
        per_node=_count(trainer.get("devices")) if devices is None else devices,
        weights_from_rank0=bool(sargs.get("weights_from_rank0", True)),
    )


def meta_model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """The configured backbone's model on the meta device: no weights, no download."""
    import importlib

    from p2r.backbones.architectures import backbone_meta_model

    node = _init_args(cfg.get("model")).get("backbone") or {}
    module, _, name = str(node.get("class_path", "")).rpartition(".")
    return backbone_meta_model(getattr(importlib.import_module(module), name), _init_args(node))


# --- counting ------------------------------------------------------------------------------------
def _rank_share(numel: int, dim0: int, shard: int) -> int:
    """Elements rank 0 holds when a tensor is split on dim 0 over ``shard`` ranks (FSDP2, padded)."""
    return numel if shard == 1 else math.ceil(dim0 / shard) * (numel // max(dim0, 1))


def _quantized_bytes(numel: int, out_features: int, kind: str) -> int:
    if kind == "8bit":
        return numel + 4 * out_features  # int8 weights + one float32 scale per row
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4  # nf4 + nested absmax + offset


def count(model: nn.Module, s: Setup) -> Counts:
    """Exact bytes of parameters for this rank, from the shapes of ``model`` (meta is fine)."""
    from p2r.backbones.architectures import model_dims, model_parts

    vision, lm_head, blocks = model_parts(model)
    vision_ids = {id(p) for p in vision.parameters()} if vision is not None else set()
    in_block = {id(p) for b in blocks for p in b.parameters()}
    st, cb = _BYTES[s.stored], _BYTES[s.compute]
    weight_shard = s.shard if s.shard_weights else 1
    if s.strategy == "fsdp1":  # one flat parameter per unit, padded to a multiple of the ranks
        def share(numel: int, dim0: int, n: int) -> int:
            return numel if n == 1 else math.ceil(numel / n)
    else:
        share = _rank_share

    total = trainable = weight_bytes = trainable_bytes = full_compute = autocast_bytes = root = 0
    quantized: dict[int, tuple[int, int]] = {}
    quant_bias: set[int] = set()  # bitsandbytes casts these to its compute dtype at the first forward
    if s.quantization:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and m is not lm_head and id(m.weight) not in vision_ids:
                quantized[id(m.weight)] = (m.weight.numel(), m.out_features)
                if m.bias is not None:
                    quant_bias.add(id(m.bias))
    matmul_weights = {id(t) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))
                      for t in (m.weight, m.bias) if t is not None}
    for p in {id(p): p for p in model.parameters()}.values():
        n, dim0 = p.numel(), (p.shape[0] if p.ndim else 1)
        total += n
        if id(p) in quantized:
            weight_bytes += _quantized_bytes(*quantized[id(p)], s.quantization)
        elif id(p) in quant_bias:
            weight_bytes += n * _BYTES[s.quant_compute]
        else:
            weight_bytes += share(n, dim0, weight_shard) * st
        full_compute += share(n, dim0, s.shard) * s.shard * cb if s.strategy == "fsdp2" else n * cb
        if id(p) not in in_block:
            root += n * cb
        trains = not s.lora_r and not (s.freeze_vision and id(p) in vision_ids)
        if trains:
            trainable += n
            trainable_bytes += share(n, dim0, s.shard) * st
            if s.autocast and id(p) in matmul_weights:
                autocast_bytes += n * cb
    if s.lora_r:  # adapters: A (r x in) and B (out x r) on each targeted language-model linear layer
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in s.lora_targets and id(m.weight) not in vision_ids:
                for rows, cols in ((s.lora_r, m.in_features), (m.out_features, s.lora_r)):
                    n = rows * cols
                    trainable += n
                    weight_bytes += share(n, rows, weight_shard) * st
                    trainable_bytes += share(n, rows, s.shard) * st
                    autocast_bytes += n * cb if s.autocast else 0
    dims = model_dims(model)
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0) * cb
    return Counts(total, trainable, weight_bytes, trainable_bytes, full_compute, autocast_bytes, root, block, dims)


# --- the plan ------------------------------------------------------------------------------------
def _layer_bytes_per_token(width: int, inner: int, b: int) -> int:
    """Activations one transformer block keeps per token for its backward (estimate): the block
    input, the q/k/v/attention/o_proj tensors (~6 x width in the compute dtype), the gated MLP's
    gate/up/activation/product (4 x inner) and float32 copies inside the two RMSNorms (8 x width)."""
    return b * (6 * width + 4 * inner) + 8 * width


def packed_attention_bytes(s: Setup, d: dict[str, int], rows: int, prompt: int, group: int, completion: int) -> int:
    """What the shared-prompt passes' attention (p2r.backbones.attention.packed_group_attention)
    adds to a micro-batch of ``rows`` packed rows (estimate): its masks, the prompt's W x W one
    only where several prompts share a forward (left padding), and per layer the completions'
    keys and values with their prompt's in front, (rows x G, kv_heads, W + T, head_dim), and their
    copy repeated to every query head (sdpa with a mask); kept for the backward by every layer,
    or with gradient checkpointing by the one being recomputed."""
    b, span = _BYTES[s.compute], prompt + completion
    masks = (rows * prompt * prompt if rows > 1 else 0) + (rows * group if rows > 1 else 1) * completion * span
    keys_values = rows * group * span * (d["kv_heads"] + d["heads"]) * d["head_dim"] * 2
    return b * (masks + keys_values * (1 if s.checkpointing else d["layers"]))


def activation_bytes(s: Setup, d: dict[str, int], rows: int, length: int, scored: int, patches: int, vision_trains: bool,
                     attention: int = 0) -> int:
    """Peak activations of one micro-batch's forward + backward (estimate).

    rows x length tokens through the language model, ``scored`` logit columns per row (float32
    log-softmax and its gradient next to the compute-dtype logits: 12 bytes per logit in bf16),
    ``patches`` vision patches per forward, plus ``attention`` bytes (:func:`packed_attention_bytes`).
    With gradient checkpointing each block keeps only its input and one block's activations exist
    at a time during the backward. Both jobs turn at most LOGPROB_CHUNK_TOKENS positions into
    logits at a time (SFT at its default ``loss_chunk_tokens``).
    """
    b = _BYTES[s.compute]
    tokens = rows * length
    per_layer = _layer_bytes_per_token(d["hidden"], d["intermediate"], b)
    if s.checkpointing:
        lm = tokens * (d["layers"] * d["hidden"] * b + per_layer)
    else:
        lm = tokens * d["layers"] * per_layer
    at_once = min(rows * scored, LOGPROB_CHUNK_TOKENS)
    logits = at_once * d["vocab"] * (2 * b + 8)
    vision = 0
    if vision_trains and d["vision_depth"]:
        per_block = _layer_bytes_per_token(d["vision_hidden"], d["vision_intermediate"], b)
        vision = patches * (d["vision_depth"] * d["vision_hidden"] * b + per_block if s.checkpointing else d["vision_depth"] * per_block)
    return lm + logits + vision + attention


def plan(setup: Setup, counts: Counts) -> Plan:
    """The per-GPU plan of ``setup`` for a model with ``counts``."""
    s, c, d = setup, counts, counts.dims
    cb = _BYTES[s.compute]
    prompt = s.vision_tokens + s.text_tokens
    patches = 4 * s.vision_tokens  # 2x2 patches merge into one vision token
    persistent = [("weights", c.weight_bytes, "exact"), ("optimizer state (AdamW, 2 per trainable)", 2 * c.trainable_bytes, "exact")]
    if s.job == "pagrpo":
        copy = s.beta > 0 and not s.lora_r
        # PAGRPOModule copies the policy into the dtype it computes in: FSDP2's param_dtype (sharded
        # like the policy), FSDP1's mixed-precision param_dtype (whole on every GPU), else the
        # parameters' own dtype (whole on every GPU).
        ref = (c.weight_bytes * _BYTES[s.compute] // _BYTES[s.stored] if s.strategy == "fsdp2"
               else c.total_params * _BYTES[s.compute if s.strategy == "fsdp1" else s.stored]) if copy else 0
        persistent.append(("PA-GRPO reference" + ("" if copy else " (none: LoRA adapters off or beta 0)"), ref, "exact"))
    if s.strategy == "ddp":  # allocated once by DDP's reducer, next to .grad (gradient_as_bucket_view off)
        persistent.append(("DDP gradient buckets", c.trainable_bytes, "exact"))
    training = [("gradients", c.trainable_bytes, "exact")]
    if s.autocast:
        training.append(("autocast weight copies", c.autocast_bytes, "exact"))
    if s.strategy in ("fsdp1", "fsdp2"):
        work = c.root_compute_bytes + 2 * c.block_compute_bytes + c.block_compute_bytes // cb * 4
        training.append(("FSDP gathered root + 2 blocks + 1 block of grads", work, "estimate"))
    vision_trains = not s.lora_r and not s.freeze_vision and not s.quantization
    notes = [f"prompt: <= {s.vision_tokens} vision tokens (data.train_frames) + ~{s.text_tokens} text tokens (estimate)"]
    if s.job == "pagrpo":
        g, t = s.group_size, s.completion_tokens
        if s.shared_prompt:
            rows, length, scored = max(1, s.micro_batch_size // g), prompt + g * t, g * t + 1
            notes.append(f"training passes: {rows} packed row(s) of {length} tokens (prompt + G x {t}), {scored} scored")
        else:
            rows, length, scored = s.micro_batch_size, prompt + t, t + 1
            notes.append(f"training passes: {rows} rows of {length} tokens (prompt + {t}) per micro-batch")
        prompts_in_pass = rows if s.shared_prompt else math.ceil(rows / g)
        attention = packed_attention_bytes(s, d, rows, prompt, g, t) if s.shared_prompt else 0
        training.append(("activations", activation_bytes(s, d, rows, length, scored, patches * prompts_in_pass, vision_trains,
                                                         attention), "estimate"))
        seqs = s.prompts_per_rank * g
        per_token = d["layers"] * 2 * d["kv_heads"] * d["head_dim"] * cb  # keys and values of every layer
        if s.rollout_engine == "compiled":  # preallocated, kept between rollouts: each prompt once, then G completions
            columns = -(-prompt // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
            kept = (s.prompts_per_rank * columns + seqs * t) * per_token
            persistent.append(("rollout KV cache (compiled engine: static, kept)", kept, "estimate"))
            rollout = [("prefill KV cache (copied into the static one)", s.prompts_per_rank * prompt * per_token, "estimate")]
        else:
            columns = prompt + t
            rollout = [("rollout KV cache (eager engine)", seqs * columns * per_token, "estimate")]
        if s.strategy == "fsdp2":
            rollout.insert(0, ("gathered rollout weights (all units, compute dtype)", c.full_compute_bytes, "exact"))
        elif s.strategy == "fsdp1":
            rollout.insert(0, ("gathered rollout weights (root + 2 units at a time)", c.root_compute_bytes + 2 * c.block_compute_bytes, "estimate"))
        if s.autocast:
            rollout.append(("autocast weight copies", c.autocast_bytes, "exact"))
        prefill = s.prompts_per_rank * prompt * (2 * d["intermediate"] + 4 * d["hidden"]) * cb + patches * 4 * d["vision_hidden"] * cb
        rollout.append(("prefill activations (no grad)", prefill, "estimate"))
        if s.rollout_engine == "compiled":
            notes.append(f"rollout (compiled engine): KV cache of {s.prompts_per_rank} prompt(s) x {columns} columns (prompt "
                         f"{prompt}, shared by its G sequences) + {seqs} sequences x {t} completion columns")
        else:
            notes.append(f"rollout (eager engine): {seqs} sequences x {columns} columns of KV cache (prompt {prompt} + {t})")
    else:
        length = prompt + SFT_TARGET_TOKENS
        rows = s.prompts_per_rank
        training.append(("activations", activation_bytes(s, d, rows, length, length, patches * rows, vision_trains), "estimate"))
        notes.append(f"training: {rows} row(s) of {length} tokens (prompt + ~{SFT_TARGET_TOKENS} target tokens, estimate)")
        rollout = []
    optimizer = [("gradients", c.trainable_bytes, "exact"), ("optimizer temporaries (foreach AdamW)", c.trainable_bytes, "estimate")]
    phases = {"training passes": training, "optimizer step": optimizer}
    if rollout:
        phases = {"rollout": rollout, **phases}
    return Plan(s, c, persistent, phases, notes)


def _size(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.2f} MiB"


def format_plan(p: Plan, device_gib: float) -> str:
    """The plan as a table, ending with whether it fits in ``device_gib`` per GPU."""
    s, c = p.setup, p.counts
    mode = f"LoRA r={s.lora_r}" if s.lora_r else "full fine-tuning"
    if s.quantization:
        mode = f"Q{mode} ({s.quantization})"
    lines = [
        f"memory plan per GPU: {s.job}, {s.strategy} over {s.world} GPU(s) (parameters sharded over {s.shard}), "
        f"precision {s.precision}: stored {s.stored}, compute {s.compute}; {mode}; gradient checkpointing {'on' if s.checkpointing else 'off'}",
        f"parameters: {c.total_params:,} (exact, meta device); trainable {c.trainable_params:,}",
        f"{'':<58}{'per GPU':>12}",
        "persistent",
    ]
    lines += [f"  {name:<56}{_size(b):>12}  {kind}" for name, b, kind in p.persistent]
    for phase, rows in p.phases.items():
        lines.append(f"{phase} (+ persistent {_size(p.persistent_total).strip()})")
        lines += [f"  {name:<56}{_size(b):>12}  {kind}" for name, b, kind in rows]
        lines.append(f"  {'= phase total with persistent':<56}{_size(p.persistent_total + p.phase_total(phase)):>12}")
    lines += [f"note: {n}" for n in p.notes]
    lines.append(host_memory_line(p))
    need = p.peak + RESERVE_BYTES
    verdict = "fits" if need <= device_gib * 2**30 else "does NOT fit"
    lines.append(f"peak {_size(p.peak).strip()} + reserve {RESERVE_BYTES / 2**30:.0f} GiB (CUDA context, NCCL, fragmentation; estimate) "
                 f"= {need / 2**30:.2f} GiB: {verdict} in {device_gib:g} GiB per GPU")
    return "\n".join(lines)


def builds_on_rank0(s: Setup) -> bool:
    """Whether only rank 0 builds the weights in host memory (FSDP2Strategy.builds_on_rank0)."""
    return s.strategy == "fsdp2" and s.world > 1 and s.weights_from_rank0 and not s.quantization


def host_weight_bytes(s: Setup, c: Counts) -> tuple[int, int]:
    """Bytes of weights in host memory at start-up (rank 0's node, any other node), before they reach
    the GPUs: p2r.algorithms.base.VideoLVLMModule.configure_model's rules.

    FSDP2 on several ranks with ``weights_from_rank0``: only rank 0 builds the model (stored dtype);
    the reference copy is filled from the same source block by block, so it adds nothing. Otherwise
    every rank of a node builds the whole model and, for PA-GRPO, its reference (compute dtype).
    """
    whole = c.total_params * _BYTES[s.stored]
    if builds_on_rank0(s):
        return whole, 0
    reference = c.total_params * _BYTES[s.compute] if s.job == "pagrpo" and s.beta > 0 and not s.lora_r else 0
    per_node = min(s.per_node, s.world) * (whole + reference)
    return per_node, per_node if s.world > s.per_node else 0


def host_memory_line(p: Plan) -> str:
    node0, other = host_weight_bytes(p.setup, p.counts)
    text = f"host memory at start-up: weights {node0 / 2**30:.1f} GiB on rank 0's node"
    if p.setup.world > p.setup.per_node:
        text += f", {other / 2**30:.1f} GiB on each other node"
    how = ("rank 0 builds them and sends each rank its shard (FSDP2Strategy.weights_from_rank0)" if builds_on_rank0(p.setup)
           else "every rank builds the whole model")
    return (f"{text} ({how}; measured by tools/bench_host_memory.py), plus about 1 GiB per process for Python, torch "
            "and the data workers; hub files and single-file weights_from checkpoints are memory-mapped (reclaimable page "
            "cache), a weights_from FSDP2 folder is read straight into the model")


def plan_from_config(cfg: dict[str, Any], devices: int | None = None) -> Plan:
    """Read ``cfg`` (a fit config as a dict), count the model on the meta device, plan."""
    setup = setup_from_config(cfg, devices)
    return plan(setup, count(meta_model_from_config(cfg), setup))
