"""Demo report: metrics reading, loss and accuracy plots, the ASCII table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlpretrain.demo.report import (
    StageResult,
    format_seed_tables,
    format_tables,
    plot_accuracy,
    plot_loss_curves,
    read_metrics,
)
from vlpretrain.testing.shapes import CAPTION_ATTRIBUTES, SINGLE_IMAGE_QUESTION_TYPES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(stage: str, qa: float, caption: float | None, **fields) -> StageResult:
    captions = {} if caption is None else dict.fromkeys(CAPTION_ATTRIBUTES, caption)
    return StageResult(
        stage=stage,
        num_trainable_params=fields.get("params", 0),
        num_steps=fields.get("steps", 0),
        final_loss=fields.get("loss"),
        qa_by_type=dict.fromkeys(SINGLE_IMAGE_QUESTION_TYPES, qa),
        caption_by_attribute=captions,
        seconds=fields.get("seconds", 0.0),
    )


RESULTS = [
    _result("untrained", 0.125, 0.25),
    _result("stage2", 0.8125, 0.5, params=1234567, steps=50, loss=0.5, seconds=30.04),
    _result("image-blind", 0.4, None),
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
    accuracy_png = plot_accuracy(RESULTS, tmp_path / "accuracy.png")
    for png in (loss_png, accuracy_png):
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 200


def test_plot_accuracy_needs_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_accuracy([], tmp_path / "a.png")


def test_means_over_types_and_attributes() -> None:
    row = StageResult(
        stage="s", num_trainable_params=0, num_steps=0, final_loss=None,
        qa_by_type={"colour": 1.0, "count": 0.5}, caption_by_attribute={}, seconds=0.0,
    )  # fmt: skip
    assert row.qa_accuracy == pytest.approx(0.75)
    assert row.caption_accuracy is None


def test_format_tables() -> None:
    summary, captions, questions = format_tables(RESULTS).split("\n\n")
    lines = summary.splitlines()
    assert [c.strip() for c in lines[1].split("|")[1:-1]] == [
        "stage", "trainable params", "steps", "final loss", "caption acc", "QA acc", "seconds",
    ]  # fmt: skip
    assert (
        "| untrained   |                0 |     0 |          - |       25.0% |  12.5% |     0.0 |"
        in lines
    )
    assert (
        "| stage2      |        1,234,567 |    50 |     0.5000 |       50.0% |  81.2% |    30.0 |"
        in lines
    )
    assert (
        "| image-blind |                0 |     0 |          - |           - |  40.0% |     0.0 |"
        in lines
    )
    # The blind baseline has no captions: it is left out of the caption table.
    assert "image-blind" not in captions and "image-blind" in questions
    header = [c.strip() for c in questions.splitlines()[2].split("|")[1:-1]]
    assert header == ["stage", *SINGLE_IMAGE_QUESTION_TYPES]
    assert "| stage2      |  81.2% |" in questions
    assert format_tables(RESULTS).isascii()


def test_seed_tables_report_median_and_range() -> None:
    seeds = [[_result("stage2", qa, 0.5)] for qa in (0.9, 0.7, 0.8)]
    text = format_seed_tables(seeds, [0, 1, 2])
    assert "seeds 0, 1, 2" in text
    assert "| stage2 | 50.0 [50.0-50.0] | 80.0 [70.0-90.0] |" in text
