"""Sharded training strategies, chosen by config (``configs/strategy/*.yaml``).

``FSDP2Strategy`` is Lightning's ModelParallelStrategy used for pure FSDP2: one data-parallel
mesh over every rank (nodes x devices), ``fully_shard`` on each decoder layer and vision block
and then on the whole model, mixed precision by an FSDP2 ``MixedPrecisionPolicy`` (parameters
and optimizer state stay float32 and sharded; layers compute in ``param_dtype``; gradients are
reduced in ``reduce_dtype``). It runs on GPUs (NCCL) and on CPUs (gloo), so the tests run it
with two CPU processes. p2r's modules call :meth:`FSDP2Strategy.parallelize` from
``configure_model`` (Lightning's convention for this strategy) for the policy and, in PA-GRPO,
the frozen reference copy. Checkpoints are distributed (a folder, one shard file per rank);
``tools/export_hf.py`` turns one into a Hugging Face folder.

``FSDPStrategy`` is Lightning's FSDP (version 1) with the auto-wrap policy taken from the
backbone's block classes when none is given. Torch's FSDP1 needs CUDA: on any other accelerator
it stops at once with a message that points at FSDP2.

Rollouts under FSDP2 run inside :func:`gathered`: every layer is all-gathered once at the
prefill and stays whole until the rollout ends, so the token-by-token decode does no collective
and ranks may stop after different numbers of tokens.

Evaluation under FSDP2 (``validate``, ``test``, ``predict``, fit's validation loop and the
periodic evaluation) runs inside :func:`held_whole`: every unit is all-gathered once, in the same
order on every rank, before the first batch, and stays whole until the pass ends. The forwards in
between do no collective, so ranks may run different numbers of batches (evaluation streams give
each sample to exactly one rank) and each sample is still generated and scored exactly once, with
no padding work. The cost is the whole model's parameters in ``param_dtype`` on every rank for the
pass, the same memory a rollout already takes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from p2r.checkpoints import PARTIAL_SUFFIX, fsync_folder
from p2r.compat import set_data_parallel_size

DType = Literal["bfloat16", "float16", "float32"]
# Attribute of a sharded model: its units' reshard_after_forward setting outside gathered().
RESHARD_SETTING = "_p2r_reshard_after_forward"
# Attribute of a sharded model set while held_whole() keeps it gathered (gathered() is then a no-op).
HELD = "_p2r_held_whole"


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) that ``fully_shard`` turned into FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module | None) -> bool:
    """True when ``model`` is (or contains) an FSDP2 unit."""
    return model is not None and bool(fsdp2_modules(model))


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model's parameters whole between forwards (for generation); no-op otherwise.

    The first forward all-gathers each unit and nothing is resharded until the context exits, so
    the decode steps run without collectives. Costs the full parameters' memory meanwhile.
    """
    if getattr(model, HELD, False):  # an evaluation pass holds it whole already
        yield
        return
    units = fsdp2_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        _reshard(model, units)


