"""FSDP2 (p2r.strategies.FSDP2Strategy) with two CPU processes (gloo) trains like one process on
the same data: SFT and PA-GRPO, same losses step by step, same parameter updates. The
configs/strategy/fsdp2.yaml overlay runs through the CLI, writes distributed checkpoints that
resume, export and seed the next stage; configs/strategy/fsdp.yaml stops on a CPU with a pointer.

Each run is a script in a subprocess, so Lightning's launcher can start the second rank. The
global batch of each step is fixed: with one process SFT accumulates the two halves (loss / 2
each, exactly what averaging two ranks' gradients does) and PA-GRPO takes both prompts in one
batch; with two processes rank r gets half r. PA-GRPO's rollouts draw from one generator per
prompt, seeded by the prompt's global index, so both layouts sample the same completions.

Parameters are compared by the direction of the whole update (cosine) and its size: AdamW turns
float noise on near-zero gradients into full-size steps for those few entries, so an exact
comparison would test the noise; a rank that trained on its own data (no gradient averaging)
moves the weights elsewhere and fails both checks. The gradients themselves (before the optimizer
step) are compared exactly in tests/algorithms/test_fsdp2_gradients.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from p2r.data.synthetic import make_synthetic
from p2r.strategies import is_sharded, shard

REPO = Path(__file__).resolve().parents[1]
# Set by a launcher: a child that inherits LOCAL_RANK believes it was launched and never starts rank 1.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}

SCRIPT = r'''
import json, sys
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from p2r.algorithms.pagrpo import PAGRPOModule
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.algorithms.sft import SFTModule
from p2r.backbones import TinyQwen25VL
from p2r.data.datamodule import decode_sample
from p2r.data.video import FrameSampling
from p2r.strategies import FSDP2Strategy
from varied_rewards import TokenParityReward, TokenSumReward  # rewards that vary inside every group

data, out, devices, job = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
STEPS, HALVES = 3, 2
frames = FrameSampling(fps=4.0, min_frames=4, max_frames=4, min_pixels=784, max_pixels=784)
raw = wds.tarfile_to_samples()(iter([{"url": str(u)} for u in sorted((data / "shards").glob("train-*.tar"))]))
samples = [decode_sample(r, frames) for r in raw][: STEPS * HALVES]


class Halves(L.LightningDataModule):
    """Step k's global batch is samples[2k], samples[2k+1]; this rank gets the halves it owns."""

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = []
        for k in range(STEPS):
            mine = [samples[HALVES * k + h] for h in range(HALVES) if h % world == rank]
            batches += [[s] for s in mine] if job == "sft" else [mine]
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if job == "sft":  # Lightning hands over the loss divided by the accumulation factor
            self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        else:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


backbone = TinyQwen25VL(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vision_hidden_size=16,
                        vision_depth=1, vocab_size=512, seed=0, freeze_vision=True)
if job == "sft":
    module = SFTModule(backbone, lr=1e-3, schedule="constant")
else:
    module = PAGRPOModule(backbone, lr=1e-3, schedule="constant", micro_batch_size=4,
                          rollout=RolloutSettings(group_size=4, max_completion_length=12), loss=LossSettings(beta=0.04))
