"""The KL's reference is the SFT model, whatever the chain of full, LoRA and QLoRA stages.

An SFT "run" here is a tiny backbone whose weights were moved away from its initialisation (full
SFT: noise on every weight; LoRA SFT: non-zero adapters), saved as a p2r checkpoint with the
options p2r stores beside the weights. The PA-GRPO module built with ``weights_from`` that
checkpoint must give, as its reference, the SFT model's log-probs on the same completions: within
1e-5 in float32 (merging W + s B A and applying B A on the fly differ only by rounding), or within
the quantization error for QLoRA (the measured figure is printed and bounded). The adapters-
disabled model before this fix was the pre-SFT base, 0.1 to 1 away in log-prob on these models:
each test also checks that the SFT model differs from the pre-SFT model by far more than the
tolerance, so a reference that forgot the SFT stage fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.rollout import GroupRollout, build_train_batch, completion_logprobs
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.backbones import LoraOptions, TinyQwen25VL
from p2r.backbones.building import quantization_config, requantize
from p2r.checkpoints import BACKBONE_OPTIONS
from test_shared_prompt import _rollout  # tests/algorithms is on sys.path (pytest rootdir import)

# bitsandbytes' CPU 4-bit kernels need layers with at least 64 inputs.
SIZES = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=64, vision_depth=1,
             vocab_size=512, seed=3)
SFT_LORA = LoraOptions(r=4, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
RL_LORA = LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "k_proj", "o_proj"])
FLOAT_TOL = 1e-5


def sft_checkpoint(tmp: Path, kind: str) -> tuple[Path, TinyQwen25VL]:
    """A p2r checkpoint of an SFT run of ``kind`` (full | lora | qlora) and that run's backbone (eval mode)."""
    lora = None if kind == "full" else SFT_LORA
    backbone = TinyQwen25VL(**SIZES, lora=lora, quantization="4bit" if kind == "qlora" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone.build()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if kind == "full" and p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    path = tmp / f"sft-{kind}.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                BACKBONE_OPTIONS: backbone.stored_options()}, path)
    return path, backbone.eval()


def logprobs(backbone, rollout: GroupRollout, model=None) -> torch.Tensor:
    rows = list(range(len(rollout.completion_ids)))
    batch = build_train_batch(backbone, rollout, rows)
    with torch.no_grad():
        return completion_logprobs(backbone, batch, model=model)[batch.completion_mask]  # (tokens,)


def rl_module(ckpt: Path, kind: str, shared_prompt: bool = True) -> PAGRPOModule:
    lora = None if kind == "full" else RL_LORA
    backbone = TinyQwen25VL(**SIZES, lora=lora, quantization="4bit" if kind == "qlora" else None, weights_from=str(ckpt))
    module = PAGRPOModule(backbone, rollout=RolloutSettings(group_size=2), loss=LossSettings(beta=0.04),
                          shared_prompt=shared_prompt)
    module.configure_model()
    return module.eval()


def reference_logprobs(module: PAGRPOModule, rollout: GroupRollout) -> torch.Tensor:
    rows = list(range(len(rollout.completion_ids)))
    with torch.no_grad():
        logp = module._reference_logprobs(rollout, rows)
    mask = build_train_batch(module.backbone, rollout, rows).completion_mask
    return logp[mask]


@pytest.mark.parametrize(("sft", "rl"), [("full", "full"), ("full", "lora"), ("lora", "lora"), ("lora", "full")])
def test_reference_is_the_sft_model(tmp_path, sft, rl):
    ckpt, sft_backbone = sft_checkpoint(tmp_path, sft)
    rollout = _rollout(sft_backbone, 2)
    expected = logprobs(sft_backbone, rollout)
    module = rl_module(ckpt, rl)
    got = reference_logprobs(module, rollout)
    assert (got - expected).abs().max() < FLOAT_TOL
    # The policy starts as the SFT model too (RL adapters start at B = 0).
    assert (logprobs(module.backbone, rollout) - expected).abs().max() < FLOAT_TOL
    # The SFT stage changed the model far beyond the tolerance: a pre-SFT reference would fail.
    assert (pre_sft_logprobs(rollout) - expected).abs().max() > 100 * FLOAT_TOL
    if rl == "full":
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.reference.model.parameters())
    else:
        assert module.reference.model is None  # adapters off


