"""One run per output_dir: the lock refuses a live holder, takes over from a dead one, and a
process whose lock was taken over stops before writing again."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from vlpretrain.cli import main
from vlpretrain.distributed.env import DistEnv
from vlpretrain.train.checkpoint.lock import (
    FOREIGN_STALE_SECONDS,
    LOCK_FILE,
    LOCK_LOST_EXIT,
    LockHolder,
    RunLockError,
    acquire,
    hold_run_lock,
    read_holder,
    this_process,
)

REPO = Path(__file__).resolve().parents[2]
ENV = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")


def plant(output_dir: Path, holder: LockHolder, age_seconds: float = 0.0) -> Path:
    path = output_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def other_process(alive: bool) -> tuple[LockHolder, subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = replace(this_process(), pid=process.pid, process_start=None)
    if not alive:
        process.kill()
        process.wait()
    return holder, process


def test_the_lock_names_pid_host_and_start_time(tmp_path):
    me = this_process()
    acquire(tmp_path, me)
    holder = read_holder(tmp_path / LOCK_FILE)
    assert holder == me
    assert holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert holder.started.endswith("Z") and holder.process_start is not None


def test_a_live_holder_is_refused_by_name(tmp_path):
    holder, process = other_process(alive=True)
    try:
        plant(tmp_path, holder)
        with pytest.raises(RunLockError, match=f"in use by another run: pid {process.pid} on"):
            acquire(tmp_path, this_process())
    finally:
        process.kill()
        process.wait()


def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    holder, _ = other_process(alive=False)
    plant(tmp_path, holder)
    me = this_process()
    with caplog.at_level(logging.WARNING):
        acquire(tmp_path, me)
    assert read_holder(tmp_path / LOCK_FILE) == me
    assert f"pid {holder.pid}" in caplog.text and "is gone" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_reused_pid_is_a_dead_holder(tmp_path):
    holder, process = other_process(alive=True)
    try:
        # Same pid as a live process, but that process started at another time: not the holder.
        plant(tmp_path, replace(holder, process_start=1))
        acquire(tmp_path, this_process())
    finally:
        process.kill()
        process.wait()


def test_a_holder_on_another_host_counts_as_alive_until_its_heartbeat_is_stale(tmp_path):
    foreign = replace(this_process(), host="some-other-node", pid=1)
    plant(tmp_path, foreign, age_seconds=60)
    with pytest.raises(RunLockError, match="some-other-node"):
        acquire(tmp_path, this_process())
    plant(tmp_path, foreign, age_seconds=FOREIGN_STALE_SECONDS + 60)
    acquire(tmp_path, this_process())


def test_a_foreign_lock_says_how_long_it_blocks_and_how_to_break_it(tmp_path):
    foreign = replace(this_process(), host="dead-node", pid=4242)
    path = plant(tmp_path, foreign, age_seconds=10 * 60)
    expires = path.stat().st_mtime + FOREIGN_STALE_SECONDS  # heartbeat + 30 min
    with pytest.raises(RunLockError) as error:
        acquire(tmp_path, this_process())
    message = str(error.value)
    assert "pid 4242 on dead-node" in message
    assert "blocks until its heartbeat is 30 min old" in message
    assert time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires)) in message
    assert "in 20 min" in message  # 30 min - 10 min since the heartbeat
    assert f"vlpretrain unlock {tmp_path}" in message


def test_unlock_removes_a_foreign_lock_and_says_what_it_removed(tmp_path, caplog, capsys):
    foreign = replace(this_process(), host="dead-node", pid=4242, started="2026-01-02T03:04:05Z")
    plant(tmp_path, foreign, age_seconds=5 * 60)
    with caplog.at_level(logging.WARNING):
        assert main(["unlock", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / LOCK_FILE).exists()
    for text in (printed, caplog.text):
        assert "pid 4242 on dead-node" in text and "started 2026-01-02T03:04:05Z" in text
        assert "last heartbeat 5 min ago" in text
    acquire(tmp_path, this_process())  # the next run takes it at once


def test_unlock_refuses_a_live_holder_on_this_host(tmp_path, capsys):
    holder, process = other_process(alive=True)
    try:
        plant(tmp_path, holder)
        assert main(["unlock", str(tmp_path)]) == 1
        assert f"pid {process.pid}" in capsys.readouterr().err
        assert read_holder(tmp_path / LOCK_FILE) == holder
    finally:
        process.kill()
        process.wait()


def test_unlock_without_a_lock_says_so(tmp_path, capsys):
    assert main(["unlock", str(tmp_path)]) == 0
    assert "no run lock" in capsys.readouterr().out


def test_a_torn_lock_file_of_a_crash_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"run_id": "ab')
    old = time.time() - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    acquire(tmp_path, this_process())


def test_hold_run_lock_releases_on_exit_and_on_error(tmp_path):
    with hold_run_lock(tmp_path, ENV) as holder:
        assert read_holder(tmp_path / LOCK_FILE) == holder
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(KeyError), hold_run_lock(tmp_path, ENV):
        raise KeyError("a stage that failed")
    assert not (tmp_path / LOCK_FILE).exists()


HOLDER_SCRIPT = """
import sys, time, torch
from pathlib import Path
from vlpretrain.cli import main
from vlpretrain.distributed.env import DistEnv
from vlpretrain.train.checkpoint.lock import hold_run_lock
out = Path(sys.argv[1])
with hold_run_lock(out, DistEnv(0, 0, 1, torch.device("cpu"), "gloo")):
    (out / "ready").touch()
    for i in range(600):
        with (out / "writes.txt").open("a") as f:
            f.write(f"{i}\\n")
        time.sleep(0.05)
"""


def test_a_run_whose_lock_was_taken_over_stops_writing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path)], env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    newcomer = replace(this_process(), run_id="new-run")
    (tmp_path / LOCK_FILE).write_text(json.dumps(asdict(newcomer)))  # as a takeover would
    taken_over = time.monotonic()
    assert process.wait(timeout=10) == LOCK_LOST_EXIT
    assert time.monotonic() - taken_over < 3.0  # heartbeat every 1 s
    writes = (tmp_path / "writes.txt").read_text()
    time.sleep(0.3)
    assert (tmp_path / "writes.txt").read_text() == writes  # nothing after it stopped
    assert read_holder(tmp_path / LOCK_FILE).run_id == "new-run"  # and it left the lock alone
