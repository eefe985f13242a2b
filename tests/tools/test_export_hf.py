"""tools/export_hf.py: tiny SFT runs (full and LoRA) exported to Hugging Face folders that the Auto
classes reload with the trained logits; the FSDP2 folder layout; QLoRA; `p2r test` on an export; errors."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from p2r.backbones import LoraOptions, TinyQwen25VL, VideoBackbone
from p2r.cli import main as p2r_main
from p2r.data.video import Clip

pytestmark = pytest.mark.slow  # subprocesses / several ranks / CLI fits: see pyproject's markers

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(REPO / "configs" / "sft.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
_spec = importlib.util.spec_from_file_location("export_hf_tool", REPO / "tools" / "export_hf.py")
export_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_hf)

_rng = np.random.default_rng(0)
# Frames 2, 6, 10, 14 of a 16-frame 4 fps clip at 56x56: the size the overlay's data pipeline makes.
VIDEO = Clip(_rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), fps=4.0, frame_indices=[2, 6, 10, 14], total_frames=16)
QUESTION = "How many shapes appear?"
LORA = {"r": 2, "alpha": 8, "dropout": 0.0}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Loading an exported folder must never reach for the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def overlay(tmp: Path, data: Path, sizes: dict, lora: bool) -> Path:
    """Two training steps of the tiny backbone, no validation, everything written under ``tmp``."""
    backbone = {**sizes, **({"lora": LORA} if lora else {})}
    config = {
        "trainer": {
            "default_root_dir": f"{tmp}/run", "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": f"{tmp}/run", "name": "logs"}}],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": f"{tmp}/checkpoints", "save_last": True}}],
        },
        "model": {"init_args": {"backbone": {"init_args": backbone}, "eval_max_new_tokens": 8}},
        "data": {
            "train_shards": f"{data}/shards/train-*.tar", "val_shards": None,
            "test_sets": {"synthetic": f"{data}/shards/test-*.tar"},
            "batch_size": 4, "eval_batch_size": 6, "num_workers": 0, "shuffle_buffer": 0,
            "train_frames": {"fps": 4.0, "min_frames": 4, "max_frames": 4, "min_pixels": 3136, "max_pixels": 3136},
            "eval_frames": {"fps": 4.0, "min_frames": 4, "max_frames": 4, "min_pixels": 3136, "max_pixels": 3136},
        },
    }
    path = tmp / "test_overlay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Run(NamedTuple):
    backbone: VideoBackbone
    """The trained backbone, in eval mode."""
    ckpt: Path
    """Its last.ckpt."""
    configs: list[str]
    """The --config arguments the run was launched with."""
    saved_config: Path
    """The config.yaml LightningCLI saved in the run's log folder."""


def fit(tmp_path_factory, data: Path, sizes: dict, lora: bool) -> Run:
    tmp = tmp_path_factory.mktemp("lora_run" if lora else "full_run")
    configs = [*CONFIGS, "--config", str(overlay(tmp, data, sizes, lora))]
    with mock.patch.object(sys, "argv", ["p2r"]):  # not pytest's own arguments
        cli = p2r_main(["fit", *configs])
    return Run(cli.model.backbone.eval(), tmp / "checkpoints" / "last.ckpt", configs, Path(cli.trainer.log_dir) / "config.yaml")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synthetic_root, tiny_sizes):
    return fit(tmp_path_factory, synthetic_root, tiny_sizes, lora=False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synthetic_root, tiny_sizes):
    return fit(tmp_path_factory, synthetic_root, tiny_sizes, lora=True)


def run_tool(ckpt: Path, out: Path, configs: list[str], *extra: str) -> int:
    return export_hf.main(["--ckpt", str(ckpt), "--out", str(out), *configs, *extra])


