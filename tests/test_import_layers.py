"""Imports run one way: ``simulations`` -> ``client`` / ``server`` -> ``common``.

The four folders are installed as ``fedmm.simulations``, ``fedmm.client``, ``fedmm.server``
and ``fedmm.common`` (pyproject's ``package-dir``), so every import names them with the
``fedmm.`` prefix; a bare ``import common`` would find whatever other distribution in the
environment owns that generic name, and counts as an error.

A site's code never imports the coordinator's (nor the other way round), and shared code
imports neither. Every import in every module counts, including those inside functions (the
lazy imports that keep torch out of the SecAgg+ stages).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
#: The one installed top-level name.
PREFIX = "fedmm"
#: Which top-level packages each package may import from.
ALLOWED = {
    "common": {"common"},
    "client": {"client", "common"},
    "server": {"server", "common"},
    "simulations": {"simulations", "client", "server", "common"},
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(project package, line) of every absolute import in ``path``: ``common`` for
    ``fedmm.common...``, and ``bare common`` for an import of ``common...`` itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PREFIX and len(parts) > 1 and parts[1] in ALLOWED:
                found.add((parts[1], node.lineno))
            elif parts[0] in ALLOWED:
                found.add((f"bare {parts[0]}", node.lineno))
    return found


def test_every_module_imports_only_its_own_layer_or_those_below() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for top, line in sorted(project_imports(path)):
                if top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from fedmm.server.federation import run_federation\n")
    assert project_imports(module) == {("server", 2)}
    module.write_text("import common.model\nfrom server import app\n")
    assert project_imports(module) == {("bare common", 1), ("bare server", 2)}
    module.write_text("from .sibling import x\nimport numpy\n")
    assert project_imports(module) == set()


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_is_a_package(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()


def test_tests_import_the_installed_names_too() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for top, line in sorted(project_imports(path))
        if top.startswith("bare ")
    ]
    assert not wrong, "\n".join(wrong)
