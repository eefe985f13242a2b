"""Memory plan: exact rows equal measured bytes on the tiny model; the 7B plan equals hand-worked bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2r.backbones import LoraOptions, TinyQwen25VL
from p2r.cli import main
from p2r.data.video import Clip
from p2r.memory_plan import (format_plan, host_memory_line, host_weight_bytes, meta_model_from_config, plan_from_config,
                             setup_from_config)

N_7B = 8_292_166_656
SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=2, vocab_size=512)


def config(job="sft", strategy="auto", precision="32-true", devices=1, backbone=None, **model_args):
    backbone = backbone or {"class_path": "p2r.backbones.TinyQwen25VL", "init_args": dict(SIZES)}
    cls = "p2r.algorithms.pagrpo.PAGRPOModule" if job == "pagrpo" else "p2r.algorithms.sft.SFTModule"
    return {
        "trainer": {"strategy": strategy, "precision": precision, "devices": devices, "num_nodes": 1},
        "model": {"class_path": cls, "init_args": {"backbone": backbone, **model_args}},
        "data": {"batch_size": 1, "train_frames": {"max_frames": 16, "max_pixels": 100352}},
    }


def rows(p) -> dict[str, int]:
    out = {name: b for name, b, _ in p.persistent}
    for phase in p.phases.values():
        out.update({name: b for name, b, _ in phase})
    return out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def measured(backbone) -> dict[str, int]:
    """Bytes of the built model's parameters, and of gradients and AdamW state after one step."""
    model = backbone.model
    frames = np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    batch = backbone.encode([backbone.render_prompt("Which way?", "video")], [Clip(frames, 2.0, [0, 1, 2, 3], 4)], ["<answer>A</answer>"])
    batch = {k: (v.to(backbone.torch_dtype) if k.startswith("pixel") else v) for k, v in batch.items()}
    backbone(**batch).float().sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    states = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    quant = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # 4-bit: absmax (uint8) + nested float32 absmax + offset; code tables left out
            quant += [qs.absmax, qs.state2.absmax, qs.offset]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "weights": nbytes(list(model.parameters()) + quant),
        "gradients": nbytes(p.grad for p in trainable),
        "optimizer": nbytes(states),
    }


@pytest.mark.parametrize(
    ("backbone_args", "precision"),
    [
        ({}, "32-true"),  # full fine-tuning in float32
        ({"freeze_vision": True}, "32-true"),
        ({"dtype": "bfloat16"}, "bf16-true"),  # pure bf16: weights, gradients and Adam states in bf16
        ({"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}}, "32-true"),
        ({"quantization": "4bit", "dtype": "bfloat16", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "gate_proj"]}}, "32-true"),
    ],
    ids=["full", "frozen-vision", "bf16-true", "lora", "qlora"],
)
def test_exact_rows_equal_the_measured_bytes_of_the_tiny_model(backbone_args, precision):
    args = {**SIZES, **backbone_args}
    cfg = config(precision=precision, backbone={"class_path": "p2r.backbones.TinyQwen25VL", "init_args": args})
    p = plan_from_config(cfg)
    lora = args.pop("lora", None)
    backbone = TinyQwen25VL(**args, lora=LoraOptions(**lora) if lora else None)
    if precision == "bf16-true":
        args["dtype"] = "bfloat16"
    backbone.build()
    got = measured(backbone)
    r = rows(p)
    assert p.counts.total_params == sum(p_.numel() for p_ in meta_model_from_config(cfg).parameters())
    assert p.counts.trainable_params == got["trainable"]
    assert r["weights"] == got["weights"]
    assert r["gradients"] == got["gradients"]
    assert r["optimizer state (AdamW, 2 per trainable)"] == got["optimizer"]


