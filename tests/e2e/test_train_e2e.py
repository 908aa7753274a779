"""`vlpretrain train` end to end on the tiny model: golden losses, exact resume, kill and
resume, stage chaining.

Golden files: tests/assets/golden_loss_tiny_cpu.txt (5 stage-2 steps, two processes at once)
and tests/assets/golden_loss_chain_cpu.txt (12 stage-1 steps on Path B, then 12 stage-2 steps
from stage 1's export). Regenerate them after an intended numeric change with

    VLPRETRAIN_UPDATE_GOLDEN=1 VLPRETRAIN_GOLDEN_REASON="why" .venv/bin/pytest \
        tests/e2e/test_train_e2e.py -k golden

and commit it together with the change, so the diff shows what moved.

Within a machine the losses repeat bit for bit (two processes at once, same losses). Across
machines the deterministic environment pins ATen's and oneDNN's kernels, but not everything
under them (glibc picks its own exp/log per CPU): one loss of the chain's 24 came out 2.3e-7
apart (relative) on an AVX-512 Xeon from the file made elsewhere. The files are therefore
matched to GOLDEN_RELATIVE_TOLERANCE, a few float32 ulps' worth of agreement a real numeric
change (a wrong mask, a lost token, another lr) would break by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (
    DETERMINISTIC_ENV,
    REPO,
    TILE,
    cli_command,
    cli_env,
    losses_by_step,
    one_thread,  # noqa: F401  (pytest fixture)
    read_metrics,
    run_cli,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    train_until_crash,
    write_stage,
)

from vlpretrain.cli import main
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.checkpoint.store import latest_checkpoint, list_checkpoints
from vlpretrain.train.loop import FINAL_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

GOLDEN = REPO / "tests" / "assets" / "golden_loss_tiny_cpu.txt"
GOLDEN_STEPS = 5
GOLDEN_CHAIN = REPO / "tests" / "assets" / "golden_loss_chain_cpu.txt"
CHAIN_STEPS = {"stage1": 12, "stage2": 12}
"""Steps of each stage of the golden chain (24 in all)."""
UPDATE_GOLDEN = os.environ.get("VLPRETRAIN_UPDATE_GOLDEN") == "1"
GOLDEN_RELATIVE_TOLERANCE = 1e-5
"""How far a loss may sit from its golden value across machines (module docstring)."""


def assert_matches_golden(losses: list[float], golden: list[float], what: str) -> None:
    """Same number of losses, each within GOLDEN_RELATIVE_TOLERANCE of the file's."""
    assert len(losses) == len(golden), f"{what}: {len(losses)} losses, the file has {len(golden)}"
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, golden, strict=True))
    assert worst <= GOLDEN_RELATIVE_TOLERANCE, (
        f"{what} no longer reproduces the golden losses (worst relative gap {worst:.2e}):\n"
        + "\n".join(f"  step {k + 1}: {a!r} vs golden {b!r}"
                     for k, (a, b) in enumerate(zip(losses, golden, strict=True)))
        + "\nif the change is intended, regenerate with VLPRETRAIN_UPDATE_GOLDEN=1 and give a "
        "reason (module docstring)"
    )  # fmt: skip


def golden_config(train_assets, output_dir: Path) -> dict:  # noqa: F811
    # Stage-2 settings (everything trains) so the golden covers the ViT, projector and LLM
    # backward and the QA mixture (multi-image, pure-text rows with a dummy tile).
    return stage_raw(train_assets, output_dir, stage="stage2", max_steps=GOLDEN_STEPS)


