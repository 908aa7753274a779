"""Two gloo ranks under torchrun, preempted twice: SIGTERM to the launcher (torchrun forwards
it), then SIGUSR1 to the launcher and both ranks at once, as Slurm's --signal does (torchrun
does not handle SIGUSR1 and dies; its ranks save first). Each time both ranks save the step
in progress and exit with PREEMPTED_EXIT; the reruns lose no step and end equal to an
uninterrupted 2-rank run, bit for bit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import (
    cli_env,
    finish_process,
    free_port,
    last_logged_step,
    losses_by_step,
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

from vlpretrain.train.checkpoint.store import list_checkpoints
from vlpretrain.train.loop import FINAL_MARKER

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TIMEOUT = 300


def torchrun(config: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "vlpretrain", "train", str(config),
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=cli_env(deterministic=True), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> tuple[int, str]:
    return finish_process(process, TIMEOUT)


def ranks_of(launcher: int) -> list[int]:
    """Processes whose parent is the launcher (torchrun starts each rank in its own session,
    so a process-group signal does not reach them; Slurm signals every process of the job)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher:
                found.append(int(stat.parent.name))
    return found


def preempt(config: Path, output_dir: Path, signum: int, whole_job: bool) -> tuple[int, str]:
    """Start the job, send `signum` once it logged a new step, wait for its end."""
    already = last_logged_step(output_dir)
    launcher = torchrun(config)
    deadline = time.monotonic() + TIMEOUT
    while last_logged_step(output_dir) <= already:
        assert launcher.poll() is None, f"the job ended early: {finish(launcher)}"
        assert time.monotonic() < deadline, f"no new step within {TIMEOUT} s"
        time.sleep(0.02)
    targets = [launcher.pid, *ranks_of(launcher.pid)] if whole_job else [launcher.pid]
    assert len(targets) == (3 if whole_job else 1)
    for pid in targets:
        os.kill(pid, signum)
    return finish(launcher)


def test_preempted_ranks_save_the_step_and_the_rerun_equals_an_uninterrupted_run(
    train_assets,  # noqa: F811
    tmp_path,
):
    n = 7

    def stage(name: str) -> Path:
        raw = stage_raw(train_assets, tmp_path / name, stage="stage2", max_steps=n)
        return write_stage(tmp_path / f"{name}.toml", raw)

    reference, victim = stage("reference"), stage("victim")
    victim_dir = tmp_path / "victim"
    reference_run = torchrun(reference)
    stopped_at = []
    for signum, whole_job in ((signal.SIGTERM, False), (signal.SIGUSR1, True)):
        code, stderr = preempt(victim, victim_dir, signum, whole_job)
        name = signal.Signals(signum).name
        # torchrun answers SIGTERM with an error of its own and dies of SIGUSR1; the ranks'
        # exit code 124 is in its log
        assert code != 0, stderr[-6000:]
        assert stderr.count(f"received {name}: finishing this step") == 2, stderr[-6000:]
        step = last_logged_step(victim_dir)
        stopped_at.append(step)
        assert f"stopped on {name} at step {step} of {n}: saved " in stderr, stderr[-6000:]
        assert list_checkpoints(victim_dir)[-1][0] == step  # 0 steps lost
        assert not (victim_dir / FINAL_MARKER).exists()
    assert stopped_at[0] < stopped_at[1] < n, stopped_at

    code, stderr = finish(torchrun(victim))
    assert code == 0, stderr[-6000:]
    assert finish(reference_run)[0] == 0
    assert [r["step"] for r in read_metrics(victim_dir)] == list(range(1, n + 1))
    expected = losses_by_step(tmp_path / "reference")
    assert {s: repr(v) for s, v in losses_by_step(victim_dir).items()} == {
        s: repr(v) for s, v in expected.items()
    }