def pre_sft_logprobs(rollout: GroupRollout) -> torch.Tensor:
    """The model before SFT (same seed and initialisation as every SFT run here)."""
    fresh = TinyQwen25VL(**SIZES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh.build()
    return logprobs(fresh.eval(), rollout)


@pytest.mark.parametrize("sft", ["full", "lora"])
def test_qlora_reference_is_the_quantized_sft_model(tmp_path, sft, capsys):
    """From a float SFT model, QLoRA's reference is exactly that model quantized to 4 bits; its
    distance to the float SFT model is the quantization error (measured and printed)."""
    ckpt, sft_backbone = sft_checkpoint(tmp_path, sft)
    rollout = _rollout(sft_backbone, 2)
    expected = logprobs(sft_backbone, rollout)
    got = reference_logprobs(rl_module(ckpt, "qlora"), rollout)
    float_sft = sft_backbone.model.merge_and_unload() if sft == "lora" else sft_backbone.model
    nf4 = quantization_config("4bit", torch.float32)  # QLoRA's config for this (float32) backbone
    quantized = requantize(float_sft, nf4, torch.float32).eval()
    for layer in quantized.modules():  # as the backbone builds it: no bf16 repacking of 4-bit weights on CPU
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    assert (got - logprobs(sft_backbone, rollout, model=quantized)).abs().max() < FLOAT_TOL
    error, pre = float((got - expected).abs().max()), float((pre_sft_logprobs(rollout) - expected).abs().max())
    with capsys.disabled():
        print(f"\n{sft} SFT -> QLoRA RL: quantization error max |reference - SFT| = {error:.3f} log-prob "
              f"(the pre-SFT model: {pre:.3f})")
    assert error < pre / 3


def test_qlora_after_qlora_merges_the_sft_adapters(tmp_path, capsys):
    """A QLoRA SFT model is its 4-bit base plus adapters; merging them re-quantizes the merged
    layers, so the reference equals it within that rounding (measured and printed)."""
    ckpt, sft_backbone = sft_checkpoint(tmp_path, "qlora")
    rollout = _rollout(sft_backbone, 2)
    expected = logprobs(sft_backbone, rollout)
    module = rl_module(ckpt, "qlora")
    error, pre = float((reference_logprobs(module, rollout) - expected).abs().max()), float((pre_sft_logprobs(rollout) - expected).abs().max())
    with capsys.disabled():
        print(f"\nQLoRA SFT -> QLoRA RL: max |reference - SFT| = {error:.3f} log-prob (the pre-SFT model: {pre:.3f})")
    assert error < pre / 5
    assert module.backbone.lora == RL_LORA


def test_a_qlora_checkpoint_cannot_start_a_full_precision_run(tmp_path):
    ckpt, _ = sft_checkpoint(tmp_path, "qlora")
    with pytest.raises(ValueError, match=r"4bit \(QLoRA\) checkpoint; it can only start a run with quantization: 4bit"):
        rl_module(ckpt, "lora")


def test_adapter_options_come_from_the_checkpoint(tmp_path):
    """The SFT adapters are merged with the alpha and targets their run used, not this run's."""
    ckpt, sft_backbone = sft_checkpoint(tmp_path, "lora")
    rollout = _rollout(sft_backbone, 2)
    module = rl_module(ckpt, "lora")
    assert module.backbone.lora == RL_LORA != SFT_LORA
    assert (reference_logprobs(module, rollout) - logprobs(sft_backbone, rollout)).abs().max() < FLOAT_TOL
