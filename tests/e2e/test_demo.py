"""`vlpretrain demo` end to end on a short run: every report exists, and stage 2 reads images.

The short run trains each stage for a few dozen steps on small components; that is enough
for the invariant that matters (stage 2 answers held-out questions better than the best
image-blind guesser, and worse when its images are blanked) without pinning any timing.
"""

from __future__ import annotations

import json

import pytest

from vlpretrain.cli import main

pytestmark = pytest.mark.slow


def test_demo_short_run_reports_and_stage2_beats_the_blind_baseline(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(
        ["demo", "--output", str(output), "--max-steps", "40", "--pretrain-steps", "60",
         "--eval-limit", "60"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    rows = {row["stage"]: row for row in summary["stages"]}
    assert list(rows) == ["untrained", "stage1", "stage1_5", "stage2", "stage2, blank image",
                          "image-blind (majority per type)"]  # fmt: skip
    for name in ("stage1", "stage1_5", "stage2"):
        assert rows[name]["num_steps"] == 40
        assert rows[name]["final_loss"] > 0
        assert set(rows[name]["caption_by_attribute"]) == {"colour", "shape", "count", "position"}
    # Stage 1 trains only the projector; stage 2 trains everything.
    assert rows["stage1"]["num_trainable_params"] < rows["stage2"]["num_trainable_params"]

    def qa(name: str) -> float:
        by_type = rows[name]["qa_by_type"]
        assert len(by_type) == 6
        return sum(by_type.values()) / len(by_type)

    blind = qa("image-blind (majority per type)")
    assert qa("stage2") > blind + 0.05
    assert qa("stage2, blank image") < qa("stage2")
    for name in ("loss_curves.png", "accuracy.png", "samples.html"):
        assert (output / name).stat().st_size > 0
    assert "<img src='data:image/png;base64," in (output / "samples.html").read_text()
    out = capsys.readouterr().out
    assert "caption acc" in out and "QA accuracy per question type" in out
    # The planted bad records are caught by the data check and reported with their reasons.
    assert "malformed_json" in out and "corrupt_image" in out
