"""`vlpretrain demo` end to end at toy step counts: report, plots and chained stages exist."""

from __future__ import annotations

import json

import pytest

from vlpretrain.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_all_stages_and_reports(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(
        ["demo", "--output", str(output), "--max-steps", "2", "--pretrain-steps", "3",
         "--eval-limit", "4"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    stages = [row["stage"] for row in summary["stages"]]
    assert stages == ["untrained", "stage1", "stage1_5", "stage2"]
    for row in summary["stages"][1:]:
        assert row["num_steps"] == 2
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert row["final_loss"] > 0
    # Stage 1 trains only the projector; stage 2 trains everything.
    assert (
        summary["stages"][1]["num_trainable_params"] < summary["stages"][3]["num_trainable_params"]
    )
    assert (output / "loss_curves.png").stat().st_size > 0
    assert (output / "accuracy.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "eval acc" in out
    # The planted bad records are caught by the data check and reported with their reasons.
    assert "malformed_json" in out and "corrupt_image" in out