def test_7b_pagrpo_under_fsdp2_on_7_gpus_equals_hand_worked_bytes():
    cfg = config("pagrpo", strategy={"class_path": "p2r.strategies.FSDP2Strategy", "init_args": {"param_dtype": "bfloat16"}},
                 devices=7, backbone={"class_path": "p2r.backbones.HFBackbone",
                                      "init_args": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "dtype": "float32",
                                                    "gradient_checkpointing": True}},
                 rollout={"group_size": 8, "max_completion_length": 768}, loss={"beta": 0.04}, micro_batch_size=2)
    p = plan_from_config(cfg)
    r = rows(p)
    assert p.counts.total_params == N_7B
    # Each parameter is split on dim 0 over 7 ranks; rank 0 holds ceil(rows / 7) rows: at most one
    # row more than an even split per tensor (the widest row is a 18944-wide down_proj row).
    even = N_7B * 4 / 7
    tensors = sum(1 for _ in meta_model_from_config(cfg).parameters())
    assert even <= r["weights"] <= even + tensors * 18944 * 4
    assert r["PA-GRPO reference"] == r["weights"] // 2  # a bfloat16 copy (the compute dtype), sharded like the policy
    assert r["optimizer state (AdamW, 2 per trainable)"] == 2 * r["weights"] == 2 * r["gradients"]
    # Every unit gathered in bf16 for the rollout: the whole model, padded to a multiple of 7 rows.
    assert 2 * N_7B <= r["gathered rollout weights (all units, compute dtype)"] <= 2 * N_7B + tensors * 7 * 18944 * 2
    # The compiled engine's static cache, kept between rollouts: the prompt once (8 x 128 vision + 256
    # text = 1280 columns, already a multiple of 256) and 8 sequences x 768 completion columns, each
    # column 28 layers x (k, v) x 4 heads x 128 x 2 bytes.
    assert r["rollout KV cache (compiled engine: static, kept)"] == (1280 + 8 * 768) * 28 * 2 * 4 * 128 * 2 == 425_721_856
    assert "fits in 80 GiB" in format_plan(p, 80)


def test_kv_cache_follows_the_rollout_engine():
    backbone = {"class_path": "p2r.backbones.HFBackbone", "init_args": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}}
    per_token = 28 * 2 * 4 * 128 * 2  # bf16 keys and values of every layer
    eager = plan_from_config(config("pagrpo", precision="bf16-true", backbone=backbone, rollout={"engine": "eager", "max_completion_length": 700}))
    assert rows(eager)["rollout KV cache (eager engine)"] == 8 * (1280 + 700) * per_token
    two_prompts = config("pagrpo", precision="bf16-true", backbone=backbone, rollout={"engine": "compiled", "max_completion_length": 700})
    two_prompts["data"]["batch_size"] = 2
    compiled = plan_from_config(two_prompts)
    # each of 2 prompts once (1280 columns, a multiple of 256), then 16 sequences x 700 completion columns
    assert rows(compiled)["rollout KV cache (compiled engine: static, kept)"] == (2 * 1280 + 16 * 700) * per_token


def test_7b_pagrpo_under_ddp_bf16_true_equals_hand_worked_bytes_and_does_not_fit_80gb():
    cfg = config("pagrpo", strategy="ddp", precision="bf16-true", devices=7,
                 backbone={"class_path": "p2r.backbones.HFBackbone",
                           "init_args": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "dtype": "bfloat16", "gradient_checkpointing": True}},
                 micro_batch_size=2)
    p = plan_from_config(cfg)
    r = rows(p)
    assert r["weights"] == r["PA-GRPO reference"] == r["DDP gradient buckets"] == r["gradients"] == 2 * N_7B
    assert r["optimizer state (AdamW, 2 per trainable)"] == 4 * N_7B
    # 2 + 4 + 2 + 2 bytes per parameter, and the compiled engine's static KV cache, before any activation
    assert p.persistent_total == 10 * N_7B + 425_721_856
    assert "does NOT fit in 80 GiB" in format_plan(p, 80)


@pytest.mark.parametrize(("job", "from_rank0", "expected"), [
    ("sft", True, N_7B * 4),  # rank 0's float32 copy, once per job
    ("pagrpo", True, N_7B * 4),  # the bf16 reference is filled from the same copy
    ("sft", False, 8 * N_7B * 4),  # every rank of the node builds the whole model
    ("pagrpo", False, 8 * N_7B * (4 + 2)),  # ... and its bf16 reference
])
def test_host_memory_at_start_up_is_one_copy_when_rank0_builds(job, from_rank0, expected):
    strategy = {"class_path": "p2r.strategies.FSDP2Strategy", "init_args": {"weights_from_rank0": from_rank0}}
    cfg = config(job, strategy=strategy, devices=8, backbone={"class_path": "p2r.backbones.HFBackbone",
                                                              "init_args": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}})
    cfg["trainer"]["num_nodes"] = 2
    p = plan_from_config(cfg)
    assert host_weight_bytes(p.setup, p.counts) == ((expected, 0) if from_rank0 else (expected, expected))
    line = host_memory_line(p)
    assert f"{expected / 2**30:.1f} GiB on rank 0's node" in line and ("sends each rank its shard" in line) == from_rank0


