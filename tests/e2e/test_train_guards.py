"""`vlpretrain train` refuses to train on, resume from or export garbage: non-finite steps,
changed configs on resume, a second live run in the same output_dir."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (
    one_thread,  # noqa: F401  (pytest fixture)
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

import vlpretrain.train.loop as loop
from vlpretrain.cli import main
from vlpretrain.train.checkpoint.lock import LOCK_FILE, RunLockError, this_process
from vlpretrain.train.loop import FINAL_MARKER
from vlpretrain.train.nonfinite import NonFiniteError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONSTANT_LR = {"learning_rate": 2e-3, "warmup_steps": 0, "lr_scheduler_type": "constant"}


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """NaN pixel values in every micro-batch of the given (1-based) steps."""
    real, calls = loop.next_micro_batches, []

    def next_micro_batches(*args, **kwargs):
        calls.append(1)
        batches = real(*args, **kwargs)
        if len(calls) not in steps:
            return batches
        return [
            dataclasses.replace(b, pixel_values=torch.full(b.pixel_values.shape, float("nan")))
            for b in batches
        ]

    monkeypatch.setattr(loop, "next_micro_batches", next_micro_batches)


def test_a_nonfinite_step_is_skipped_and_leaves_the_weights_alone(
    train_assets,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,  # noqa: F811
):
    one = write_stage(
        tmp_path / "one.toml",
        stage_raw(train_assets, tmp_path / "one", max_steps=1, optim=CONSTANT_LR),
    )
    assert main(["train", str(one)]) == 0
    two = write_stage(
        tmp_path / "two.toml",
        stage_raw(train_assets, tmp_path / "two", max_steps=2, optim=CONSTANT_LR),
    )
    poison_steps(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(two)]) == 0
    # Step 2 was not applied: the weights are bit for bit those after step 1.
    first, second = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    final = json.loads((tmp_path / "two" / FINAL_MARKER).read_text())
    assert final["nonfinite_steps"] == 1
    warning = next(r.getMessage() for r in caplog.records if "not applied" in r.getMessage())
    assert "step 2 not applied" in warning and ".jsonl:" in warning  # the step's data, file:line
    losses = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert losses[0] == losses[0] and losses[1] != losses[1]  # step 2 logged its NaN loss


def test_consecutive_nonfinite_steps_stop_the_run_unfinished(
    train_assets,  # noqa: F811
    tmp_path,
    monkeypatch,  # noqa: F811
    capsys,
):
    raw = stage_raw(train_assets, tmp_path / "run", max_steps=6, train={"max_nonfinite_steps": 2})
    config = write_stage(tmp_path / "run.toml", raw)
    poison_steps(monkeypatch, {2, 3, 4, 5, 6})
    assert main(["train", str(config)]) == NonFiniteError.exit_code
    assert "2 consecutive steps (up to step 3)" in capsys.readouterr().err
    assert not (tmp_path / "run" / FINAL_MARKER).exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_finished_stage_summarises_itself_and_a_rerun_trains_nothing(
    train_assets,  # noqa: F811
    tmp_path,
    caplog,
):
    output_dir = tmp_path / "run"
    config = write_stage(tmp_path / "run.toml", stage_raw(train_assets, output_dir, max_steps=2))
    with caplog.at_level(logging.INFO, logger="vlpretrain"):
        assert main(["train", str(config)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    # the start says how many tiles an image may become (the meta file's max_dynamic_patch 6)
    tiles = "tiles: dataset 'shapes_captions': up to 7 tiles per image = 6 patches (the meta"
    assert tiles in "\n".join(messages)
    final = json.loads((output_dir / FINAL_MARKER).read_text())
    assert (final["step"], final["max_steps"], final["steps_this_run"]) == (2, 2, 2)
    assert final["export_dir"] == str(output_dir.resolve())
    assert final["next_model_name_or_path"] == str(output_dir)
    assert final["tokens_seen_all_ranks"] == final["tokens_seen"] > 0  # one rank
    assert final["wall_seconds"] > 0 and final["world_size"] == 1
    assert sum(final["skipped_all_ranks"].values()) == sum(final["skipped"].values())
    assert any(m.startswith("stage finished: 2 of 2 steps (2 in this run, ") for m in messages)
    assert f"exported to {output_dir.resolve()}" in messages
    assert f'next stage: model.model_name_or_path = "{output_dir}"' in messages
    assert read_metrics(output_dir)[-1]["peak_host_rss_gib"] > 0

    before = [(p.name, p.stat().st_mtime_ns) for p in sorted(output_dir.iterdir())]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlpretrain"):
        # logging_steps changes no step: the same stage, already finished
        assert main(["train", str(config), "--set", "train.logging_steps=5"]) == 0
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"{output_dir} already holds this stage, finished at step 2" in line
    assert "train.resume = 'never'" in line
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted(output_dir.iterdir())] == before


def test_a_resume_with_a_changed_config_is_refused_before_any_work(
    train_assets,  # noqa: F811
    tmp_path,
    capsys,
):
    raw = stage_raw(train_assets, tmp_path / "run", max_steps=2)
    config = write_stage(tmp_path / "run.toml", raw)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    # max_steps 2 -> 3 changes the LR schedule of the resumed steps (12 -> 15 would run at
    # lr 0.0): refused in one message naming the field and both values, not a traceback.
    assert main(["train", str(config), "--set", "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlpretrain: the configuration differs from the one that wrote")
    assert "train.max_steps: 2 -> 3" in err and "Traceback" not in err
    allowed = (
        "--set",
        "train.max_steps=3",
        "--set",
        'train.allow_changed_on_resume=["train.max_steps"]',
    )
    assert main(["train", str(config), *allowed]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_second_live_run_in_the_same_output_dir_is_refused(
    train_assets,  # noqa: F811
    tmp_path,
    capsys,
):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = replace(this_process(), pid=holder.pid, process_start=None)
        (output_dir / LOCK_FILE).write_text(json.dumps(asdict(live)))
        config = write_stage(tmp_path / "run.toml", stage_raw(train_assets, output_dir))
        assert main(["train", str(config)]) == RunLockError.exit_code
        assert f"in use by another run: pid {holder.pid}" in capsys.readouterr().err
        assert not (output_dir / "config.resolved.json").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the next run takes the lock over, trains, and releases it.
    assert main(["train", str(config), "--set", "train.max_steps=1"]) == 0
    assert not (output_dir / LOCK_FILE).exists()
