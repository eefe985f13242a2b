"""The rules of the README's Layout section hold in the code: Hugging Face specifics stay behind the
backbone, and private framework members are used in p2r/compat.py only (read from the syntax tree,
so comments and docstrings never count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HF_PACKAGES = {"transformers", "peft", "bitsandbytes"}
# Model, cache and config mechanics that only the backbone may touch.
HF_MEMBERS = {"get_text_config", "_attn_implementation", "past_key_values", "get_rope_index", "batch_repeat_interleave",
              "get_output_embeddings", "disable_adapter", "merge_and_unload", "from_pretrained"}
# Private members of Lightning, transformers, torch and jsonargparse that p2r relies on (p2r/compat.py).
FRAMEWORK_PRIVATE = {"_parse_ckpt_path", "_data_parallel_size", "_trainer", "_attn_implementation", "_from_config",
                     "_last_global_step_saved", "_dynamo", "_typehints", "_save_distributed_checkpoint", "_setup_model"}


def names_used(path: Path) -> tuple[set[str], set[str]]:
    """(top-level modules imported, attribute / function / string names used) in one source file."""
    modules, names = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.partition(".")[0])
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)  # getattr(obj, "_trainer")
    return modules, names


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("p2r/algorithms", "p2r/data", "p2r/evaluation", "p2r/cot"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_algorithms_data_and_evaluation_leave_hugging_face_to_the_backbone(path):
    modules, names = names_used(path)
    assert not modules & HF_PACKAGES, f"{path.relative_to(REPO)} imports {modules & HF_PACKAGES}: that belongs in p2r/backbones/"
    assert not names & HF_MEMBERS, f"{path.relative_to(REPO)} uses {names & HF_MEMBERS}: ask the backbone instead"


@pytest.mark.parametrize("path", [p for p in sources("p2r", "callbacks", "tools") if p.name != "compat.py"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_private_framework_members_are_used_in_compat_only(path):
    _, names = names_used(path)
    assert not names & FRAMEWORK_PRIVATE, f"{path.relative_to(REPO)} uses {names & FRAMEWORK_PRIVATE}: go through p2r/compat.py"


def test_the_checks_see_what_they_look_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import transformers\nx = model.config.get_text_config()\ny = getattr(m, '_trainer')\n# _dynamo\n")
    modules, names = names_used(probe)
    assert "transformers" in modules and {"get_text_config", "_trainer"} <= names and "_dynamo" not in names
    _, compat = names_used(REPO / "p2r" / "compat.py")
    assert FRAMEWORK_PRIVATE - {"_setup_model", "_save_distributed_checkpoint"} <= compat  # the list is what compat wraps
