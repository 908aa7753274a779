"""`vlpretrain train` on one rank under a scheduler: a preemption signal (SIGUSR1, SIGTERM,
Ctrl-C's SIGINT) saves the step in progress and exits with PREEMPTED_EXIT, so the rerun loses
no step and equals an uninterrupted run; a loader that yields nothing ends the run.

The runs use two loader workers, and the signals reach them too, as they do under Slurm (every
process of the job), under a launcher that signals its process group (SIGTERM) and in a
terminal (Ctrl-C signals the foreground process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_fixtures import (
    cli_command,
    cli_env,
    finish_process,
    last_logged_step,
    losses_by_step,
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

from vlpretrain.distributed.env import STALL_EXIT
from vlpretrain.train.checkpoint.store import list_checkpoints
from vlpretrain.train.loop import FINAL_MARKER
from vlpretrain.train.preemption import PREEMPTED_EXIT

pytestmark = [pytest.mark.slow]

TIMEOUT = 300


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command("train", str(config)),
        env=cli_env(deterministic=True),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job in a terminal
    )


def children(pid: int) -> list[int]:
    """The processes `pid` started (its data-loader workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def deliver(process: subprocess.Popen, signum: int) -> None:
    """SIGINT as Ctrl-C sends it and SIGTERM as a launcher stopping its job does (the process
    group, loader workers included); SIGUSR1 as Slurm does (every process, one by one)."""
    if signum in (signal.SIGINT, signal.SIGTERM):
        os.killpg(process.pid, signum)
        return
    workers = children(process.pid)
    assert len(workers) == 2, workers
    for pid in [process.pid, *workers]:
        os.kill(pid, signum)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    return finish_process(process, TIMEOUT)


def signal_after_step(config: Path, output_dir: Path, step: int, signum: int) -> tuple[int, str]:
    """Start the run, send `signum` once it logged `step`, wait for its end."""
    process = start(config)
    deadline = time.monotonic() + TIMEOUT
    while last_logged_step(output_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {finish(process)}"
        assert time.monotonic() < deadline, f"step {step} not reached within {TIMEOUT} s"
        time.sleep(0.02)
    deliver(process, signum)
    return finish(process)


def test_preemption_signals_save_the_step_and_the_rerun_equals_an_uninterrupted_run(
    train_assets,  # noqa: F811
    tmp_path,
):
    n = 7

    def stage(name: str) -> Path:
        # save_steps 100: without a clean stop every step of these runs would be lost
        raw = stage_raw(train_assets, tmp_path / name, stage="stage2", max_steps=n)
        raw["stream"] = {"num_workers": 2}
        return write_stage(tmp_path / f"{name}.toml", raw)

    reference, victim = stage("reference"), stage("victim")
    victim_dir = tmp_path / "victim"
    reference_run = start(reference)
    stopped_at = []
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        already = last_logged_step(victim_dir)
        code, stderr = signal_after_step(victim, victim_dir, already + 1, signum)
        assert code == PREEMPTED_EXIT, stderr[-4000:]
        name = signal.Signals(signum).name
        assert f"received {name}: finishing this step, then saving a checkpoint" in stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
        step = last_logged_step(victim_dir)
        stopped_at.append(step)
        # 0 steps lost: the checkpoint is the last step the run logged
        assert f"stopped on {name} at step {step} of {n}: saved " in stderr
        assert list_checkpoints(victim_dir)[-1][0] == step
        assert not (victim_dir / FINAL_MARKER).exists()
    assert stopped_at[0] < stopped_at[1] < stopped_at[2] < n, stopped_at
    code, stderr = finish(start(victim))
    assert code == 0, stderr[-4000:]
    assert finish(reference_run)[0] == 0

    # every step logged once (nothing redone), each loss bit for bit the uninterrupted one's
    assert [r["step"] for r in read_metrics(victim_dir)] == list(range(1, n + 1))
    expected = losses_by_step(tmp_path / "reference")
    assert {s: repr(v) for s, v in losses_by_step(victim_dir).items()} == {
        s: repr(v) for s, v in expected.items()
    }
    assert (victim_dir / FINAL_MARKER).is_file()


STALLING_RUN = """
import sys, threading
from unittest import mock
import vlpretrain.train.loop as loop
from vlpretrain.cli import main

real, calls = loop.next_micro_batches, []

def stalls_in_step_two(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        threading.Event().wait()  # a read on a dead mount: never returns
    return real(*args, **kwargs)

with mock.patch.object(loop, "next_micro_batches", stalls_in_step_two):
    sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_loader_that_yields_nothing_ends_a_one_rank_run_naming_the_loader(
    train_assets,  # noqa: F811
    tmp_path,
):
    raw = stage_raw(train_assets, tmp_path / "run", stage="stage2", max_steps=4)
    raw["train"]["collective_timeout_minutes"] = 0.05  # 3 s
    config = write_stage(tmp_path / "run.toml", raw)
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STALLING_RUN), str(config)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, stderr = finish(process)
    assert code == STALL_EXIT, stderr[-4000:]
    assert (
        "stalled: no progress for 3 s (the collective timeout) while waiting for the next "
        "micro-batch from the data loader" in stderr
    )
    assert "in stalls_in_step_two" in stderr  # the stack shows where it waits
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
