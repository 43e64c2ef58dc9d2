"""The package's structure, checked: the layer contracts of pyproject.toml (import-linter),
that they catch a violation, and that only RunFolder spells the names of a run folder's files."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sddecc_dist"
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # grimp finds the package on sys.path: the copy under test, not the installed checkout
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, env={"PYTHONPATH": str(cwd),
                                                                             "PATH": "/usr/bin:/bin"})


def test_import_contracts_are_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_a_function_local_upward_import_breaks_the_contracts(tmp_path):
    """The contracts are not vacuous: the model importing the trainer inside a function (the
    kind of import that once made a cycle here) is caught as a layer breach and a cycle."""
    shutil.copytree(PACKAGE, tmp_path / "sddecc_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    gcn = tmp_path / "sddecc_dist" / "model" / "gcn.py"
    gcn.write_text(gcn.read_text() + "\n\ndef _sneaky():\n    from sddecc_dist.train import loop  # noqa: F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "Layers: each imports only the layers below it BROKEN" in out.stdout, out.stdout[-3000:]
    assert "No import cycle inside any package BROKEN" in out.stdout


# What a run folder holds: these names may appear only in run_folder.py (docstrings aside).
RUN_FOLDER_NAMES = re.compile(
    r"config\.yaml|metrics\.jsonl?|assignments\.txt|pretrain\.pt|final\.pt|trainer_state\.json"
    r"|checkpoints[/.]|ckpt-|\.inference-spool")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in a module that is not documentation: not a
    docstring, not a `help=` text."""
    tree = ast.parse(path.read_text())
    documentation = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                documentation.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            documentation.update(id(n) for n in ast.walk(node.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation]


def test_only_the_run_folder_module_names_run_folder_files():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "run_folder.py"
                 for line, text in _code_strings(path) if RUN_FOLDER_NAMES.search(text)]
    assert not offenders, "run-folder file names outside run_folder.py:\n" + "\n".join(offenders)
    # the scan sees the names where they are defined
    assert any(RUN_FOLDER_NAMES.search(text) for _, text in _code_strings(PACKAGE / "run_folder.py"))
