"""bench/gpu.py runs end to end at its --smoke size on CPU (the GPU run uses the same code), as
it would on a bare CUDA machine; --only picks sections, a failing section is reported without
hiding the others, and bench/gpu_device.sh passes the benchmark's exit code on."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
BARE_MACHINE = ("av", "skimage", "matplotlib")
"""What the GPU machine lacks besides torchdata (which gpu_device.sh installs from wheels)."""


def run_bench(*args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # A module set to None in sys.modules fails to import: the bench runs as where it is absent.
    script = str(REPO / "bench" / "gpu.py")
    runner = (f"import runpy, sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
              f"sys.argv = ['gpu.py', *{args!r}]\n"
              f"runpy.run_path({script!r}, run_name='__main__')")  # fmt: skip
    return subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True,
                          env=ENV, timeout=600, check=False)  # fmt: skip


@pytest.mark.slow
def test_gpu_benchmark_smoke_prints_every_figure_without_the_bare_machines_missing_packages():
    done = run_bench("--smoke", blocked=BARE_MACHINE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for stage in ("stage1", "stage2"):
        assert re.search(rf"{stage} \(internvl2_5_1b_{stage}.toml\): .* bf16, fsdp .*attention "
                         r"torch_varlen_reference \(set in the config\)", out), out  # fmt: skip
        for mode in ("off", "on "):
            assert re.search(rf"{stage} checkpointing {mode}: step [\d.]+ s .* tokens/s, "
                             r"[\d.]+ tiles/s, MFU [\d.]+ \(ViT [\d.]+ \+ LLM [\d.]+\), "
                             r"peak memory [\d.]+ GiB", out), out  # fmt: skip
        assert re.search(rf"{stage} packed vs per-sample loss sum \(torch_varlen_reference, bf16\)"
                         r": .* over [2-9]\d* samples, .*\(equal:", out), out  # fmt: skip
    assert re.search(r"attention fwd\+bwd, one layer \(12 query / 2 key-value heads, dim 128\), "
                     r".*torch_varlen_reference via varlen_call [\d.]+ ms", out), out  # fmt: skip
    assert re.search(r"loader tiles/s on synthetic scene JPEGs .*: 0 workers [\d.]+, 1 workers "
                     r"[\d.]+", out), out  # fmt: skip
    assert re.fullmatch(r"MFU \d\.\d\d \(target 0\.45\)", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_only_runs_the_named_sections_and_a_failing_section_does_not_hide_the_others():
    done = run_bench("--smoke", "--only", "attention,gemm", "--fail-section", "gemm")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "gemm failed: RuntimeError: failure requested by --fail-section gemm" in lines
    assert "    RuntimeError: failure requested by --fail-section gemm" in lines  # traceback tail
    assert any(line.startswith("attention fwd+bwd") for line in lines), lines  # runs after it
    assert not any(line.startswith(("stage1", "stage2", "loader", "MFU")) for line in lines)
    assert lines[-1] == "sections failed: gemm"


@pytest.mark.slow
def test_device_script_without_wheels_says_so_keeps_the_report_and_passes_the_exit_code_on(
    tmp_path,
):
    out = tmp_path / "out"
    env = {**ENV, "PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "no_wheels")}
    done = subprocess.run(
        [str(REPO / "bench" / "gpu_device.sh"), str(out), "--smoke", "--only", "gemm",
         "--fail-section", "gemm"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no wheels in" in done.stdout and "skipping the install" in done.stdout
    assert "no CUDA device visible to torch" in (out / "device.txt").read_text()
    report = (out / "gpu_report.txt").read_text()
    assert "gemm failed: RuntimeError" in report and report.endswith("sections failed: gemm\n")
