"""Security rules: API keys come only from the environment and never reach a file of the run,
``trust_remote_code`` is off unless a config turns it on, checkpoints load with
``weights_only=True`` (a pickled object is refused, never executed), and no source file runs
``eval``/``exec``, a shell, ``pickle`` or an unsafe YAML loader (checked on the syntax tree).
"""

from __future__ import annotations

import ast
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from callbacks.rollouts import Rollouts
from p2r.backbones import HFBackbone
from p2r.backbones.base import VideoBackbone
from p2r.cli import main

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-p2r-security-test-9f3c2a7e5d1b"
KEY_ENV = "P2R_JUDGE_API_KEY"


def _run_overlay(run_dir: Path, base_url: str) -> dict:
    """An overlay on configs/pagrpo.yaml: the OpenAI-compatible judge on ``base_url``, every output under ``run_dir``."""
    judge = {"class_path": "callbacks.rewards.judges.OpenAIChatJudge",
             "init_args": {"base_url": base_url, "model": "judge-model", "api_key_env": KEY_ENV,
                           "timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.01}}
    return {
        "model": {"init_args": {"backbone": {"init_args": {"weights_from": None}}}},  # start from random weights
        "trainer": {
            "default_root_dir": str(run_dir),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(run_dir), "name": "logs"}}],
            "callbacks": [
                {"class_path": "callbacks.reward_callbacks.ReasoningAccuracyReward"},
                {"class_path": "callbacks.reward_callbacks.PerceptionJudgeReward",
                 "init_args": {"judge": judge, "failure_policy": "zero", "use_facts": False}},
                {"class_path": "callbacks.rollout_table.RolloutTableWriter", "init_args": {"every_n_steps": 1}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "every_n_train_steps": 1}},
            ],
        },
    }


@pytest.mark.slow
def test_api_key_reaches_the_judge_but_no_file_of_the_run(synthetic_root, tiny_sizes, chat_server, chat_payload,
                                                           tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, SECRET)
    # The first reply echoes the key back (servers do, in error bodies): it must be redacted, not logged.
    server = chat_server([(500, chat_payload(500, f"bad key {SECRET}"), 0.0), (200, chat_payload(200, "yes"), 0.0)])
    # A random tiny policy almost never writes an <observation> block, and an empty observation is
    # judged 0 without a request; a fixed observation makes every sample reach the judge.
    monkeypatch.setattr(Rollouts, "observation", lambda self, i: f"a red circle moves left ({i})")
    run_dir = tmp_path / "run"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(_run_overlay(run_dir, server.base_url)))
    monkeypatch.chdir(tmp_path)
    sizes = [f"--model.init_args.backbone.init_args.{k}={v}" for k, v in tiny_sizes.items()]
    with caplog.at_level(logging.DEBUG):
        cli = main(["fit", "--config", f"{REPO}/configs/pagrpo.yaml", "--config", f"{REPO}/configs/tiny.yaml",
                    "--config", str(overlay), *sizes,
                    f"--data.train_shards={synthetic_root}/shards/train-*.tar", "--data.val_shards=null",
                    "--data.batch_size=1", "--data.num_workers=0", "--trainer.max_steps=2",
                    "--trainer.limit_val_batches=0", "--model.init_args.rollout.group_size=2",
                    "--model.init_args.rollout.max_completion_length=6", "--model.init_args.micro_batch_size=2"])
    assert cli.trainer.global_step == 2
    assert server.requests and all(r["headers"].get("Authorization") == f"Bearer {SECRET}" for r in server.requests)

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hparams.yaml", "metrics.csv", "last.ckpt", "rollouts.jsonl"} <= names, names
    leaked = [str(p.relative_to(run_dir)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text + out + err
    assert "***" in caplog.text  # the echoed key was logged, redacted
    # The checkpoint loads without unpickling arbitrary objects, so a resume can insist on that too.
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


def _capture_from_pretrained(monkeypatch) -> dict[str, dict]:
    """Replace transformers' loaders of the processor and the model by ones that record their kwargs."""
    import transformers

    calls: dict[str, dict] = {}

    def fake(name):
        def from_pretrained(path, **kwargs):
            calls[name] = {"path": path, **kwargs}
            return SimpleNamespace() if name == "processor" else nn.Linear(2, 2)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake("processor"))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake("model"))
    return calls


@pytest.mark.parametrize("kwargs, expected", [({}, False), ({"trust_remote_code": True}, True)])
def test_trust_remote_code_is_off_unless_configured_and_reaches_from_pretrained(monkeypatch, kwargs, expected):
    calls = _capture_from_pretrained(monkeypatch)
    backbone = HFBackbone("some-org/some-vlm", **kwargs)
    backbone.build()
    assert backbone.trust_remote_code is expected
    assert calls["processor"]["path"] == calls["model"]["path"] == "some-org/some-vlm"
    assert calls["processor"]["trust_remote_code"] is expected
    assert calls["model"]["trust_remote_code"] is expected


