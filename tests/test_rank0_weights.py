"""FSDP2 on several ranks builds the model empty (meta device) on every rank and only rank 0 makes or
loads the weights (``weights_from`` included) and sends each rank its shard
(:func:`p2r.strategies.load_from_rank0`): the sharded policy and PA-GRPO's bfloat16 reference
then hold exactly the weights one process builds, buffers that no state dict holds (rotary
frequencies) included, and rank 1 never builds a whole model nor reads the checkpoint.

The host-memory figures this buys are measured by tools/bench_host_memory.py (docs/scale.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_strategies import child_env  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.slow  # two ranks in subprocesses

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import p2r.backbones.building
import p2r.checkpoints
from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings
from p2r.backbones import TinyQwen25VL
from p2r.strategies import FSDP2Strategy

out, ckpt, devices, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1,
             vocab_size=512, seed=0, freeze_vision=True)
events = []
full_model, read = TinyQwen25VL.full_model, p2r.checkpoints.read_backbone_state
TinyQwen25VL.full_model = lambda self: (events.append("full_model"), full_model(self))[1]
p2r.backbones.building.read_backbone_state = lambda *a: (events.append("read"), read(*a))[1]


class Collect(L.Callback):
    def on_fit_start(self, trainer, module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        models = {"policy": module.backbone.model, "reference": module.reference.model}
        state = {name: get_model_state_dict(m, options=options) for name, m in models.items()}
        buffers = {name: {k: b.cpu() for k, b in m.named_buffers()} for name, m in models.items()}
        meta = [k for m in models.values() for k, p in m.named_parameters() if p.is_meta]
        (out / f"events.rank{trainer.global_rank}.json").write_text(json.dumps({"events": events, "meta": meta}))
        if trainer.global_rank == 0:
            torch.save({"state": state, "buffers": buffers}, out / "weights.pt")


module = PAGRPOModule(TinyQwen25VL(**SIZES, weights_from=ckpt), loss=LossSettings(beta=0.04))
strategy = FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32", save_distributed_checkpoint=False,
                         weights_from_rank0=mode == "rank0")
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=0, logger=False, callbacks=[Collect()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([[0]], batch_size=None))
'''


def test_rank0_sends_each_rank_the_weights_one_process_builds(tmp_path):
    from p2r.backbones import TinyQwen25VL

    sizes = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=16, vision_depth=1,
                 vocab_size=512, seed=0, freeze_vision=True)
    # An SFT checkpoint with weights that no seed gives: only reading it yields them.
    plain = TinyQwen25VL(**sizes)
    plain.build()
    sft = {f"backbone.model.{k}": v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in plain.model.state_dict().items()}
    ckpt = tmp_path / "sft.ckpt"
    torch.save({"state_dict": sft}, ckpt)
    expected = TinyQwen25VL(**sizes, weights_from=str(ckpt)).full_model()

    script = tmp_path / "rank0.py"
    script.write_text(SCRIPT)
    for mode in ("rank0", "every_rank"):
        out = tmp_path / mode
        out.mkdir()
        done = subprocess.run([sys.executable, str(script), str(out), str(ckpt), "2", mode], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
        saved = torch.load(out / "weights.pt", weights_only=True)
        for name, dtype in (("policy", torch.float32), ("reference", torch.bfloat16)):
            state = saved["state"][name]
            assert set(state) == set(expected.state_dict())
            for key, value in expected.state_dict().items():
                assert state[key].dtype == (dtype if value.is_floating_point() else value.dtype), key
                assert torch.equal(state[key], value.to(state[key].dtype)), (mode, name, key)
            buffers = dict(expected.named_buffers())
            assert any("inv_freq" in k for k in saved["buffers"][name])  # the non-persistent rotary buffers came along
            for key, value in saved["buffers"][name].items():
                assert torch.equal(value, buffers[key]), (mode, name, key)
        events = [json.loads((out / f"events.rank{r}.json").read_text()) for r in (0, 1)]
        assert not events[0]["meta"] and not events[1]["meta"]  # nothing left unmaterialised
        if mode == "rank0":
            assert events[0]["events"] == ["full_model", "read"] and events[1]["events"] == []
        else:  # every rank builds the whole model and reads the checkpoint itself
            assert events[0]["events"] == events[1]["events"] == ["full_model", "read"]