def reloaded_logits(out: Path, trained: VideoBackbone) -> torch.Tensor:
    """Logits of the folder reloaded by the Auto classes, on the prompt the reloaded processor builds,
    after checking that the processor builds exactly the trained backbone's inputs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == trained.render_prompt(QUESTION, "video")
    meta = VideoMetadata(total_num_frames=16, fps=4.0, frames_indices=VIDEO.frame_indices, height=56, width=56)
    inputs = processor(text=[prompt], videos=[VIDEO.frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    expected = trained.process_one(prompt, VIDEO)
    assert inputs.keys() == expected.keys()
    assert all(torch.equal(inputs[k], expected[k]) for k in inputs)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def trained_logits(trained: VideoBackbone) -> torch.Tensor:
    with torch.no_grad():
        return trained(**trained.encode([trained.render_prompt(QUESTION, "video")], [VIDEO]))


@pytest.mark.parametrize("run", ["full_run", "lora_run"])
def test_export_reloads_with_the_trained_logits(run, request, tmp_path, capsys):
    trained, ckpt, configs, _ = request.getfixturevalue(run)
    out = tmp_path / "hf"
    assert run_tool(ckpt, out, configs) == 0
    printed = capsys.readouterr().out
    assert f"verified: {out} reloads" in printed
    assert {"config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert torch.allclose(reloaded_logits(out, trained), trained_logits(trained), atol=1e-5)


def test_lora_export_is_a_plain_model_with_the_adapters_merged(lora_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    trained, ckpt, configs, _ = lora_run
    out = tmp_path / "hf"
    assert run_tool(ckpt, out, configs, "--dtype", "bfloat16") == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not any("lora_" in name for name, _ in model.named_modules())
    adapted = trained_logits(trained)
    with trained.adapters_disabled():
        base = trained_logits(trained)
    assert (adapted - base).abs().max() > 1e-3  # the adapters trained, so merging them matters
    assert torch.allclose(reloaded_logits(out, trained).float(), adapted, atol=0.1)  # bfloat16 rounding


def distributed_checkpoint(ckpt: Path, folder: Path) -> Path:
    """The folder Lightning's ModelParallelStrategy (FSDP2) writes, made from a single-file checkpoint:
    DCP files holding {"state_dict", "optimizer_0", ...} and meta.pt with the rest (its save_checkpoint)."""
    from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    converted = {"state_dict": checkpoint.pop("state_dict")}
    converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        _distributed_checkpoint_save(converted, folder)
    torch.save(checkpoint, folder / "meta.pt")
    return folder


def test_export_from_an_fsdp2_checkpoint_folder_and_the_saved_config(lora_run, tmp_path):
    trained, ckpt, _, saved_config = lora_run
    folder = distributed_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert {p.name for p in folder.iterdir()} >= {"meta.pt", ".metadata"}
    out = tmp_path / "hf"
    assert run_tool(folder, out, ["--config", str(saved_config)]) == 0
    assert torch.allclose(reloaded_logits(out, trained), trained_logits(trained), atol=1e-5)


def test_p2r_test_evaluates_the_exported_folder_through_hf_backbone(full_run, tmp_path):
    trained, ckpt, configs, _ = full_run
    out = tmp_path / "hf"
    assert run_tool(ckpt, out, configs) == 0
    hf = ["--model.init_args.backbone.class_path=p2r.backbones.HFBackbone", f"--model.init_args.backbone.init_args.model_name_or_path={out}"]
    with mock.patch.object(sys, "argv", ["p2r"]):
        cli = p2r_main(["test", *configs, *hf])
    assert type(cli.model.backbone).__name__ == "HFBackbone"
    evaluated, expected = cli.model.backbone.state_dict(), trained.state_dict()
    assert evaluated.keys() == expected.keys() and all(torch.equal(evaluated[k], expected[k]) for k in expected)
    assert 0.0 <= float(cli.trainer.callback_metrics["test/accuracy"]) <= 1.0


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_export_takes_base_weights_from_the_source_and_the_rest_from_the_checkpoint(quantization, tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU 4-bit kernels need in_features >= 64 (one quantization block).
    sizes = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1, vocab_size=512)
    lora = LoraOptions(r=2, alpha=8, dropout=0.0, target_modules=["q_proj"])
    qlora = TinyQwen25VL(**sizes, quantization=quantization, lora=lora)
    qlora.build()
    trained = dict(qlora.named_parameters())
    layer = "model.base_model.model.model.language_model.layers.0"
    with torch.no_grad():  # what training moves: the adapters and (here) a full-precision norm
        torch.nn.init.normal_(trained[f"{layer}.self_attn.q_proj.lora_B.default.weight"], std=0.5)
        trained[f"{layer}.input_layernorm.weight"].add_(0.25)
    ckpt = tmp_path / "qlora.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in qlora.state_dict().items()}}, ckpt)
    config = tmp_path / "config.yaml"
    backbone = {"class_path": "p2r.backbones.TinyQwen25VL",
                "init_args": {**sizes, "quantization": quantization, "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}}}
    config.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": backbone}}}))

    exported = export_hf.export(ckpt, tmp_path / "hf", [config]).state_dict()
    source = TinyQwen25VL(**sizes)  # the same seed: the weights QLoRA quantized
    source.build()
    src = {k.removeprefix("model."): v for k, v in source.state_dict().items()}
    a, b = trained[f"{layer}.self_attn.q_proj.lora_A.default.weight"], trained[f"{layer}.self_attn.q_proj.lora_B.default.weight"]
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(exported[q], src[q] + (8 / 2) * b @ a, atol=1e-6)
    for name in ("self_attn.k_proj.weight", "mlp.down_proj.weight"):  # quantized, no adapter: the source
        key = f"model.language_model.layers.0.{name}"
        assert torch.equal(exported[key], src[key])
    norm = "model.language_model.layers.0.input_layernorm.weight"
    assert torch.equal(exported[norm], trained[f"{layer}.input_layernorm.weight"])
    assert not torch.equal(exported[norm], src[norm])


def test_errors_name_what_is_wrong_and_where(full_run, tmp_path, capsys):
    _, ckpt, configs, _ = full_run
    missing = tmp_path / "nope.ckpt"
    assert run_tool(missing, tmp_path / "a", configs) == 1
    assert f"--ckpt: no checkpoint file or folder at {str(missing)!r}" in capsys.readouterr().err

    (tmp_path / "shards").mkdir()
    assert run_tool(tmp_path / "shards", tmp_path / "b", configs) == 1
    assert "is a folder without meta.pt: not a Lightning distributed checkpoint" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match=r"--config: no file at '.*nope\.yaml'"):
        export_hf.export(ckpt, tmp_path / "c", [tmp_path / "nope.yaml"])
    (tmp_path / "empty.yaml").write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(ValueError, match=r"none of '.*empty\.yaml' sets model.init_args.backbone"):
        export_hf.export(ckpt, tmp_path / "c", [tmp_path / "empty.yaml"])

    (tmp_path / "typo.yaml").write_text("model: {init_args: {backbone: {init_args: {hidden_sise: 64}}}}\n")
    with pytest.raises(ValueError, match=r"--config '.*typo\.yaml': model.init_args.backbone is not a valid backbone"):
        export_hf.export(ckpt, tmp_path / "c", [Path(p) for p in configs if p != "--config"] + [tmp_path / "typo.yaml"])

    absent = tmp_path / "models" / "absent"
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {
        "class_path": "p2r.backbones.HFBackbone", "init_args": {"model_name_or_path": str(absent)}}}}}))
    with pytest.raises(FileNotFoundError, match=rf"cannot load the backbone from folder {str(absent)!r}"):
        export_hf.export(ckpt, tmp_path / "c", [tmp_path / "hf.yaml"])

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"--out '.*used' exists and is not empty"):
        export_hf.export(ckpt, tmp_path / "used", [])


@pytest.mark.parametrize(
    ("init_args", "kind"), [({"lora": {"r": 2}}, "lora=on, quantization=None): "), ({"hidden_size": 64}, "of another shape")],
    ids=["lora", "size"],
)
def test_a_config_that_does_not_match_the_checkpoint_is_refused(full_run, tmp_path, init_args, kind):
    _, ckpt, configs, _ = full_run
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"init_args": init_args}}}}))
    paths = [Path(p) for p in configs if p != "--config"] + [wrong]
    with pytest.raises(ValueError, match=r"--ckpt '.*last\.ckpt' does not match the backbone of the --config files") as err:
        export_hf.export(ckpt, tmp_path / "hf", paths)
    assert kind in str(err.value) and "pass the config files the run was trained with" in str(err.value)
