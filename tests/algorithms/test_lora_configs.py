"""configs/backbone/lora.yaml and qlora.yaml through the real CLI on the tiny backbone: SFT trains
only the adapters; PA-GRPO starts from a FULL SFT checkpoint (its weights become the base under
the adapters), its reference is the model with the adapters disabled (KL exactly 0 at the first
step, no frozen copy), and it moves only the adapters."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from p2r.cli import main
from p2r.data.synthetic import make_synthetic

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

ROOT = Path(__file__).resolve().parents[2]
# bitsandbytes' CPU 4-bit kernels need layers with at least 64 inputs.
SIZES = [
    "--model.init_args.backbone.init_args.hidden_size=64",
    "--model.init_args.backbone.init_args.num_layers=2",
    "--model.init_args.backbone.init_args.vision_hidden_size=64",
    "--model.init_args.backbone.init_args.lora.r=4",
    "--trainer.limit_val_batches=0",
    "--data.num_workers=0",
    "--trainer.log_every_n_steps=1",
]
PLAIN = [s for s in SIZES if ".lora." not in s]
VARIED_REWARD = "--trainer.callbacks+=varied_rewards.TokenSumReward"


@pytest.fixture(scope="module")
def full_sft(tmp_path_factory):
    """A full (no LoRA) tiny SFT run: runs/sft/checkpoints/last.ckpt in its own working folder."""
    work = tmp_path_factory.mktemp("lora")
    make_synthetic(work / "data", 8, 2, 2, seed=0, progress=False)
    data = [f"--data.train_shards={work}/data/shards/train-*.tar", "--data.batch_size=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/tiny.yaml", *PLAIN, *data,
              "--trainer.max_steps=2"])
    return work, data


def overlay(kind: str) -> list[str]:
    return ["--config", f"{ROOT}/configs/backbone/{kind}.yaml"]


def base_and_adapters(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    lora = {k: v for k, v in state.items() if "lora_" in k}
    return {k: v for k, v in state.items() if k not in lora}, lora


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_sft_with_the_overlay_trains_only_the_adapters(full_sft, kind, monkeypatch):
    work, data = full_sft
    monkeypatch.chdir(work)
    cli = main(["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/tiny.yaml", *overlay(kind),
                *SIZES, *data, "--trainer.max_steps=2", "--trainer.default_root_dir=runs/sft_adapters",
                "--trainer.callbacks=[]", "--trainer.logger=false"])
    model = cli.model.backbone.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0: it moved
    if kind == "qlora":
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_pagrpo_with_the_overlay_starts_from_a_full_sft_checkpoint(full_sft, kind, monkeypatch):
    work, data = full_sft
    monkeypatch.chdir(work)
    sft = torch.load(work / "runs/sft/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    cli = main(["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml", *overlay(kind),
                *SIZES, *data, "--trainer.max_steps=2", "--model.init_args.rollout.group_size=2",
                "--model.init_args.rollout.max_completion_length=10", VARIED_REWARD, f"--trainer.default_root_dir=runs/pagrpo_{kind}"])
    module = cli.model
    assert module.reference.model is None  # the reference is the adapters switched off
    rows = list(csv.DictReader(open(next((work / f"runs/pagrpo_{kind}/logs").glob("version_*/metrics.csv")))))
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6)

    base, adapters = base_and_adapters(module.backbone.model.state_dict())
    assert any(float(v.abs().sum()) > 0 for k, v in adapters.items() if "lora_B" in k)  # the adapters trained
    # The base under the adapters is the SFT model: exactly (LoRA) or its 4-bit rounding (QLoRA).
    q_key = next(k for k in sft if k.endswith("language_model.layers.0.self_attn.q_proj.weight"))
    sft_q = sft[q_key].float()
    layer = module.backbone.model.get_base_model().get_submodule(q_key[len("backbone.model.") :].rsplit(".", 1)[0]).base_layer
    if kind == "lora":
        assert torch.equal(layer.weight.float(), sft_q)
        norm_key = next(k for k in sft if k.endswith("language_model.norm.weight"))
        assert torch.equal(base[norm_key[len("backbone.model.") :].replace("model.", "base_model.model.model.", 1)], sft[norm_key])
    else:
        import bitsandbytes.functional as bnbf

        restored = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.nn.functional.cosine_similarity(restored.flatten(), sft_q.flatten(), dim=0) > 0.98


def test_pagrpo_after_a_lora_sft_starts_from_the_merged_sft_model(full_sft, monkeypatch):
    """LoRA SFT -> LoRA PA-GRPO through the CLI: the SFT checkpoint records its adapters' options, the
    RL run merges those adapters into its base (W + alpha / r * B A), so its adapters-disabled
    reference is the SFT model; the KL of the first update is 0."""
    work, data = full_sft
    monkeypatch.chdir(work)
    main(["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/tiny.yaml", *overlay("lora"),
          *SIZES, *data, "--trainer.max_steps=2", "--trainer.default_root_dir=runs/sft_lora", "--trainer.logger=false",
          "--trainer.callbacks=[{\"class_path\": \"lightning.pytorch.callbacks.ModelCheckpoint\", "
          "\"init_args\": {\"save_last\": true}}]"])  # no LearningRateMonitor: it needs a logger
    ckpt = torch.load(work / "runs/sft_lora/checkpoints/last.ckpt", weights_only=True)
    stored = ckpt["p2r_backbone"]["lora"]
    assert stored["r"] == 4 and stored["alpha"] == 128  # the overlay's alpha, the test's rank
    sft = ckpt["state_dict"]
    layer = "backbone.model.base_model.model.model.language_model.layers.0.self_attn.q_proj"
    a, b = sft[f"{layer}.lora_A.default.weight"], sft[f"{layer}.lora_B.default.weight"]
    assert b.abs().sum() > 0  # the SFT adapters trained
    merged_q = sft[f"{layer}.base_layer.weight"] + stored["alpha"] / stored["r"] * b @ a

    cli = main(["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml", *overlay("lora"),
                *SIZES, *data, "--trainer.max_steps=1", "--model.init_args.rollout.group_size=2",
                "--model.init_args.rollout.max_completion_length=8", VARIED_REWARD,
                "--model.init_args.backbone.init_args.weights_from=runs/sft_lora/checkpoints/last.ckpt",
                "--trainer.default_root_dir=runs/pagrpo_after_lora_sft"])
    base_q = cli.model.backbone.model.get_base_model().model.language_model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(base_q.detach().cpu(), merged_q, atol=1e-6, rtol=0)
    newest = next((work / "runs/pagrpo_after_lora_sft/logs").glob("version_*/metrics.csv"))
    kl = [float(r["train/kl"]) for r in csv.DictReader(open(newest)) if r.get("train/kl")]
    assert kl == [pytest.approx(0.0, abs=1e-6)]
