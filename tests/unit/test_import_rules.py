"""Import direction (DESIGN.md "Layout"): every module imports only layers below
its own, so a lower layer never depends on a higher one. The one exception is config.py, which
composes the `*Config` dataclasses that live next to the code they configure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vlpretrain"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("vlpretrain.__main__", "vlpretrain.cli"),
    ("vlpretrain.demo",),
    ("vlpretrain.testing",),
    ("vlpretrain.pipeline", "vlpretrain.chat"),
    ("vlpretrain.flags",),
    ("vlpretrain.train",),
    ("vlpretrain.config",),
    ("vlpretrain.distributed",),
    ("vlpretrain.formats",),
    ("vlpretrain.model",),
    ("vlpretrain.data",),
    ("vlpretrain.facts",),
    ("vlpretrain.tokens", "vlpretrain.log", "vlpretrain.files", "vlpretrain.errors", "vlpretrain"),
)
"""Top to bottom, as DESIGN.md lists them; `vlpretrain` is the package's own __init__."""

CONFIG_MAY_IMPORT = "Config"
"""config.py may import names ending in this from any layer (and nothing else from above)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific unit that contains `module`."""
    best, best_length = None, -1
    for index, units in enumerate(LAYERS):
        for unit in units:
            inside = module == unit or module.startswith(unit + ".")
            if inside and len(unit) > best_length:
                best, best_length = index, len(unit)
    if best is None:
        raise KeyError(module)
    return best


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import of ours, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                (a.name, [], node.lineno) for a in node.names if a.name.startswith("vlpretrain")
            ]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level or target.startswith("vlpretrain"):
                found.append(("." * node.level + target, [a.name for a in node.names], node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
IDS = [str(p.relative_to(PACKAGE.parent)) for p in MODULES]


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_every_module_has_a_layer(path):
    """A new top-level module must be placed in LAYERS (and DESIGN.md) before it is used."""
    layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_imports_point_down_the_layers(path):
    module = module_name(path)
    own = layer_of(module)
    bad = []
    for target, names, line in imports_of(path):
        if target.startswith("."):
            bad.append(f"line {line}: relative import {target!r} (write the absolute name)")
            continue
        # `from vlpretrain import x` imports the unit vlpretrain.x.
        units = [f"{target}.{n}" for n in names] if target == "vlpretrain" else [target]
        for unit in units:
            if layer_of(unit) >= own:
                continue
            if module == "vlpretrain.config" and all(n.endswith(CONFIG_MAY_IMPORT) for n in names):
                continue
            bad.append(f"line {line}: {unit} {names} is in layer {layer_of(unit)}, above {own}")
    assert not bad, f"{module} (layer {own}, {LAYERS[own]}) imports upward:\n" + "\n".join(bad)