def start(config_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command("train", str(config_path), *extra),
        env=cli_env(deterministic=True),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ok(process: subprocess.Popen, timeout: float = 300) -> None:
    _, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        pytest.fail(f"{' '.join(process.args)} exited {process.returncode}:\n{stderr[-4000:]}")


def read_golden() -> list[float]:
    lines = GOLDEN.read_text().splitlines()
    return [float(line) for line in lines if line.strip() and not line.startswith("#")]


def golden_header(what: str, run: str, default_reason: str) -> list[str]:
    """Comment lines of a golden file: what it holds, how to regenerate it, and why it changed."""
    reason = os.environ.get("VLPRETRAIN_GOLDEN_REASON", default_reason)
    return [
        f"# {what}",
        "# Command: VLPRETRAIN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/e2e/test_train_e2e.py "
        "-k golden",
        f"#   = {run},",
        "#     build_train_assets() data and components (seed 0), env "
        + " ".join(f"{k}={v}" for k, v in DETERMINISTIC_ENV.items()),
        f"# Reason: {reason}",
    ]


def write_golden(losses: list[float]) -> None:
    header = golden_header(
        "Loss of each step of the tiny CPU fp32 run, one per line (repr precision).",
        "vlpretrain train STAGE.toml with tests/train_fixtures.py stage_raw(stage='stage2', "
        f"max_steps={GOLDEN_STEPS})",
        "initial golden of the tiny stage-2 run",
    )
    GOLDEN.write_text("\n".join([*header, *(repr(x) for x in losses)]) + "\n")


def test_golden_losses_are_deterministic_and_match_the_file(train_assets, tmp_path):  # noqa: F811
    paths = []
    for name in ("first", "second"):
        paths.append(
            write_stage(tmp_path / f"{name}.toml", golden_config(train_assets, tmp_path / name))
        )
    # Two independent processes at once (one thread each): same losses, bit for bit.
    wait_all = [start(path) for path in paths]
    for process in wait_all:
        wait_ok(process)
    first, second = (losses_by_step(tmp_path / name) for name in ("first", "second"))
    assert list(first) == list(range(1, GOLDEN_STEPS + 1))
    assert first == second
    for record in read_metrics(tmp_path / "first"):  # data wait is its own figure, within a step
        assert 0 <= record["data_wait_seconds"] <= record["seconds"], record
        assert record["tokens_per_second"] > 0 and record["tiles_per_second"] > 0, record
        assert "mfu" not in record, record  # a CPU has no peak unless train.peak_tflops is set
    losses = [first[step] for step in sorted(first)]
    if UPDATE_GOLDEN:
        write_golden(losses)
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; create it with VLPRETRAIN_UPDATE_GOLDEN=1"
    assert_matches_golden(losses, read_golden(), "the tiny run")


def chain_configs(train_assets, root: Path) -> list[dict]:  # noqa: F811
    """Stage 1 (Path B, projector only, captions), then stage 2 (Path A from stage 1's export,
    everything trains, the QA mixture)."""
    stage1 = stage_raw(train_assets, root / "stage1", max_steps=CHAIN_STEPS["stage1"])
    stage2 = stage_raw(
        train_assets,
        root / "stage2",
        stage="stage2",
        max_steps=CHAIN_STEPS["stage2"],
        model={"model_name_or_path": str(root / "stage1")},
    )
    del stage2["model"]["vision_path"], stage2["model"]["llm_path"]
    del stage2["model"]["force_image_size"]  # the checkpoint's
    return [stage1, stage2]


def write_chain_golden(lines: list[str]) -> None:
    header = golden_header(
        "Loss of each step of a stage-1 -> stage-2 chain of the tiny CPU fp32 model, one "
        "'stage step loss' per line (repr precision).",
        "vlpretrain train on each of tests/e2e/test_train_e2e.py chain_configs(): stage_raw("
        f"max_steps={CHAIN_STEPS['stage1']}), then stage_raw(stage='stage2', "
        f"max_steps={CHAIN_STEPS['stage2']}) from stage 1's output",
        "initial golden of the tiny chain",
    )
    GOLDEN_CHAIN.write_text("\n".join([*header, *lines]) + "\n")


def read_chain_golden() -> list[str]:
    lines = GOLDEN_CHAIN.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_golden_chain_stage1_to_stage2_matches_the_file(train_assets, tmp_path):  # noqa: F811
    lines = []
    for name, raw in zip(CHAIN_STEPS, chain_configs(train_assets, tmp_path), strict=True):
        run_cli("train", str(write_stage(tmp_path / f"{name}.toml", raw)), deterministic=True)
        losses = losses_by_step(tmp_path / name)
        assert list(losses) == list(range(1, CHAIN_STEPS[name] + 1))
        lines += [f"{name} {step} {losses[step]!r}" for step in sorted(losses)]
    if UPDATE_GOLDEN:
        write_chain_golden(lines)
    assert GOLDEN_CHAIN.is_file(), f"{GOLDEN_CHAIN} is missing; create it with UPDATE_GOLDEN=1"
    rows, golden_rows = ([line.split() for line in found] for found in (lines, read_chain_golden()))
    assert [row[:2] for row in rows] == [row[:2] for row in golden_rows]
    assert_matches_golden([float(row[2]) for row in rows], [float(row[2]) for row in golden_rows],
                          "the tiny stage-1 -> stage-2 chain")  # fmt: skip


def test_golden_chain_file_has_header_and_one_loss_per_step():
    text = GOLDEN_CHAIN.read_text()
    assert "# Command:" in text and "# Reason:" in text
    rows = [line.split() for line in read_chain_golden()]
    expected = [(name, str(step)) for name, n in CHAIN_STEPS.items() for step in range(1, n + 1)]
    assert [(name, step) for name, step, _ in rows] == expected
    assert all(repr(float(loss)) == loss for _, _, loss in rows)  # repr precision: round-trips


def test_golden_file_has_header_and_one_loss_per_step():
    lines = GOLDEN.read_text().splitlines()
    assert any(line.startswith("# Command:") for line in lines)
    assert any(line.startswith("# Reason:") for line in lines)
    values = [line for line in lines if line.strip() and not line.startswith("#")]
    assert len(values) == GOLDEN_STEPS
    assert all(repr(float(line)) == line for line in values)  # repr precision: round-trips


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


MODULE_RATES = {"lr_vision": 2.5e-4, "lr_projector": 2e-3, "vision_layer_decay": 0.5}
"""Per-module rates and ViT layer decay for the resume test (lr_llm stays learning_rate)."""


def test_resume_is_exact(train_assets, tmp_path, monkeypatch):  # noqa: F811
    """N straight steps == k steps, crash, resume, N - k steps; bit for bit on CPU fp32,
    with every module at its own rate and the ViT's blocks at decayed rates.
    The resumed run goes on in the same MLflow run (a file store here, MLflow 3 keeps it on
    request), and both write their loss curves and the time left at each step."""
    n, k = 6, 3
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    straight = write_stage(
        tmp_path / "straight.toml",
        stage_raw(train_assets, tmp_path / "straight", stage="stage2", max_steps=n,
                  optim=MODULE_RATES),
    )  # fmt: skip
    resumed_dir = tmp_path / "resumed"
    resumed = write_stage(
        tmp_path / "resumed.toml",
        stage_raw(train_assets, resumed_dir, stage="stage2", max_steps=n, save_steps=k,
                  optim=MODULE_RATES, train={"report_to": ["mlflow"]}),
    )  # fmt: skip
    assert main(["train", str(straight)]) == 0

    train_until_crash(resumed, k + 1, monkeypatch)  # after the step-k checkpoint
    assert [s for s, _ in list_checkpoints(resumed_dir)] == [k]
    assert not (resumed_dir / FINAL_MARKER).exists()
    assert main(["train", str(resumed)]) == 0  # resume = "auto": continues from step-3

    expected = read_metrics(tmp_path / "straight")
    got = read_metrics(resumed_dir)
    assert [r["step"] for r in got] == list(range(1, n + 1))
    keys = ("loss", "grad_norm", "lr", "lr/vision", "lr/projector", "lr/llm", "samples",
            "padding_tokens")  # fmt: skip
    for key in keys:
        assert [r[key] for r in got] == [r[key] for r in expected], key
    # learning_rate 1e-3, one warmup step: step 2 runs at the peaks, `lr` stays the base.
    peak = got[1]
    assert (peak["lr"], peak["lr/vision"], peak["lr/projector"], peak["lr/llm"]) == (
        1e-3, 2.5e-4, 2e-3, 1e-3
    )  # fmt: skip
    assert_same_weights(exported_weights(resumed_dir), exported_weights(tmp_path / "straight"))
    assert [r["eta_seconds"] > 0 for r in got] == [True] * (n - 1) + [False]  # 0 s at the end
    assert (resumed_dir / "loss_curves.png").is_file()
    assert_one_mlflow_run(tmp_path / "mlruns", resumed_dir, n)


def assert_one_mlflow_run(store: Path, output_dir: Path, num_steps: int) -> None:
    """Both processes of the run logged into one MLflow run: every step, the resolved config
    and the run facts as parameters."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{store}")
    [run] = client.search_runs(["0"])
    assert json.loads((output_dir / "trackers.json").read_text()) == {"mlflow": run.info.run_id}
    # The crashed process logged steps 1 to k, the resumed one the rest.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, num_steps + 1))
    assert run.data.params["train.max_steps"] == str(num_steps)
    assert run.data.params["facts.tile_size"] == str(TILE)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync_save", "async_save"])
def test_kill_and_resume_matches_an_uninterrupted_run(train_assets, tmp_path, asynchronous):  # noqa: F811
    """SIGKILL after the step-4 checkpoint, rerun: every logged loss equals the straight run.
    With async saves the kill may also land while a checkpoint is written in the background."""
    n = 10
    killed_dir = tmp_path / "killed"
    reference = write_stage(
        tmp_path / "reference.toml",
        stage_raw(train_assets, tmp_path / "reference", stage="stage2", max_steps=n),
    )
    killed = write_stage(
        tmp_path / "killed.toml",
        stage_raw(
            train_assets,
            killed_dir,
            stage="stage2",
            max_steps=n,
            save_steps=2,
            train={"async_checkpoint": asynchronous},
        ),  # fmt: skip
    )
    reference_run = start(reference)
    victim = start(killed)
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoints" / "step-00000004").is_dir():
        assert victim.poll() is None, f"the run ended before step 4: {victim.communicate()[1]}"
        assert time.monotonic() < deadline, "no step-4 checkpoint within 240 s"
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    wait_ok(reference_run)

    # Whatever the kill interrupted, only complete checkpoints can be picked up. Plant the
    # leftover of a crash inside the next save too (the kill may or may not have made one).
    latest = latest_checkpoint(killed_dir)
    assert latest is not None and not latest.name.endswith(".tmp")
    assert (latest / "manifest.json").is_file()
    latest_step = int(latest.name.split("-")[1])
    assert 4 <= latest_step < n
    stale = killed_dir / "checkpoints" / f"step-{latest_step + 2:08d}.tmp"
    stale.mkdir(exist_ok=True)
    (stale / "shared.json").write_text("{half written")
    assert latest_checkpoint(killed_dir) == latest
    assert not (killed_dir / FINAL_MARKER).exists()
    logged_before = {r["step"] for r in read_metrics(killed_dir)}

    run_cli("train", str(killed), deterministic=True)
    expected = losses_by_step(tmp_path / "reference")
    assert sorted(expected) == list(range(1, n + 1))
    records = read_metrics(killed_dir)
    # Steps the killed run logged after its last checkpoint were dropped on resume and logged
    # again by the rerun: each step once, equal to the uninterrupted run.
    assert [r["step"] for r in records] == list(range(1, n + 1))
    for record in records:
        assert record["loss"] == expected[record["step"]], record["step"]
    assert logged_before <= set(expected)
    assert (killed_dir / FINAL_MARKER).is_file()
    assert not list((killed_dir / "checkpoints").glob("*.tmp"))
    assert [s for s, _ in list_checkpoints(killed_dir)] == [6, 8, 10]  # save_total_limit 3
    assert_same_weights(exported_weights(killed_dir), exported_weights(tmp_path / "reference"))


def path_b_model(train_assets):  # noqa: F811
    torch.manual_seed(0)
    config = ModelConfig(
        vision_path=str(train_assets.components.vision_path),
        llm_path=str(train_assets.components.llm_path),
        force_image_size=TILE,
    )
    return build_model(config).model


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stage_one_output_starts_stage_one_point_five(train_assets, tmp_path):  # noqa: F811
    stage1_dir, stage15_dir = tmp_path / "stage1", tmp_path / "stage1_5"
    stage1 = write_stage(tmp_path / "stage1.toml", stage_raw(train_assets, stage1_dir, max_steps=3))
    assert main(["train", str(stage1)]) == 0

    raw = stage_raw(
        train_assets,
        stage15_dir,
        max_steps=2,
        model={"model_name_or_path": str(stage1_dir), "drop_path_rate": 0.1},
        freeze={"freeze_backbone": False, "freeze_llm": True},
    )
    del raw["model"]["vision_path"], raw["model"]["llm_path"], raw["model"]["force_image_size"]
    stage15 = write_stage(tmp_path / "stage1_5.toml", raw)
    assert main(["train", str(stage15)]) == 0

    fresh = path_b_model(train_assets)
    after1 = build_model(ModelConfig(model_name_or_path=str(stage1_dir))).model
    after15 = build_model(ModelConfig(model_name_or_path=str(stage15_dir))).model
    # Stage 1 trained only the projector; its export carries that projector to stage 1.5.
    assert after1.config.force_image_size == TILE
    for name in ("vision_model", "language_model"):
        for key, value in state_of(getattr(fresh, name)).items():
            assert torch.equal(value, getattr(after1, name).state_dict()[key]), key
    assert not torch.equal(fresh.projector.fc1.weight, after1.projector.fc1.weight)
    # Stage 1.5 trains ViT + projector on top of stage 1's weights, the LLM stays as it was.
    for key, value in state_of(after1.language_model).items():
        assert torch.equal(value, after15.language_model.state_dict()[key]), key
    assert not torch.equal(
        after1.vision_model.embeddings.patch_embedding.weight,
        after15.vision_model.embeddings.patch_embedding.weight,
    )
    final = (stage15_dir / FINAL_MARKER).read_text()
    vit_and_projector = sum(p.numel() for p in fresh.vision_model.parameters()) + sum(
        p.numel() for p in fresh.projector.parameters()
    )
    assert f'"trainable_params": {vit_and_projector}' in final
