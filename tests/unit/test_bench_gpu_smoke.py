"""bench/gpu.py runs end to end at its --smoke size on CPU (the GPU run uses the same code)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_prints_every_figure():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "attention sdpa (auto on cpu" in out
    for stage in ("stage1", "stage2"):
        for mode in ("off", "on "):
            assert re.search(rf"{stage} checkpointing {mode}: step [\d.]+ s .* MFU [\d.]+ "
                             r"\(ViT [\d.]+ \+ LLM [\d.]+\), peak memory", out), out  # fmt: skip
    assert re.search(r"packed vs per-sample loss sum .* over [2-9]\d* samples, .*\(equal", out), out
    assert re.search(r"loader tiles/s on real JPEGs .*: 0 workers [\d.]+, 1 workers [\d.]+", out)
    assert re.fullmatch(r"MFU \d\.\d\d \(target 0\.45\)", out.strip().splitlines()[-1])
