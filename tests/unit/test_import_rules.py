"""House-style import direction (DESIGN.md): lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vlpretrain"

FORBIDDEN = {
    "vlpretrain.data": ("vlpretrain.model", "vlpretrain.train", "vlpretrain.distributed"),
    "vlpretrain.model": ("vlpretrain.train", "vlpretrain.distributed", "vlpretrain.data"),
    "vlpretrain.distributed": ("vlpretrain.train",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names imported by a module (relative imports resolved), incl. nested imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            # `from vlpretrain import model` imports the subpackage.
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_the_layers_the_rules_name():
    names = {_module_name(p) for p in MODULES}
    for package in (
        "vlpretrain.data",
        "vlpretrain.model",
        "vlpretrain.distributed",
        "vlpretrain.train",
    ):
        assert package in names


def test_relative_imports_resolve():
    path = PACKAGE / "model" / "build.py"
    assert _module_name(path) == "vlpretrain.model.build"
    assert "vlpretrain.model.vision" in _imports(path)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_import_direction(path):
    module = _module_name(path)
    imported = _imports(path)
    for layer, forbidden in FORBIDDEN.items():
        if not _within(module, layer):
            continue
        bad = sorted(n for n in imported if any(_within(n, f) for f in forbidden))
        assert not bad, f"{module} ({layer}) must not import {bad}"
