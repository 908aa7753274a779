"""Run every benchmark in this folder, one after another (`make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = (
    "packing.py",
    "samples.py",
    "remote_reads.py",
    "step.py",
    "checkpoint_memory.py",
    "fsdp_memory.py",
    "stage_memory.py",
    "balance.py",
    "optimizer_step.py",
    "checkpoint_save.py",
    "faults.py",
)

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    failed = 0
    for name in BENCHES:
        print(f"== bench/{name}", flush=True)
        failed |= subprocess.call([sys.executable, str(here / name)])
    raise SystemExit(failed)
