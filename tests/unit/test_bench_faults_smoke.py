"""bench/faults.py runs and prints its table: one fault class (--only) end to end, so the
harness keeps working as the code it exercises changes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_fault_harness_prints_its_table_for_one_class():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--only", "locks"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "| fault class | cases tried | recovered | clean error | silent-wrong | hang/blow-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    # 5 lock cases: a dead holder, a torn lock file and an unlocked foreign lock are taken
    # over (3); a live holder here and a foreign lock are refused by name (2)
    assert lines[2] == "| run locks | 5 | 3 | 2 | 0 | 0 |"
    assert re.fullmatch(r"\d+ s wall, \d+ s CPU \(this process and its subprocesses\)", lines[4])
    assert not [line for line in lines if line.startswith("unexpected:")], done.stdout
