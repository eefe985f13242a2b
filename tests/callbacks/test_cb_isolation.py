"""callbacks/ must never import p2r (another project uses it alone), and its doctests must hold."""

import ast
import doctest
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import callbacks

PACKAGE_DIR = Path(callbacks.__file__).resolve().parent
FORBIDDEN = "p2r"


def p2r_imports(source: str) -> list[str]:
    """Every import of p2r (absolute, ``from p2r...``, or ``importlib.import_module("p2r...")``) in a source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [n for n in names if n == FORBIDDEN or n.startswith(FORBIDDEN + ".")]
    return found


def module_names():
    return [m.name for m in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="callbacks.")]


def test_the_scanner_catches_p2r_imports():
    assert p2r_imports("import p2r\nfrom p2r.data import records\nimport importlib\nimportlib.import_module('p2r.cli')") \
        == ["p2r", "p2r.data", "p2r.cli"]
    assert p2r_imports("import p2rx\nfrom callbacks import rollouts\nimport os") == []


def test_no_file_under_callbacks_imports_p2r():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) >= 10
    offenders = {str(f.relative_to(PACKAGE_DIR)): p2r_imports(f.read_text()) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.slow
def test_importing_every_callbacks_module_loads_no_p2r():
    names = module_names()
    assert "callbacks.reward_callbacks" in names and "callbacks.rewards.judges" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'p2r' or m.startswith('p2r.'))\n"
        "print('P2R_MODULES', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(PACKAGE_DIR.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "P2R_MODULES []" in done.stdout


@pytest.mark.parametrize("name", module_names())
def test_doctests(name):
    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