def test_activation_estimate_equals_its_hand_worked_formula():
    cfg = config("pagrpo", precision="bf16-mixed", backbone={"class_path": "p2r.backbones.HFBackbone", "init_args": {
        "model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "gradient_checkpointing": True}}, micro_batch_size=2)
    p = plan_from_config(cfg)
    s = p.setup
    assert (s.strategy, s.stored, s.compute, s.autocast) == ("single", "float32", "bfloat16", True)
    h, i, layers, vocab = 3584, 18944, 28, 152064
    length = 1280 + 8 * 768  # one packed row: prompt + G completions (8 * 768 + 1 positions scored)
    per_layer = 2 * (6 * h + 4 * i) + 8 * h
    lm = length * (layers * h * 2 + per_layer)
    logits = 512 * vocab * 12  # the LM head runs on 512 of the 6145 scored positions at a time
    vision = 4096 * (32 * 1280 * 2 + 2 * (6 * 1280 + 4 * 3420) + 8 * 1280)
    # packed attention: the completions' (T, W + T) mask, and one layer's (gradient checkpointing)
    # completion keys and values with the prompt's in front, 4 kv heads + the 28-head repeat
    attention = 2 * (768 * (1280 + 768) + 8 * (1280 + 768) * (4 + 28) * 128 * 2)
    assert rows(p)["activations"] == lm + logits + vision + attention
    # autocast caches a bf16 copy of every trainable Linear/Conv weight and bias for the step:
    # all parameters but the input embedding and the RMSNorm weights (28 x 2 + 1 of 3584, 32 x 2 + 1 of 1280).
    assert rows(p)["autocast weight copies"] == 2 * (N_7B - 152064 * 3584 - 57 * 3584 - 65 * 1280)


def test_7b_pagrpo_under_fsdp1_keeps_a_whole_bf16_reference_on_every_gpu():
    cfg = config("pagrpo", strategy={"class_path": "p2r.strategies.FSDPStrategy"}, precision="bf16-mixed", devices=7,
                 backbone={"class_path": "p2r.backbones.HFBackbone",
                           "init_args": {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "dtype": "float32"}},
                 loss={"beta": 0.04})
    assert rows(plan_from_config(cfg))["PA-GRPO reference"] == 2 * N_7B  # FSDPStrategy.compute_dtype: bfloat16, not sharded


def test_setup_reads_strategy_precision_and_devices_from_the_config():
    s = setup_from_config(config(strategy={"class_path": "p2r.strategies.FSDPStrategy", "init_args": {"sharding_strategy": "SHARD_GRAD_OP"}},
                                 precision="bf16-mixed", devices=4))
    assert (s.strategy, s.shard, s.shard_weights, s.stored, s.compute, s.autocast) == ("fsdp1", 4, False, "float32", "bfloat16", False)
    s = setup_from_config(config(strategy="ddp", precision="bf16-mixed", devices=2))
    assert (s.strategy, s.autocast, s.world) == ("ddp", True, 2)
    s = setup_from_config(config(backbone={"class_path": "p2r.backbones.TinyQwen25VL", "init_args": {"quantization": "4bit", "dtype": "bfloat16"}}))
    assert (s.stored, s.quantization) == ("float32", "4bit")


def test_cli_print_memory_reads_the_stacked_configs_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/pagrpo.yaml", "--config", "configs/strategy/fsdp2.yaml", "--print_memory"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "pagrpo, fsdp2 over 7 GPU(s)" in out and "8,292,166,656" in out and "fits in 80 GiB per GPU" in out
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/sft.yaml", "--config", "configs/strategy/fsdp2.yaml", "--trainer.devices", "2",
              "--print_memory", "--device_memory_gb", "24"])
    out = capsys.readouterr().out
    assert "sft, fsdp2 over 2 GPU(s)" in out and "does NOT fit in 24 GiB" in out


def test_shard_counts_are_the_padded_dim0_split():
    from p2r.memory_plan import _rank_share

    assert _rank_share(152064 * 3584, 152064, 7) == math.ceil(152064 / 7) * 3584
    assert _rank_share(10, 10, 1) == 10 and _rank_share(3, 3, 8) == 1
