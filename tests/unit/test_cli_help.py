"""The command line answers at once and speaks to users: building the parser and every
`--help` import no heavy library, and the help says what each command does, how the usual
flow goes, which flags `train` accepts and how it resumes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from vlpretrain.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "numpy")
"""Libraries whose import takes seconds; only the command that runs may load them."""


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list:
    """Every command and nested command of `parser`, e.g. ("train",), ("data", "check")."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found.append((*prefix, name))
                found.extend(command_paths(subparser, (*prefix, name)))
    return found


COMMANDS = command_paths(build_parser())


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_building_the_parser_imports_no_heavy_library():
    # A fresh interpreter: this test process has imported torch already.
    code = (
        "import sys; from vlpretrain.cli import build_parser; build_parser(); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert run_python(code) == "[]"


def test_every_help_through_python_dash_m_imports_no_heavy_library():
    helps = [["--help"], *[[*command, "--help"] for command in COMMANDS]]
    code = f"""
import contextlib, io, runpy, sys
for argv in {helps!r}:
    sys.argv = ["vlpretrain", *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module("vlpretrain", run_name="__main__")
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    assert run_python(code) == "[]"


def test_the_parser_knows_every_command():
    assert sorted(COMMANDS) == sorted(
        [("train",), ("show-config",), ("pipeline",), ("demo",), ("data",), ("data", "check"),
         ("data", "show"), ("chat",), ("export",), ("unlock",), ("plot",)]
    )  # fmt: skip


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_says_what_vlpretrain_does_and_the_usual_flow(capsys):
    text = help_text([], capsys)
    assert text.split("\n\n")[1].startswith("vlpretrain trains InternVL-style vision-language")
    flow = text[text.index("usual flow:") :]
    order = ["data check", "train stage1.toml", "pipeline", "chat", "export"]
    positions = [flow.index(f"vlpretrain {step}") for step in order]
    assert positions == sorted(positions)
    assert "Command-line shell" not in text  # the developer docstring is not the user's help


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_says_what_it_does(command, capsys):
    text = help_text(list(command), capsys)
    description = text.split("\n\n")[1]
    assert description[0].isupper() and len(description.split()) >= 4, description


def test_train_help_names_reference_flags_resume_and_overrides(capsys):
    text = " ".join(help_text(["train"], capsys).split())  # argparse may wrap lines
    for phrase in (
        "internvl_chat_pretrain.py",
        "--vision_path",
        "--learning_rate",
        "--freeze_llm True",
        "Rerunning the same command resumes from the newest checkpoint",
        'train.resume = "auto"',
        "--overwrite_output_dir True starts from scratch",
        "--set section.key=value overrides any field",
        "vlpretrain show-config",
    ):
        assert phrase in text, phrase
