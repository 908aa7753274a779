"""Demo report: metrics reading, loss and accuracy plots, the ASCII table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlpretrain.demo.report import (
    StageResult,
    format_table,
    plot_accuracy,
    plot_loss_curves,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = [
    StageResult(
        stage="untrained",
        num_trainable_params=0,
        num_steps=0,
        final_loss=None,
        eval_accuracy=0.125,
        seconds=0.0,
    ),
    StageResult(
        stage="stage2",
        num_trainable_params=1234567,
        num_steps=50,
        final_loss=0.5,
        eval_accuracy=0.8125,
        seconds=30.04,
    ),
]


def _write_metrics(path: Path, num_steps: int) -> Path:
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, num_steps + 1)]
    rows.append({"step": num_steps, "eval_loss": 1.0})  # not a training row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def test_read_metrics_keeps_training_rows(tmp_path: Path) -> None:
    rows = read_metrics(_write_metrics(tmp_path / "m.jsonl", 3))
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["loss"] == pytest.approx(1.0)


def test_read_metrics_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": \n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_metrics(path)


def test_plots_write_png_files(tmp_path: Path) -> None:
    stages = {
        "stage1": _write_metrics(tmp_path / "s1.jsonl", 10),
        "stage2": _write_metrics(tmp_path / "s2.jsonl", 5),
    }
    loss_png = plot_loss_curves(stages, tmp_path / "out" / "loss.png")
    accuracy_png = plot_accuracy(RESULTS, tmp_path / "accuracy.png", chance=0.4)
    for png in (loss_png, accuracy_png):
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 200


def test_plot_accuracy_needs_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_accuracy([], tmp_path / "a.png")


def test_format_table() -> None:
    table = format_table(RESULTS, chance=0.4)
    lines = table.splitlines()
    assert lines[1].split("|")[1:-1] == [
        " stage     ",
        " trainable params ",
        " steps ",
        " final loss ",
        " eval acc ",
        " seconds ",
    ]
    assert "| untrained |                0 |     0 |          - |    12.5% |     0.0 |" in lines
    assert "| stage2    |        1,234,567 |    50 |     0.5000 |    81.2% |    30.0 |" in lines
    assert lines[-1].endswith(": 40.0%")
    assert table.isascii()
