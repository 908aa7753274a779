"""A resume lists and refuses changed config fields; metrics of redone steps are dropped; a
fresh start sets an earlier run aside."""

from __future__ import annotations

import json
import logging
import time

import pytest

from vlpretrain.config import ConfigError, build_run_config, to_dict, validate
from vlpretrain.log import MetricsWriter, truncate_metrics
from vlpretrain.train.checkpoint.resume import (
    changed_fields,
    check_config_on_resume,
    set_aside_previous_run,
)

MODEL = {"model_name_or_path": "stage1_out"}


def config_dict(**train) -> dict:
    return to_dict(build_run_config({"model": MODEL, "train": {"max_steps": 12, **train}}))


def test_changed_fields_are_listed_with_both_values():
    saved = config_dict()
    current = config_dict(max_steps=15, logging_steps=3)
    assert changed_fields(saved, current) == {
        "train.logging_steps": (1, 3),
        "train.max_steps": (12, 15),
    }
    assert changed_fields(saved, json.loads(json.dumps(saved))) == {}  # tuples vs JSON lists


def test_a_changed_field_is_refused_naming_it_and_the_way_out(tmp_path):
    with pytest.raises(ValueError) as error:
        check_config_on_resume(tmp_path, config_dict(), config_dict(max_steps=15), ())
    message = str(error.value)
    assert "train.max_steps: 12 -> 15" in message
    assert 'train.allow_changed_on_resume = ["train.max_steps"]' in message
    assert "train.resume = 'never'" in message


def test_operational_and_allowed_fields_may_change(tmp_path, caplog):
    saved = config_dict()
    check_config_on_resume(tmp_path, saved, config_dict(logging_steps=5, save_steps=7), ())
    with caplog.at_level(logging.WARNING):
        check_config_on_resume(tmp_path, saved, config_dict(max_steps=15), ["train.max_steps"])
    assert "train.max_steps" in caplog.text


def test_allow_changed_on_resume_names_real_fields(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    config = build_run_config(
        {
            "model": MODEL,
            "train": {"meta_path": str(meta), "allow_changed_on_resume": ["train.max_step"]},
        }
    )
    with pytest.raises(ConfigError, match="'train.max_step' is not a config field"):
        validate(config, 1)


def write_records(path, steps, torn=False):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in steps]
    path.write_text("\n".join(lines) + "\n" + ('{"step": 9, "lo' if torn else ""))


def test_metrics_of_redone_steps_and_a_torn_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [1, 2, 3, 4, 5], torn=True)
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_the_metrics_writer_continues_after_the_resumed_step(tmp_path):
    write_records(tmp_path / "metrics.jsonl", [1, 2, 3, 4])
    writer = MetricsWriter(tmp_path, start_step=2)
    writer.write(3, {"loss": 0.5})
    writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 0.5)]


def test_a_fresh_start_sets_the_earlier_run_aside(tmp_path):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    write_records(tmp_path / "metrics.jsonl", [1, 2])
    target = set_aside_previous_run(tmp_path, keep=1)
    assert target is not None and target.name.startswith("replaced-")
    assert (target / "checkpoints" / "step-00000004").is_dir()
    assert (target / "metrics.jsonl").is_file()
    assert not (tmp_path / "checkpoints").exists()
    assert set_aside_previous_run(tmp_path, keep=1) is None


EARLIER = ["replaced-20260101-000000", "replaced-20260102-000000", "replaced-20260102-000000-2"]


def plant_replaced_runs(output_dir):
    for name in EARLIER:
        (output_dir / name / "checkpoints" / "step-00000004").mkdir(parents=True)
    (output_dir / "unrelated-dir").mkdir()  # never touched
    (output_dir / "checkpoints" / "step-00000008").mkdir(parents=True)


@pytest.mark.parametrize("keep", [0, 1, 2, 5])
def test_a_fresh_start_keeps_only_the_newest_replaced_runs(tmp_path, keep):
    plant_replaced_runs(tmp_path)
    target = set_aside_previous_run(tmp_path, keep=keep)
    assert target is not None and target.name > EARLIER[-1]  # named by the time: newest
    # Newest first: the run just set aside, then the planted ones from the newest down.
    newest_first = [target.name, *reversed(EARLIER)][:keep]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*newest_first, "unrelated-dir"])
    if keep:
        assert (target / "checkpoints" / "step-00000008").is_dir()


def test_two_fresh_starts_within_a_second_keep_both(tmp_path, monkeypatch):
    fixed = time.struct_time((2026, 3, 4, 5, 6, 7, 2, 63, 0))
    monkeypatch.setattr(time, "gmtime", lambda *args: fixed)  # both starts in one second
    (tmp_path / "checkpoints").mkdir()
    first = set_aside_previous_run(tmp_path, keep=2)
    (tmp_path / "checkpoints").mkdir()
    second = set_aside_previous_run(tmp_path, keep=2)
    assert (first.name, second.name) == ("replaced-20260304-050607", "replaced-20260304-050607-2")
    assert first.is_dir() and second.is_dir()


def test_keep_replaced_runs_defaults_to_one_and_refuses_a_negative_count():
    assert build_run_config({"model": MODEL}).train.keep_replaced_runs == 1
    with pytest.raises(ConfigError, match="train.keep_replaced_runs must be >= 0, got -1"):
        build_run_config({"model": MODEL, "train": {"keep_replaced_runs": -1}})
