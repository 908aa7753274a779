"""Ranks agree or stop: different settings are one clear error on every rank, a rank left
waiting dumps its stack and times out in seconds (as configured), a rank whose loader yields
nothing ends the job as its root cause, and ranks whose torchrun launcher was killed stop
instead of training on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import (
    cli_env,
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

from vlpretrain.distributed.env import STALL_EXIT

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_script(tmp_path: Path, source: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(source)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{process.args} did not finish within {TIMEOUT} s")
    return process.returncode, output


DISAGREE = """
from vlpretrain.distributed.env import check_ranks_agree, init_distributed
env = init_distributed()
facts = {"config.train.max_steps": 5 if env.rank == 0 else 8, "config.stream.seed": 0}
try:
    check_ranks_agree(facts)
except ValueError as error:
    print(f"rank {env.rank} refused: {error}", flush=True)
    raise SystemExit(3)
"""


def test_ranks_with_different_settings_stop_with_the_differing_keys(tmp_path):
    code, output = finish(torchrun_script(tmp_path, DISAGREE))
    assert code != 0
    for rank in (0, 1):
        assert f"rank {rank} refused: the ranks of this job were started with different" in output
    assert "config.train.max_steps: rank 0 has 5, rank 1 has 8" in output
    assert "config.stream.seed" not in output.split("refused:")[1]  # only the differing key


WAIT_ALONE = """
import time, torch
from vlpretrain.distributed.env import all_reduce_sum, arm_stack_dump, init_distributed
env = init_distributed(timeout_minutes=0.1)  # 6 s
start = time.monotonic()
if env.rank == 1:
    arm_stack_dump(2.0)
    try:
        all_reduce_sum(torch.ones(1))  # rank 0 never joins
    except Exception as error:
        print(f"rank 1 gave up after {time.monotonic() - start:.0f} s: {type(error).__name__}",
              flush=True)
        raise SystemExit(4)
else:
    time.sleep(30)
"""


def test_a_waiting_rank_dumps_its_stack_and_times_out_as_configured(tmp_path):
    started = time.monotonic()
    code, output = finish(torchrun_script(tmp_path, WAIT_ALONE))
    assert code != 0
    assert "Timeout (0:00:02)!" in output  # faulthandler: every thread's stack ...
    assert "in all_reduce_sum" in output  # ... showing where rank 1 waits
    assert "rank 1 gave up after" in output
    gave_up = int(output.split("rank 1 gave up after ")[1].split(" s")[0])
    assert 4 <= gave_up <= 20, output  # the 6 s timeout, not torch's 30 minutes
    assert time.monotonic() - started < TIMEOUT


STALLING_RANK = """
import os, sys, threading
from unittest import mock
import vlpretrain.train.loop as loop
from vlpretrain.cli import main

real, calls = loop.next_micro_batches, []

def stalls_on_rank_1_in_step_two(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        threading.Event().wait()  # a read on a dead mount: never returns
    return real(*args, **kwargs)

with mock.patch.object(loop, "next_micro_batches", stalls_on_rank_1_in_step_two):
    sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_rank_whose_loader_stalls_ends_the_job_as_its_root_cause(
    train_assets,  # noqa: F811
    tmp_path,
):
    # Rank 0 waits in the step's first all-reduce meanwhile; its timeout is as long, but the
    # stalled rank's exit ends that wait first, and torchrun names the stalled rank.
    raw = stage_raw(train_assets, tmp_path / "run", stage="stage2", max_steps=4)
    raw["train"]["collective_timeout_minutes"] = 0.25  # 15 s
    config = write_stage(tmp_path / "run.toml", raw)
    code, output = finish(torchrun_script(tmp_path, STALLING_RANK, str(config)))
    assert code != 0
    stalled = (
        "vlpretrain rank 1: stalled: no progress for 15 s (the collective timeout) while "
        "waiting for the next micro-batch from the data loader"
    )
    assert stalled in output, output[-6000:]
    assert "in stalls_on_rank_1_in_step_two" in output  # its stack shows the wait
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, root_cause
    assert f"exitcode  : {STALL_EXIT}" in root_cause, root_cause
    assert stalled in root_cause, root_cause
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


TRAIN_FOREVER = """
import os, sys, time
from pathlib import Path
from vlpretrain.distributed.env import init_distributed
env = init_distributed()
out = Path(sys.argv[1])
(out / f"rank{env.rank}.pid").write_text(str(os.getpid()))
while True:
    with (out / f"rank{env.rank}.log").open("a") as handle:
        handle.write(f"{time.time()}\\n")
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_ranks_stop_within_seconds_when_the_launcher_is_killed(tmp_path):
    launcher = torchrun_script(tmp_path, TRAIN_FOREVER, str(tmp_path))
    deadline = time.monotonic() + TIMEOUT
    pids_files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    while not all(p.exists() and p.read_text() for p in pids_files):
        assert launcher.poll() is None, launcher.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in pids_files]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    while any(alive(pid) for pid in pids):
        assert time.monotonic() - killed < 10, "rank processes outlived their launcher"
        time.sleep(0.1)
    stopped = time.monotonic() - killed
    sizes = [(tmp_path / f"rank{r}.log").stat().st_size for r in (0, 1)]
    time.sleep(0.5)
    assert sizes == [(tmp_path / f"rank{r}.log").stat().st_size for r in (0, 1)]
    assert stopped < 5.0


STOPPING_RANKS = """
import os, sys, time
from pathlib import Path
from vlpretrain.distributed.env import finish_after_launcher_death, init_distributed
env = init_distributed()
out = Path(sys.argv[1])
finish_after_launcher_death(60)  # what a preemption signal does
(out / f"rank{env.rank}.pid").write_text(str(os.getpid()))
while not (out / "launcher-killed").exists():
    time.sleep(0.05)
time.sleep(3)  # the rest of the checkpoint: longer than the watch's 1 s poll
(out / f"rank{env.rank}.saved").write_text("saved")
"""


def test_stopping_ranks_finish_their_checkpoint_when_the_launcher_dies(tmp_path):
    # Slurm's SIGUSR1 reaches torchrun too, which dies of it; its ranks must still save.
    launcher = torchrun_script(tmp_path, STOPPING_RANKS, str(tmp_path))
    deadline = time.monotonic() + TIMEOUT
    pids_files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    while not all(p.exists() and p.read_text() for p in pids_files):
        assert launcher.poll() is None, launcher.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    (tmp_path / "launcher-killed").touch()
    output, _ = launcher.communicate(timeout=TIMEOUT)  # the ranks hold the pipe until they end
    assert [(tmp_path / f"rank{r}.saved").exists() for r in (0, 1)] == [True, True], output
    assert output.count("died while this rank is stopping; it saves its checkpoint first") == 2
