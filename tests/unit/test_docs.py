"""The prose stays true to the code: files and functions the docs name exist, and everything
in the repository speaks of the project itself (no spec sections, issue numbers, style-rule
numbers or commit hashes, which a reader of the repository cannot follow)."""

from __future__ import annotations

import builtins
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


SELF_REFERENCE = {
    "a spec citation": re.compile(
        r"\bspec(?:ification)?\b[^\n.;]{0,12}?(?:§|\bsection\b|\bitem\b|\bappendix\b|\d+\.\d+|\d)",
        re.I,
    ),
    "a section sign": re.compile(r"§"),
    "a spec appendix": re.compile(r"\bAppendix [A-Z]\b"),
    "the spec itself": re.compile(r"\bthe (?:behaviou?ral )?spec\b", re.I),
    "an issue number": re.compile(r"\b(?:issues?|PR|pull request)\s+#?\d+|\(#\d+\)", re.I),
    "a style-rule number": re.compile(r"\b(?:house[- ]style|style rule|rule \d+)\b", re.I),
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,12}\b"),
}
"""Ways prose points outside the project (to a spec, a tracker, a style guide, a commit)
instead of saying the behaviour and why."""

PROSE_AND_CODE = sorted(
    path
    for pattern in (
        "*.md",
        "vlpretrain/**/*.py",
        "tests/**/*.py",
        "bench/**/*.py",
        "docs/*.md",
        "configs/**/*.toml",
        "recipes/*.toml",
        "Makefile",
        "bench/*.sh",
    )
    for path in REPO.glob(pattern)
    if path.resolve() != Path(__file__).resolve()
)


def test_the_project_speaks_only_of_itself():
    found = []
    for path in PROSE_AND_CODE:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for what, pattern in SELF_REFERENCE.items():
                if match := pattern.search(line):
                    where = path.relative_to(REPO)
                    found.append(f"{where}:{number}: {what} {match.group(0)!r}")
    assert not found, "say the behaviour and why instead:\n" + "\n".join(found)


CODE_NAME = re.compile(r"`([A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)(?:\.\w+)*(?:\(\))?`")
"""A backticked class-like name (two humps or more): `SkipTally`, `PackedLayout.cu_seqlens`."""
CALLED = re.compile(r"`([a-z_][a-z0-9_]*[a-z0-9])\([^`]*\)`")
"""A backticked call of a snake_case function: `build_dataloader(...)`, `write_atomic()`."""


def python_words() -> set[str]:
    """Every identifier the repository's Python mentions (definitions, imports, calls)."""
    words = set(dir(builtins))
    for path in [*REPO.glob("vlpretrain/**/*.py"), *REPO.glob("tests/**/*.py"),
                 *REPO.glob("bench/**/*.py")]:  # fmt: skip
        words |= set(re.findall(r"[A-Za-z_]\w*", path.read_text()))
    return words


def test_code_names_in_docs_exist_in_the_code():
    # A renamed class or function leaves the prose behind; only names the repository's Python
    # never mentions are reported, so the reference's and libraries' names the code uses pass.
    known = python_words()
    missing = []
    for doc in [REPO / "README.md", *DOCS]:
        text = doc.read_text()
        names = set(CODE_NAME.findall(text)) | set(CALLED.findall(text))
        missing += [f"{doc.name}: {name}" for name in sorted(names - known)]
    assert not missing, "docs name what the code does not have:\n" + "\n".join(missing)


COMMAND_LINE = re.compile(r"^\s*(?:\$ )?(?:\.venv/bin/)?vlpretrain ((?:[^\n\\]|\\\n)*)$", re.M)
"""A `vlpretrain ...` command in a doc, with its backslash-continued lines."""


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in [REPO / "README.md", *DOCS]:
        for match in COMMAND_LINE.finditer(doc.read_text()):
            found.append((doc.name, match.group(1).replace("\\\n", " ").split("#")[0]))
    return found


@pytest.mark.parametrize(("doc", "line"), documented_commands())
def test_documented_commands_parse(doc, line):
    import shlex

    from vlpretrain.cli import build_parser, split_reference_flags

    own, _ = split_reference_flags(shlex.split(line))
    try:
        build_parser().parse_known_args(own)
    except SystemExit as error:
        pytest.fail(f"{doc}: `vlpretrain {line}` does not parse ({error})")