class _Payload:
    """Unpickling this calls ``_mark_executed(path)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _mark_executed, (self.marker,)


def _mark_executed(marker: str) -> str:
    Path(marker).write_text("executed")
    return marker


class _OneWeight(VideoBackbone):
    """The smallest backbone that can load weights: one linear layer, no processor."""

    def _make_processor(self):
        return None

    def _make_model(self, torch_dtype, quantization_config):
        return nn.Linear(2, 2)


def test_weights_from_refuses_a_pickled_object_without_running_it(tmp_path):
    backbone = _OneWeight()
    backbone.build()
    marker = tmp_path / "executed"
    ckpt = tmp_path / "evil.ckpt"
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"x": _Payload(marker)}}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        _OneWeight(weights_from=str(ckpt)).build()
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the payload is live: a trusting load runs it
    assert marker.read_text() == "executed"


def test_weights_from_accepts_a_plain_checkpoint(tmp_path):
    source = _OneWeight()
    source.build()
    with torch.no_grad():
        source.model.weight.fill_(0.5)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ok.ckpt")
    target = _OneWeight(weights_from=str(tmp_path / "ok.ckpt"))
    target.build()
    assert torch.equal(target.model.weight, source.model.weight)


# ---- static checks on the syntax tree: comments and strings never trip them ------------------------

SOURCE_DIRS = ("p2r", "callbacks", "tools")
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name for every import (``from os import system as s`` gives s -> os.system)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):  # "import a.b" binds a; "import a.b as c" binds c to a.b
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, imported: dict[str, str]) -> str:
    """The qualified name a call target spells (``os.system``); "" when it is not a dotted name."""
    if isinstance(node, ast.Name):
        return imported.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, imported)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.AST | None, *values: object) -> bool:
    return isinstance(node, ast.Constant) and any(node.value is v for v in values)


CODE_RUNNERS = {"eval", "exec", "builtins.eval", "builtins.exec", "os.system", "os.popen", "pickle.load",
                "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
                "cloudpickle.load", "cloudpickle.loads", "yaml.unsafe_load", "yaml.full_load",
                "yaml.unsafe_load_all", "yaml.full_load_all", "joblib.load", "pandas.read_pickle"}


def _unsafe(call: ast.Call, name: str, imported: dict[str, str]) -> str | None:
    """Why ``call`` (to ``name``) is unsafe, or None."""
    if name in CODE_RUNNERS or name.startswith(("os.exec", "os.spawn")):
        return f"{name}()"
    shell = _keyword(call, "shell")
    if name.startswith("subprocess.") and shell is not None and not _is_constant(shell, False, None):
        return f"{name}(shell=...)"
    if name in ("yaml.load", "yaml.load_all"):
        loader = call.args[1] if len(call.args) > 1 else _keyword(call, "Loader")
        if loader is None or _dotted(loader, imported).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
            return f"{name}() without SafeLoader"
    allow_pickle = _keyword(call, "allow_pickle")
    if name == "numpy.load" and allow_pickle is not None and not _is_constant(allow_pickle, False):
        return "numpy.load(allow_pickle=...)"
    if name == "torch.load" and not _is_constant(_keyword(call, "weights_only"), True):
        return "torch.load() without weights_only=True"
    return None


def unsafe_calls(source: str) -> list[str]:
    """Each call in ``source`` that evaluates code, runs a shell, unpickles, or loads YAML unsafely."""
    tree = ast.parse(source)
    imported = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (why := _unsafe(node, _dotted(node.func, imported), imported)):
            found.append(f"line {node.lineno}: {why}")
    return found


@pytest.mark.parametrize("snippet", [
    "eval(text)", "exec(code)", "os.system('ls')", "os.popen(cmd)", "subprocess.run(cmd, shell=True)",
    "subprocess.Popen(cmd, shell=flag)", "pickle.loads(blob)", "yaml.load(f)", "yaml.load(f, Loader=yaml.Loader)",
    "yaml.full_load(f)", "torch.load(path)", "torch.load(path, weights_only=False)",
    "from os import system as run\nrun('ls')", "from subprocess import check_output\ncheck_output(c, shell=True)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
])
def test_the_checker_finds_unsafe_calls(snippet):
    assert unsafe_calls(f"import os, subprocess, pickle, yaml, torch\n{snippet}\n")


@pytest.mark.parametrize("snippet", [
    "model.eval()", "ast.literal_eval(s)", "subprocess.run([sys.executable, 'x.py'], check=True)",
    "subprocess.run(cmd, shell=False)", "yaml.load(f, Loader=yaml.SafeLoader)", "yaml.safe_load(f)",
    "torch.load(p, map_location='cpu', weights_only=True)", "import numpy as np\nnp.load(f)", "x = 'eval(1); os.system(\"rm -rf /\")'  # exec(y)",
])
def test_the_checker_ignores_safe_code_strings_and_comments(snippet):
    assert unsafe_calls(f"import os, subprocess, pickle, yaml, torch, ast, sys\n{snippet}\n") == []


def test_no_source_file_evaluates_code_runs_a_shell_or_unpickles():
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = {str(p.relative_to(REPO)): found for p in files if (found := unsafe_calls(p.read_text()))}
    assert not problems, problems


@pytest.mark.parametrize("content", ["payload", b"garbage bytes, not a checkpoint", b"PK\x03\x04 a truncated zip"])
def test_ckpt_path_that_is_not_a_readable_checkpoint_says_so_without_advising_unsafe_loading(tmp_path, content):
    # --ckpt_path goes through the CLI's checkpoint IO. torch's own message for these files advises
    # weights_only=False, which would run the payload's code; p2r names the file and the cause instead.
    from p2r.checkpoints import AtomicCheckpointIO, UnreadableCheckpoint

    marker, path = tmp_path / "executed", tmp_path / "bad.ckpt"
    if content == "payload":
        torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UnreadableCheckpoint, match=r"'.*bad\.ckpt' is not a readable checkpoint \(.+\)") as caught:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value) and "never unpickles code" in str(caught.value)
    assert not marker.exists()
