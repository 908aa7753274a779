"""bench/stage_memory.py: the counted model states follow from the parameter counts and the
stage files' freeze policies, and the measured table runs end to end at tiny shapes on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from stage_memory import RECIPES, Counts, counted_stage, stage_file  # noqa: E402


def test_model_states_are_fp32_weights_plus_sixteen_bytes_per_trainable_parameter_sharded():
    counts = Counts(total=1000, trainable=100)
    assert counts.model_state_bytes(1) == 4 * 1000 + (4 + 4 + 8) * 100
    assert counts.model_state_bytes(8) == counts.model_state_bytes(1) / 8


def test_the_1b_stages_train_the_projector_then_the_vit_then_everything():
    shape = RECIPES["1B"]
    stage1, stage1_5, stage2 = (counted_stage(shape, stage_file("1B", s))
                                for s in ("stage1", "stage1_5", "stage2"))  # fmt: skip
    projector = 1024 * 4 * 2 + (1024 * 4) * 896 + 896 + 896 * 896 + 896  # LayerNorm, 2 linears
    vit = 304_012_288
    assert stage1.total == stage1_5.total == stage2.total
    assert stage1.trainable == projector
    assert stage1_5.trainable == projector + vit
    assert stage2.trainable == stage2.total


@pytest.mark.slow
def test_smoke_run_prints_the_counted_table_and_a_measured_stage():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stage_memory.py"), "--smoke", "--tokens", "128",
         "--tiles", "2", "--steps", "1", "--stages", "stage2"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("stage1", "stage1_5", "stage2"):
        assert re.search(rf"\| 8B \| {stage} \| .* GiB \| .* GiB \|", done.stdout), done.stdout
    measured = (
        r"^\| stage2 \| everything \| [\d.]+ GiB \| [\d.]+ GiB \| [\d.]+ GiB \| -?[\d.]+ GiB \|"
    )
    assert re.search(measured, done.stdout, re.MULTILINE), done.stdout
    assert not re.search(r"^\| stage1(_5)? \|", done.stdout, re.MULTILINE), "only --stages ran"