strategy = FSDP2Strategy(param_dtype=None, reduce_dtype=None, save_distributed_checkpoint=False) if devices > 1 else "auto"
recorder = Recorder()
callbacks = [recorder] + ([TokenSumReward(), TokenParityReward()] if job == "pagrpo" else [])
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    accumulate_grad_batches=HALVES // devices if job == "sft" else 1, callbacks=callbacks)
backbone.build()
start = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()} if devices == 1 else None
trainer.fit(module, datamodule=Halves())
(out / f"losses.rank{trainer.global_rank}.json").write_text(json.dumps(recorder.losses))
if devices > 1:
    from torch.distributed.fsdp import FSDPModule
    assert isinstance(backbone.model, FSDPModule), "the policy was not sharded"
    blocks = [m for m in backbone.model.modules() if isinstance(m, FSDPModule) and m is not backbone.model]
    assert len(blocks) >= 3, blocks  # two decoder layers and the vision block
    if job == "pagrpo":
        assert isinstance(module.reference.model, FSDPModule), "the reference was not sharded"
    final = get_model_state_dict(backbone.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    final = backbone.model.state_dict()
if trainer.global_rank == 0:
    torch.save({"final": final, "start": start}, out / "weights.pt")
'''


def run(script: Path, data: Path, out: Path, devices: int, job: str) -> None:
    out.mkdir(parents=True)
    env = child_env()
    done = subprocess.run([sys.executable, str(script), str(data), str(out), str(devices), job], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    make_synthetic(root / "data", 6, 1, 1, seed=2, samples_per_shard=6, progress=False)
    script = root / "fsdp2_parity.py"
    script.write_text(SCRIPT)
    return root, script


def losses(out: Path) -> list[list[float]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("losses.rank*.json"))]


def update_agreement(one: Path, two: Path) -> tuple[float, float]:
    """(cosine, size ratio) of the two runs' whole-model updates from the same start."""
    a, b = torch.load(one / "weights.pt", weights_only=True), torch.load(two / "weights.pt", weights_only=True)
    start = a["start"]
    keys = sorted(k for k in start if start[k].is_floating_point())
    da = torch.cat([(a["final"][k].float() - start[k].float()).flatten() for k in keys])
    db = torch.cat([(b["final"][k].float() - start[k].float()).flatten() for k in keys])
    assert da.norm() > 0, "the one-process run did not train"
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0)), float(db.norm() / da.norm())


@pytest.mark.slow
@pytest.mark.parametrize("job", ["sft", "pagrpo"])
def test_two_fsdp2_ranks_train_like_one_process(setup, job):
    root, script = setup
    run(script, root / "data", root / f"{job}-one", 1, job)
    run(script, root / "data", root / f"{job}-two", 2, job)
    (single,), (rank0, rank1) = losses(root / f"{job}-one"), losses(root / f"{job}-two")
    if job == "sft":
        # One process: halves a0 b0 a1 b1 ...; rank 0 saw a0 a1 ..., rank 1 b0 b1 ...
        assert single[0::2] == pytest.approx(rank0, rel=1e-4) and single[1::2] == pytest.approx(rank1, rel=1e-4)
    else:
        # PA-GRPO's loss is the mean over samples: the two ranks' mean is the one-process loss.
        assert single == pytest.approx([(x + y) / 2 for x, y in zip(rank0, rank1)], rel=1e-4, abs=1e-6)
        assert len(set(single)) > 1  # the loss changed over the steps (not a constant that always agrees)
    cosine, ratio = update_agreement(root / f"{job}-one", root / f"{job}-two")
    assert cosine > 0.99 and 0.97 < ratio < 1.03, (cosine, ratio)


@pytest.mark.slow
def test_the_fsdp2_config_trains_resumes_exports_and_feeds_the_next_stage(setup, tmp_path):
    """configs/strategy/fsdp2.yaml as its launch line says (two CPU processes, bf16 compute): a
    distributed checkpoint folder that ``--ckpt_path last`` resumes (step and data position),
    that tools/export_hf.py turns into a Hugging Face folder, and that ``weights_from`` loads."""
    from transformers import AutoModelForImageTextToText

    from p2r.backbones import TinyQwen25VL

    root, _ = setup
    cmd = [sys.executable, "-m", "p2r", "fit", "--config", str(REPO / "configs/sft.yaml"), "--config",
           str(REPO / "configs/tiny.yaml"), "--config", str(REPO / "configs/strategy/fsdp2.yaml"), "--trainer.devices=2",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.limit_val_batches=0",
           "--trainer.enable_progress_bar=false", f"--trainer.callbacks=[{{\"class_path\": \"lightning.pytorch.callbacks.ModelCheckpoint\", "
           f"\"init_args\": {{\"dirpath\": \"{tmp_path}/ckpt\", \"save_last\": true}}}}]",
           f"--data.train_shards={root}/data/shards/train-*.tar", "--data.val_shards=null", "--data.batch_size=1",
           "--data.num_workers=0", *[f"--model.init_args.backbone.init_args.{k}={v}" for k, v in
                                     (("hidden_size", 32), ("num_layers", 2), ("vision_hidden_size", 32))]]
    env = child_env()
    for steps in (2, 3):
        resume = ["--ckpt_path", "last"] if steps == 3 else []
        done = subprocess.run([*cmd, f"--trainer.max_steps={steps}", *resume], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    last = tmp_path / "ckpt/last.ckpt"
    # The sharded checkpoint validates on the two ranks (tests/evaluation/test_eval_fsdp2.py checks the figures).
    validate = [("validate" if a == "fit" else a) for a in cmd if not a.startswith("--trainer.callbacks")]
    done = subprocess.run([*validate, f"--data.val_shards={root}/data/shards/val-*.tar", "--trainer.limit_val_batches=null",
                           "--model.init_args.eval_max_new_tokens=4", "--ckpt_path", str(last)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "val/accuracy" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    leftovers = [p.name for p in last.parent.iterdir() if p.name.endswith(".partial") or "-previous" in p.name]
    assert not leftovers  # written aside, swapped in, nothing left over
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == 3
    position = meta["VideoDataModule"]["train_position"]  # the datamodule carries the stream position
    # 3 steps are the whole first epoch (3 batches per rank): the position is the start of epoch 1.
    assert (position["epoch"], position["trained"]) == (1, 0) and len(position["raw"]) == 2  # both ranks' positions
    assert meta["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]

    configs = [REPO / "configs/sft.yaml", REPO / "configs/tiny.yaml"]
    sizes = dict(hidden_size=32, num_layers=2, vision_hidden_size=32)
    overrides = tmp_path / "sizes.yaml"
    overrides.write_text("model:\n  init_args:\n    backbone:\n      init_args: " + json.dumps(sizes) + "\n")
    configs = [a for c in (*configs, overrides) for a in ("--config", str(c))]
    done = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), "--ckpt", str(last), "--out", str(tmp_path / "hf"),
                           *configs], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "verified" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").state_dict()
    next_stage = TinyQwen25VL(**sizes, seed=0, freeze_vision=True, weights_from=str(last))
    next_stage.build()
    for key, value in next_stage.model.state_dict().items():
        assert torch.equal(value, reloaded[key]), key


@pytest.mark.slow
def test_fsdp1_config_on_a_cpu_stops_with_a_pointer_to_fsdp2(setup, tmp_path, monkeypatch):
    from p2r.cli import main

    root, _ = setup
    monkeypatch.chdir(tmp_path)
    for key in LAUNCH_ENV:  # Lightning exports these in-process; later subprocess tests must not inherit them
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"FSDPStrategy \(configs/strategy/fsdp.yaml\) needs CUDA GPUs.*configs/strategy/fsdp2.yaml"):
        main(["fit", "--config", str(REPO / "configs/sft.yaml"), "--config", str(REPO / "configs/tiny.yaml"),
              "--config", str(REPO / "configs/strategy/fsdp.yaml"), f"--data.train_shards={root}/data/shards/train-*.tar",
              "--data.val_shards=null", "--trainer.max_steps=1", "--trainer.logger=false"])


def test_shard_refuses_lightnings_model_parallel_strategy_and_leaves_other_strategies_alone():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="leaves sharding to the module.*FSDP2Strategy"):
        shard(ModelParallelStrategy(), model, set())
    shard(None, model, set())
    shard(DDPStrategy(), model, set())
    assert not is_sharded(model)


def test_fsdp2_refuses_a_quantized_model_before_sharding_anything():
    from p2r.strategies import FSDP2Strategy

    class Linear4bit(torch.nn.Linear):  # what bitsandbytes' 4-bit layers are called
        pass

    model = torch.nn.Sequential(Linear4bit(2, 2))
    with pytest.raises(ValueError, match="cannot shard a 4/8-bit quantized backbone"):
        FSDP2Strategy().parallelize(model, set())
    assert not is_sharded(model)


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16), ("32-true", torch.float32)])
def test_fsdp1_reference_is_copied_in_the_mixed_precision_dtype(precision, dtype, monkeypatch):
    """Under FSDPStrategy the reference is not part of the wrapped module (whole on every GPU): it is
    copied in the dtype FSDP computes in, half the memory of a float32 copy under bf16-mixed."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import FSDPPrecision

    from p2r.algorithms.pagrpo import PAGRPOModule
    from p2r.algorithms.settings import RolloutSettings
    from p2r.backbones import TinyQwen25VL
    from p2r.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    strategy.precision_plugin = FSDPPrecision(precision)  # what the Trainer attaches; no CUDA needed to read it
    assert strategy.compute_dtype == dtype
    trainer = SimpleNamespace(strategy=strategy)
    for where in ("p2r.algorithms.pagrpo.attached_trainer", "p2r.algorithms.base.attached_trainer"):
        monkeypatch.setattr(where, lambda module: trainer)
    module = PAGRPOModule(TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1, vocab_size=512),
                          rollout=RolloutSettings(group_size=2))
    module.configure_model()
    assert {p.dtype for p in module.backbone.model.parameters()} == {torch.float32}
    assert {p.dtype for p in module.reference.model.parameters()} == {dtype}
