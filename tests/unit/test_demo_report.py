"""Demo report: accuracy plots, the ASCII tables (its loss curves are vlpretrain.plots')."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlpretrain.demo.report import (
    StageResult,
    format_seed_tables,
    format_tables,
    plot_accuracy,
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


def test_accuracy_plot_writes_a_png_file(tmp_path: Path) -> None:
    png = plot_accuracy(RESULTS, tmp_path / "accuracy.png")
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
