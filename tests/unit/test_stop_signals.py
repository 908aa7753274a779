"""Preemption signals ask for a clean stop; a repeat from the launcher is the same request; a
later signal or the end of the grace period exits at once; a stalled loader ends the process
with its stack and a line naming the wait (and torchrun's error file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch.utils.data
from train_fixtures import cli_env

from vlpretrain.distributed.env import STALL_EXIT
from vlpretrain.train.preemption import (
    DUPLICATE_SECONDS,
    catch_stop_signals,
    keep_worker_through_stop_signals,
)


def wait_until(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_signal_requests_a_stop_and_its_quick_repeat_is_the_same_request():
    before = signal.getsignal(signal.SIGUSR1)
    with catch_stop_signals(["SIGUSR1"], grace_seconds=60) as request:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_until(lambda: request.requested)
        # torchrun forwards what the scheduler already sent to every process: still alive
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        assert request.signal_name == "SIGUSR1"
        assert request.agreed(world_size=1)
    assert signal.getsignal(signal.SIGUSR1) == before  # restored for whatever runs next


def test_signals_not_listed_keep_their_usual_effect():
    with catch_stop_signals([], grace_seconds=60) as request:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert not request.requested


class Counting(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10**9))


def test_a_loader_worker_ignores_another_process_sigterm_and_ends_on_the_loader_own():
    # a launcher signalling the process group reaches the workers too; the parent still
    # needs them to fetch the batches of the step it saves
    with catch_stop_signals(["SIGTERM"], grace_seconds=60):
        loader = torch.utils.data.DataLoader(
            Counting(), batch_size=None, num_workers=1,
            worker_init_fn=keep_worker_through_stop_signals,
        )  # fmt: skip
        batches = iter(loader)
        assert next(batches) == 0
        (worker,) = batches._workers
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another sender
        time.sleep(0.3)
        assert worker.is_alive()
        assert [int(next(batches)) for _ in range(3)] == [1, 2, 3]
        worker.terminate()  # the DataLoader's way to end a worker that does not stop
        worker.join(timeout=10)
        assert worker.exitcode == 0  # as torch's own handler exits on its parent's SIGTERM
        del batches


def run_script(source: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr


SECOND_SIGNAL = f"""
import os, signal, time
from vlpretrain.train.preemption import catch_stop_signals
with catch_stop_signals(["SIGTERM"], grace_seconds=60) as request:
    os.kill(os.getpid(), signal.SIGTERM)
    while not request.requested:
        time.sleep(0.01)
    time.sleep({DUPLICATE_SECONDS} + 0.3)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_a_second_signal_after_the_first_exits_at_once():
    started = time.monotonic()
    code, stderr = run_script(SECOND_SIGNAL)
    assert code == 128 + signal.SIGTERM  # 143: as a death by SIGTERM reads
    assert "received SIGTERM again while stopping; exiting at once without a checkpoint" in stderr
    assert time.monotonic() - started < 25  # not the 30 s sleep


GRACE_ENDS = """
import os, signal, time
from vlpretrain.train.preemption import catch_stop_signals
with catch_stop_signals(["SIGUSR1"], grace_seconds=0.5) as request:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(30)  # a step that never finishes
"""


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_no_checkpoint_within_the_grace_period_exits_at_once():
    started = time.monotonic()
    code, stderr = run_script(GRACE_ENDS)
    assert code == 128 + signal.SIGUSR1  # 138
    assert "no checkpoint within 0.5 s of SIGUSR1; exiting at once" in stderr
    assert "received SIGUSR1: finishing this step, then saving a checkpoint" in stderr
    assert time.monotonic() - started < 25


STALLED_LOADER = """
import threading
from vlpretrain.distributed.env import arm_stack_dump

def read_that_never_returns():
    threading.Event().wait()

arm_stack_dump(0.5, waiting_for="while waiting for the next micro-batch from the data loader")
read_that_never_returns()
"""


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_a_stalled_wait_ends_the_process_with_its_stack_and_torchruns_error_file(tmp_path):
    error_file = tmp_path / "error.json"
    env = {**cli_env(), "TORCHELASTIC_ERROR_FILE": str(error_file)}
    code, stderr = run_script(STALLED_LOADER, env)
    assert code == STALL_EXIT
    line = (
        "vlpretrain rank 0: stalled: no progress for 0.5 s (the collective timeout) while "
        "waiting for the next micro-batch from the data loader"
    )
    assert line in stderr
    assert "in read_that_never_returns" in stderr  # every thread's stack, the main one too
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"].startswith(line)
    assert "read_that_never_returns" in recorded["extraInfo"]["py_callstack"]
