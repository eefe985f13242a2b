"""p2r.compat: every private framework member p2r relies on still exists and still means what p2r
assumes. When one of these fails after an upgrade, the message names the member; fix p2r/compat.py
(and only it) for the new version."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import ModelParallelStrategy

from p2r import compat
from p2r.cli import P2RCLI, main

REPO = Path(__file__).resolve().parents[1]


# ---- Lightning ---------------------------------------------------------------------------------


def test_lightning_cli_merges_checkpoint_hyperparameters_in_parse_ckpt_path():
    source = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in source, "LightningCLI no longer calls _parse_ckpt_path: update CheckpointSuppliesWeightsOnly"
    assert "hyper_parameters" in inspect.getsource(LightningCLI._parse_ckpt_path)
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    assert P2RCLI._parse_ckpt_path is compat.CheckpointSuppliesWeightsOnly._parse_ckpt_path


def test_model_parallel_strategy_builds_its_mesh_from_data_parallel_size():
    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert strategy._data_parallel_size == "auto"
    compat.set_data_parallel_size(strategy, 6)
    assert strategy._data_parallel_size == 6
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert 'if self._data_parallel_size == "auto"' in source and "self._data_parallel_size, self._tensor_parallel_size" in source


def test_attached_trainer_is_the_trainer_or_none():
    module = BoringModel()
    assert compat.attached_trainer(module) is None
    with pytest.raises(RuntimeError, match="not attached"):
        module.trainer  # noqa: B018 - the public property raises, hence compat.attached_trainer
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_last_saved_step_follows_model_checkpoint_saves(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    assert compat.last_saved_step(callback) == 0
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert trainer.global_step == 3 and compat.last_saved_step(callback) == 2  # saved at 2, not at the end


def test_a_last_save_through_model_checkpoint_is_not_saved_again_at_the_end(tmp_path):
    """Saved any other way, ModelCheckpoint.on_train_end saves again as last-v1.ckpt (what FinalCheckpoint avoids)."""
    class SaveLastAtEnd(L.Callback):
        def __init__(self, through: bool) -> None:
            self.through = through

        def on_train_end(self, trainer, pl_module):
            if self.through:
                compat.save_last_checkpoint(trainer.checkpoint_callback, trainer)
            else:
                trainer.save_checkpoint(tmp_path / str(self.through) / "last.ckpt")

    for through in (False, True):
        callback = ModelCheckpoint(dirpath=tmp_path / str(through), every_n_train_steps=10, save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, callbacks=[SaveLastAtEnd(through), callback],
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(BoringModel())
        names = sorted(p.name for p in (tmp_path / str(through)).iterdir())
        assert names == (["last.ckpt"] if through else ["last-v1.ckpt", "last.ckpt"])
        assert through is False or callback.last_model_path == str(tmp_path / "True" / "last.ckpt")


def test_default_checkpoint_io_is_torch_checkpoint_io_and_can_be_replaced(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO and compat.uses_default_checkpoint_io(trainer.strategy)

    class Recording(TorchCheckpointIO):
        paths: list = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.paths.append(str(path))
            super().save_checkpoint(checkpoint, path, storage_options)

    trainer.strategy.checkpoint_io = Recording()
    assert not compat.uses_default_checkpoint_io(trainer.strategy)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert Recording.paths == [str(tmp_path / "x.ckpt")]


# ---- transformers ------------------------------------------------------------------------------


def _tiny_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64)


def test_a_registered_kernel_gets_the_built_in_masks_and_the_forwards_keyword_arguments():
    """What p2r.backbones.attention rests on: a model dispatches attention through its config at
    every forward, a kernel registered with a built-in one's masks gets the masks that one gets,
    and extra keyword arguments of the model's forward reach the kernel."""
    from transformers import Qwen2ForCausalLM

    config = _tiny_config()
    compat.set_attention_implementation(config, "sdpa")
    model = Qwen2ForCausalLM(config).eval()
    calls = []

    def recording(module, query, key, value, attention_mask, marker=None, **kwargs):
        calls.append((marker, None if attention_mask is None else attention_mask.shape))
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    compat.register_attention_kernel("p2r_test_recording", recording, "sdpa")
    ids, padded = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]])
    with torch.no_grad():
        expected = model(ids, attention_mask=padded).logits
        compat.set_attention_implementation(model.config, "p2r_test_recording")
        assert compat.attention_implementation(model.config) == "p2r_test_recording"
        switched = model(ids, attention_mask=padded, marker="here").logits
    assert calls == [("here", (1, 1, 3, 3))]  # one layer: the padding mask built as for sdpa, the marker passed on
    torch.testing.assert_close(switched, expected, atol=1e-5, rtol=1e-5)


def test_model_from_config_creates_the_weights_in_the_dtype():
    from transformers import Qwen2ForCausalLM

    model = compat.model_from_config(Qwen2ForCausalLM, _tiny_config(), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert inspect.signature(Qwen2ForCausalLM._from_config).parameters.keys() >= {"config"}


def test_mark_static_address_accepts_a_tensor():
    compat.mark_static_address(torch.zeros(2))


# ---- jsonargparse ------------------------------------------------------------------------------


class Inner:
    def __init__(self, path: str | None = "x", options: dict | None = None) -> None:
        pass


class InnerChild(Inner):
    def __init__(self, size: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)


class Outer:
    def __init__(self, inner: Inner) -> None:
        pass


def _parse(args: list[str]):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Outer, "outer")
    cfg = parser.parse_args([f"--outer.class_path={__name__}.Outer", f"--outer.init_args.inner.class_path={__name__}.InnerChild",
                             *args])
    return cfg.outer.init_args.inner.init_args


def test_jsonargparse_turns_a_nested_null_into_the_string_none_without_the_fix(monkeypatch):
    from jsonargparse import _typehints

    compat.fix_nested_values()
    fixed = _typehints.subclass_spec_as_namespace
    monkeypatch.setattr(_typehints, "subclass_spec_as_namespace", fixed.__wrapped__)
    # When this fails, jsonargparse reads nested values right by itself: remove compat.fix_nested_values.
    assert _parse(["--outer.init_args.inner.init_args.path=null"]).path == "None"


def test_nested_values_keep_their_type_with_the_fix():
    compat.fix_nested_values()
    compat.fix_nested_values()  # idempotent: wrapped once
    assert _parse(["--outer.init_args.inner.init_args.path=null"]).path is None
    assert _parse(["--outer.init_args.inner.init_args.path=a/b.ckpt"]).path == "a/b.ckpt"
    assert _parse(["--outer.init_args.inner.init_args.path=a", "--outer.init_args.inner.init_args.path=null"]).path is None
    assert _parse(["--outer.init_args.inner.init_args.options={a: null, b: [1, 2]}"]).options == {"a": None, "b": [1, 2]}
    assert _parse(["--outer.init_args.inner.init_args.size=3"]).size == 3


def test_the_cli_reads_weights_from_null_as_none(capsys):
    args = ["fit", "--config", str(REPO / "configs/pagrpo.yaml"), "--config", str(REPO / "configs/tiny.yaml"),
            "--model.init_args.backbone.init_args.weights_from=null", "--model.init_args.backbone.init_args.quantization=null",
            "--print_config"]
    with mock.patch.object(sys, "argv", ["p2r"]), pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None), capsys.readouterr().err
    backbone = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["backbone"]["init_args"]
    assert backbone["weights_from"] is None and backbone["quantization"] is None