@contextlib.contextmanager
def held_whole(model: nn.Module | None) -> Iterator[None]:
    """Keep an FSDP2 model whole for a whole evaluation pass; no-op for a model that is not sharded.

    Each unit is all-gathered here, explicitly and in module order (a collective every rank makes
    at the same point); the forwards inside then find their parameters gathered and make none, so
    ranks may run different numbers of forwards. Calls to :func:`gathered` inside are no-ops.
    """
    if not is_sharded(model) or getattr(model, HELD, False):
        yield
        return
    units = fsdp2_modules(model)
    _lazy_init_root(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    setattr(model, HELD, True)
    try:
        yield
    finally:
        setattr(model, HELD, False)
        _reshard(model, units)


def _lazy_init_root(model: nn.Module) -> None:
    """Make ``model`` the FSDP2 root before any unit is gathered by hand: FSDP2 picks its root as the
    first unit whose forward runs, and a unit gathered before the root's first forward (a test run
    that has trained nothing) would otherwise be refused as "already lazily initialized"."""
    from torch.distributed.fsdp import fully_shard

    fully_shard.state(model)._lazy_init()  # no-op once the root has run a forward


def _reshard(model: nn.Module, units: list[nn.Module]) -> None:
    """Free the gathered parameters of ``units`` and restore their configured resharding."""
    for unit in units:
        unit.reshard()
        unit.set_reshard_after_forward(getattr(model, RESHARD_SETTING, True), recurse=False)


def shard(strategy: Any, model: nn.Module, block_classes: set[type[nn.Module]]) -> None:
    """Shard ``model`` as ``strategy`` does (:meth:`FSDP2Strategy.parallelize`); nothing for strategies
    that do not shard a module themselves. Lightning's own ModelParallelStrategy is refused: it leaves
    sharding to the module."""
    if isinstance(strategy, ModelParallelStrategy) and not hasattr(strategy, "parallelize"):
        raise ValueError(
            "trainer.strategy: Lightning's ModelParallelStrategy leaves sharding to the module; p2r shards "
            "with p2r.strategies.FSDP2Strategy (configs/strategy/fsdp2.yaml). Use that instead."
        )
    if strategy is not None and hasattr(strategy, "parallelize"):
        strategy.parallelize(model, block_classes)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) data parallelism over all ranks, bf16 compute with float32 master weights."""

    def __init__(
        self,
        param_dtype: DType | None = "bfloat16",
        reduce_dtype: DType | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        weights_from_rank0: bool = True,
    ) -> None:
        """
        Args:
            param_dtype: Dtype the layers compute in (None: the parameters' own dtype). Keep the
                backbone's ``dtype`` float32 and the Trainer's ``precision: 32-true``: this policy
                is the mixed precision.
            reduce_dtype: Dtype of the gradient reduce-scatter (None: param_dtype).
            reshard_after_forward: Free each unit's gathered parameters after its forward (ZeRO-3;
                False keeps them until the backward: faster, more memory).
            save_distributed_checkpoint: Each rank writes its own shard (a checkpoint folder);
                False gathers a single file on rank 0 (needs the whole model in its CPU memory).
            process_group_backend: "nccl" on GPUs, "gloo" on CPUs (default: chosen from the device).
            weights_from_rank0: On several ranks, every rank builds the model on the meta device and
                shards it; only rank 0 makes or loads the weights in host memory and sends each rank
                its shard (one copy of the weights per job, not one per rank). False: every rank
                builds the whole model in host memory, then keeps its shard.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed = save_distributed_checkpoint
        self.weights_from_rank0 = weights_from_rank0

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the sharded layers compute in (``param_dtype``), or None for the parameters' own."""
        return getattr(torch, self.param_dtype) if self.param_dtype else None

    @property
    def builds_on_rank0(self) -> bool:
        """Whether modules build empty (meta) models and take their weights from rank 0
        (:func:`load_from_rank0`): ``weights_from_rank0`` on more than one rank."""
        return self.weights_from_rank0 and self.world_size > 1

    def setup_environment(self) -> None:
        # One data-parallel dimension over every rank; Lightning's "auto" would make the devices
        # of a node a tensor-parallel group, which p2r's models do not implement.
        set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write a distributed checkpoint folder so that a crash never leaves a half-written one.

        The ranks write ``<name>.partial`` (which ``--ckpt_path last`` ignores; DCP fsyncs each
        shard file); rank 0 fsyncs Lightning's ``meta.pt`` and the folder, moves the old folder
        aside to ``<stem>-previous.ckpt``, renames the new one into place, fsyncs the parent and
        deletes the old one. A crash between the two renames leaves ``last-previous.ckpt``,
        complete, which ``--ckpt_path last`` finds (Lightning takes the newest ``last*.ckpt``);
        the next save puts it back in place before writing, so it is never deleted while it is
        the only complete checkpoint. A failed write (a full disk) leaves the old folder as it was.
        """
        if not self.save_distributed:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        previous = path.with_name(f"{path.stem}-previous{path.suffix}")
        if self.global_rank == 0:
            if previous.exists() and not path.exists():  # a crash between the renames of the last save
                previous.rename(path)
            for stale in (partial, previous):
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier("p2r-checkpoint-start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("p2r-checkpoint-written")
        if self.global_rank == 0:
            _fsync_files(partial)
            if path.exists():
                path.rename(previous)
            partial.rename(path)
            fsync_folder(path.parent)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("p2r-checkpoint-done")

    def parallelize(self, model: nn.Module, block_classes: set[type[nn.Module]]) -> None:
        """``fully_shard`` every block of ``model`` (decoder layers, vision blocks), then the rest.

        Called by the LightningModule in ``configure_model``; a model already sharded is left alone.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if is_sharded(model):
            return
        _refuse_quantized(model)
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, self.param_dtype) if self.param_dtype else None,
            reduce_dtype=getattr(torch, self.reduce_dtype) if self.reduce_dtype else None,
        )
        options = dict(mesh=self.device_mesh["data_parallel"], mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        blocks = tuple(block_classes)
        for module in list(model.modules()):
            if module is not model and blocks and isinstance(module, blocks):
                fully_shard(module, **options)
        fully_shard(model, **options)
        setattr(model, RESHARD_SETTING, self.reshard_after_forward)  # what gathered() restores


# Bytes rank 0 sends per broadcast while loading: the only transient memory on the other ranks.
LOAD_BLOCK_BYTES = 64 * 2**20


@torch.no_grad()
def load_from_rank0(model: nn.Module, source: nn.Module | None, device: torch.device,
                    block_bytes: int = LOAD_BLOCK_BYTES) -> None:
    """Give a sharded model built on the meta device its weights from rank 0's ``source`` (the same
    model, whole, in host memory; None on the other ranks). Every rank calls this (collectives).

    Each parameter and buffer is broadcast in blocks of rows (at most ``block_bytes``, cast to the
    sharded model's dtype block by block: a bfloat16 reference copy of a float32 source never
    exists whole) and each rank copies the rows of its own shard. So no rank but 0 ever holds more
    than its shards plus one block, and rank 0 holds the source plus its shards plus one block.
    Buffers that no state dict holds (rotary frequencies) come along, as every parameter does.
    """
    from torch.distributed.tensor import DTensor, Shard

    model.to_empty(device=device)
    sources = {**dict(source.named_parameters()), **dict(source.named_buffers())} if source is not None else {}
    targets = [*model.named_parameters(), *model.named_buffers()]
    if source is not None and (missing := [name for name, _ in targets if name not in sources]):
        raise RuntimeError(f"rank 0's model lacks {len(missing)} tensors of the sharded one (e.g. {missing[:3]})")
    for name, target in targets:
        full_shape = tuple(target.shape) or (1,)
        if isinstance(target, DTensor):
            if tuple(target.placements) != (Shard(0),):
                raise NotImplementedError(f"{name}: only row-sharded (Shard(0)) parameters load from rank 0, not {target.placements}")
            local = target.to_local()
            chunk = -(-full_shape[0] // target.device_mesh.size())  # torch.chunk's rows per rank
            first = min(target.device_mesh.get_local_rank() * chunk, full_shape[0])
            if local.shape[0] != min(chunk, full_shape[0] - first):
                raise RuntimeError(f"{name}: unexpected shard of {tuple(local.shape)} rows at {first} of {full_shape}")
        else:
            local, first = target.view(full_shape), 0
        whole = sources[name].detach().reshape(full_shape) if source is not None else None
        # The same blocks on every rank (each broadcast is matched by shape): sized from the full shape.
        rows = max(1, block_bytes // (math.prod(full_shape[1:]) * target.element_size()))
        for start in range(0, full_shape[0], rows):
            stop = min(start + rows, full_shape[0])
            if whole is not None:
                block = whole[start:stop].to(device=device, dtype=target.dtype).contiguous()
            else:
                block = torch.empty((stop - start, *full_shape[1:]), dtype=target.dtype, device=device)
            torch.distributed.broadcast(block, src=0)
            lo, hi = max(start, first), min(stop, first + local.shape[0])
            if lo < hi:
                local[lo - first : hi - first].copy_(block[lo - start : hi - start])


def _fsync_files(folder: Path) -> None:
    """fsync what rank 0 wrote into a checkpoint folder (Lightning's ``meta.pt``, DCP's metadata) and the folder."""
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    fsync_folder(folder)


def _refuse_quantized(model: nn.Module) -> None:
    from p2r.backbones.building import is_quantized  # here: p2r.backbones imports this module

    if is_quantized(model):
        raise ValueError(
            "FSDP2Strategy cannot shard a 4/8-bit quantized backbone (bitsandbytes weights are not "
            "DTensor-shardable): run QLoRA with strategy: auto or ddp on one GPU per process, or drop "
            "backbone quantization to shard a bf16 model with LoRA."
        )


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDP (torch FSDP1), CUDA only; without ``auto_wrap_policy`` each decoder layer
    and vision block of the backbone is one FSDP unit. Takes Lightning FSDPStrategy's arguments."""

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise ValueError(
                f"trainer.strategy: FSDPStrategy (configs/strategy/fsdp.yaml) needs CUDA GPUs; this run is on "
                f"{self.root_device.type!r}. torch's FSDP1 has no CPU support: use configs/strategy/fsdp2.yaml "
                "(FSDP2, runs on CPUs with gloo) or strategy: ddp."
            )
        super().setup_environment()

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype FSDP's mixed precision computes in (``bf16-mixed``: bfloat16), or None without it.

        PA-GRPO copies its reference into this dtype: the copy is not part of the wrapped module,
        so it stays whole on every GPU, and in float32 it would take twice the memory for the same
        numbers (the training step runs under bf16 autocast).
        """
        config = self.mixed_precision_config
        return getattr(config, "param_dtype", None) if config is not None else None

    def setup(self, trainer: Any) -> None:
        # The module's configure_model has built the backbone by now; Lightning wraps the model in
        # super().setup, reading the policy from self.kwargs.
        if "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            backbone = getattr(self.lightning_module, "backbone", None)
            if backbone is not None and backbone.is_built:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(backbone.fsdp_block_classes())
        super().setup(trainer)
