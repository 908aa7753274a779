"""The prose stays true to the code: files and functions the docs name exist, and
DIFFERENCES.md describes the reference instead of citing a spec that is not in the repo."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [REPO / "CONTRIBUTING.md", REPO / "DESIGN.md", REPO / "DIFFERENCES.md", *REPO.glob("docs/*.md")]
)
IDS = [str(p.relative_to(REPO)) for p in DOCS]
EXTERNAL = {"internvl_chat_pretrain.py"}
"""Files of the reference named in the docs (not in this repository)."""

PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|md|toml|txt))`")
"""A backticked file path: `data/packing.py`, `tests/unit/test_config.py`, `configs/x.toml`."""
NAMED = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)` `(\w+)(?:\.(\w+))?")
"""A path followed by a name in it: `data/packing.py` `fit_to_budget` or `BestFitPacker.add`."""


def resolve(name: str) -> Path | None:
    """The repository file a doc means: as written, or inside vlpretrain/."""
    for candidate in (REPO / name, REPO / "vlpretrain" / name):
        if candidate.exists():
            return candidate
    return None


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_named_files_exist(doc):
    text = doc.read_text()
    named = [name for name in PATH.findall(text) if "*" not in name and name not in EXTERNAL]
    missing = [name for name in named if resolve(name) is None]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_named_functions_exist_in_their_files(doc):
    missing = []
    for name, symbol, member in NAMED.findall(doc.read_text()):
        path = resolve(name)
        if path is None:
            continue  # reported by test_named_files_exist
        source = path.read_text()
        for wanted in filter(None, (symbol, member)):
            if not re.search(rf"^\s*(def|class) {wanted}\b|^{wanted}\b.*=", source, re.M):
                missing.append(f"{name} {wanted}")
    assert not missing, f"{doc.name} names what is not there: {missing}"


def test_differences_cite_no_spec_items():
    text = (REPO / "DIFFERENCES.md").read_text()
    citations = re.findall(r"\(\d+\.\d+[^)]*\)|spec(?:ification)? (?:item|section) \d+", text)
    assert not citations, f"describe the reference's behaviour instead of citing {citations}"
