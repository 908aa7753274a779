"""loss_curves.png from metrics.jsonl: which panels a run's keys give, one stage or several
back to back, `vlpretrain plot`, and one line instead of a failure where matplotlib is missing."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlpretrain.cli import main
from vlpretrain.packages import MissingPackageError
from vlpretrain.plots import (
    PANELS,
    STAGE_PLOT,
    panels_to_draw,
    plot_metrics,
    plot_stage,
    plot_stage_or_say_how,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    return path


def stage_rows(num_steps: int, **extra: float) -> list[dict]:
    return [{"step": s, "loss": 3.0 / s, "lr": 1e-3, **extra} for s in range(1, num_steps + 1)]


def test_read_metrics_keeps_the_numbers_of_step_records(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [*stage_rows(3), {"note": "no step"}])
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["loss"] == pytest.approx(1.0)


def test_read_metrics_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": \n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_metrics(path)


def test_panels_follow_the_keys_a_run_has():
    # A CPU run: no MFU; per-dataset losses and per-group learning rates when present.
    rows = [
        {"step": 1, "loss": 2.0, "loss/captions": 2.5, "loss/qa": 1.5, "lr/projector": 1e-3,
         "lr": 1e-4, "tokens_per_second": 900.0, "seconds": 1.0, "data_wait_seconds": 0.1},
    ]  # fmt: skip
    drawn = panels_to_draw({"stage": rows}, None)
    assert [(p.title, p.series(rows)) for p in drawn] == [
        ("loss", ["loss", "loss/captions", "loss/qa"]),
        ("learning rate", ["lr", "lr/projector"]),
        ("tokens/s", ["tokens_per_second"]),
        ("seconds per step", ["seconds", "data_wait_seconds"]),
    ]
    assert [p.title for p in panels_to_draw({"stage": rows}, ("loss", "MFU"))] == ["loss"]


def test_a_stage_draws_one_panel_row_per_metric_family(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", stage_rows(5, mfu=0.4, tokens_per_second=1e3))
    path = plot_stage(tmp_path)
    assert path == tmp_path / STAGE_PLOT and path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        # 8 inches wide; 1.8 + 1.8 per panel high (loss, learning rate, tokens/s, MFU), 100 dpi
        assert image.size == (800, round(100 * (1.8 + 1.8 * 4)))


def test_stages_back_to_back_share_the_panels(tmp_path):
    stages = {
        "stage1": write_metrics(tmp_path / "s1.jsonl", stage_rows(10)),
        "stage2": write_metrics(tmp_path / "s2.jsonl", stage_rows(5)),
    }
    path = plot_metrics(stages, tmp_path / "out" / "loss.png", panels=("loss", "learning rate"))
    with Image.open(path) as image:
        assert image.size == (800, round(100 * (1.8 + 1.8 * 2)))


def test_nothing_to_plot_is_an_error_naming_the_file(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [{"step": 1, "samples": 4}])
    with pytest.raises(ValueError, match="nothing to plot.*m.jsonl"):
        plot_metrics({"s": path}, tmp_path / "x.png")


def test_without_matplotlib_a_stage_says_how_to_get_its_plot(tmp_path, monkeypatch, caplog):
    write_metrics(tmp_path / "metrics.jsonl", stage_rows(2))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # imports as if not installed
    with pytest.raises(MissingPackageError, match=r"vlpretrain\[plots\]"):
        plot_stage(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlpretrain.plots"):
        assert plot_stage_or_say_how(tmp_path) is None
    [line] = [r.getMessage() for r in caplog.records if r.name == "vlpretrain.plots"]
    assert f"pip install 'vlpretrain[plots]', then `vlpretrain plot {tmp_path}`" in line
    assert not (tmp_path / STAGE_PLOT).exists()


def test_plot_command_draws_a_stage_or_says_what_is_missing(tmp_path, capsys):
    write_metrics(tmp_path / "run" / "metrics.jsonl", stage_rows(3))
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / STAGE_PLOT).is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / STAGE_PLOT)
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_every_panel_has_a_distinct_title():
    assert len({p.title for p in PANELS}) == len(PANELS)
