"""The time left to max_steps: from this process's recent steps (its first, start-up step only
until another is timed), shown in the progress line and written to metrics.jsonl."""

from __future__ import annotations

import json
import logging

import pytest

from vlpretrain.log import MetricsWriter, format_duration
from vlpretrain.train.eta import EtaClock


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_resumed_run_counts_only_its_own_steps_and_not_its_start_up():
    time = FakeTime()
    clock = EtaClock(max_steps=100, window=3, now=time)  # resumed at step 90
    time.now += 30.0  # step 91: loader start-up, compilation
    assert clock.tick(91) == pytest.approx(30.0 * 9)  # the only step timed so far
    time.now += 2.0
    assert clock.tick(92) == pytest.approx(2.0 * 8)  # the start-up step no longer counts
    for step, seconds in ((93, 4.0), (94, 3.0)):
        time.now += seconds
        clock.tick(step)
    time.now += 5.0
    # the last 3 steps (window 3): (4 + 3 + 5) / 3 = 4 s each, 5 steps left
    assert clock.tick(95) == pytest.approx(4.0 * 5)


def test_the_last_step_has_nothing_left():
    time = FakeTime()
    clock = EtaClock(max_steps=2, now=time)
    time.now += 1.0
    clock.tick(1)
    time.now += 1.0
    assert clock.tick(2) == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (90000, "25:00:00")],
)
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_the_progress_line_shows_the_time_left_and_metrics_keep_seconds(tmp_path, caplog):
    writer = MetricsWriter(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlpretrain.metrics"):
        writer.write(7, {"loss": 0.5, "eta_seconds": 3725.0}, ("loss", "eta_seconds"))
    assert "step 7 | loss 0.5000 | eta 1:02:05" in caplog.text
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record == {"step": 7, "loss": 0.5, "eta_seconds": 3725.0}
