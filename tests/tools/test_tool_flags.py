"""Every command-line program in tools/ matches flags exactly, as the p2r CLI does: a prefix such as
``--group`` for ``--group-size`` is an error, not a silent guess."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def parser_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "ArgumentParser":
                calls.append(node)
    return calls


@pytest.mark.parametrize("path", sorted(TOOLS.glob("*.py")), ids=lambda p: p.name)
def test_every_parser_refuses_prefix_flags(path):
    for call in parser_calls(path):
        abbrev = [k.value for k in call.keywords if k.arg == "allow_abbrev"]
        assert abbrev and isinstance(abbrev[0], ast.Constant) and abbrev[0].value is False, \
            f"{path.name}:{call.lineno}: ArgumentParser(...) without allow_abbrev=False"


def test_the_tools_define_their_parsers_where_this_test_looks():
    with_parsers = {p.name for p in TOOLS.glob("*.py") if parser_calls(p)}
    assert {"bench_common.py", "export_hf.py", "make_shards.py", "rescore.py", "generate_cot.py"} <= with_parsers


def test_a_prefix_of_a_bench_flag_is_an_error(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    from bench_common import add_step_shape, bench_parser

    parser = bench_parser("doc")
    add_step_shape(parser, new_tokens=8)
    assert parser.parse_args(["--group-size", "4"]).group_size == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--group", "4"])
    assert "unrecognized arguments: --group" in capsys.readouterr().err
    sys.modules.pop("bench_common", None)
