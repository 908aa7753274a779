"""output_dir/skipped.jsonl of a real run: every skipped record once, also across a crash.

The tiny training data holds one deliberately broken line per CorruptReason in every
annotation file (vlpretrain.testing.synthetic); a run lists the ones it consumed with file, line,
dataset, reason and detail; a run that crashes after logging skips of steps its last
checkpoint does not cover, then resumes, lists exactly what an uninterrupted run lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_fixtures import (
    one_thread,  # noqa: F401  (pytest fixture)
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    train_until_crash,
    write_stage,
)

from vlpretrain.cli import main
from vlpretrain.data.skips import ENTRY_KEYS, SKIP_LOG_NAME, SkipLog

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_skip_log_is_complete_and_survives_a_crash(train_assets, tmp_path, monkeypatch):  # noqa: F811
    n, save, crash_in = 6, 2, 4  # a checkpoint at step 2; the crash hits step 4
    straight = write_stage(
        tmp_path / "straight.toml",
        stage_raw(train_assets, tmp_path / "straight", stage="stage2", max_steps=n),
    )
    crashed_dir = tmp_path / "crashed"
    raw = stage_raw(train_assets, crashed_dir, stage="stage2", max_steps=n, save_steps=save)
    crashed = write_stage(tmp_path / "crashed.toml", raw)
    assert main(["train", str(straight)]) == 0
    expected = SkipLog(tmp_path / "straight" / SKIP_LOG_NAME).read()
    assert expected, "the tiny data should make the run skip records"
    corrupt = {(c.annotation, c.line): c.reason for c in train_assets.data.corrupt}
    for entry in expected:
        assert tuple(entry) == ENTRY_KEYS
        assert corrupt[(Path(entry["file"]).name, entry["line"])] == entry["reason"], entry
        assert entry["dataset"] in ("shapes_captions", "shapes_qa") and entry["detail"]
    assert len({(e["file"], e["line"]) for e in expected}) == len(expected)  # each once

    train_until_crash(crashed, crash_in, monkeypatch)
    before = SkipLog(crashed_dir / SKIP_LOG_NAME).read()
    assert before == [e for e in expected if e["step"] <= crash_in - 1]
    # step 3's skips are on disk but not covered by the step-2 checkpoint: the resumed run
    # redoes step 3 and must not list them twice
    assert any(e["step"] == 3 for e in before)
    assert main(["train", str(crashed)]) == 0  # resumes from step 2
    assert SkipLog(crashed_dir / SKIP_LOG_NAME).read() == expected
