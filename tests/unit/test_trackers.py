"""Experiment trackers behind MetricsWriter: W&B (offline) and MLflow (a file store in tmp)
receive metrics and parameters on rank 0, a resume continues the same tracker run, 'all' means
the installed ones, and a tracker whose package is missing names the extra to install."""

from __future__ import annotations

import json
import sys

import pytest

from vlpretrain.log import MetricsWriter
from vlpretrain.packages import MissingPackageError
from vlpretrain.trackers import RUN_IDS_FILE, backend_names, read_run_ids
from vlpretrain.train.resume import set_aside_previous_run


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store; returns a client reading it."""
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 keeps the file store only on request; it needs no server and no database.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return mlflow.MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")


def write_steps(writer, steps):
    for step in steps:
        writer.write(step, {"loss": 1.0 / step, "lr": 1e-4, "note": "text is no metric"})


def test_mlflow_gets_metrics_and_params_and_a_resume_continues_its_run(tmp_path, mlflow_store):
    out = tmp_path / "stage1"
    writer = MetricsWriter(out, ["mlflow"])
    writer.log_params({"train.max_steps": 3, "train.logging_steps": 1, "facts.tile_size": 448})
    write_steps(writer, [1, 2])
    writer.close()
    run_id = read_run_ids(out)["mlflow"]

    # Resumed from step 2's checkpoint: the same run, a changed operational setting kept as
    # first logged (MLflow refuses to change a parameter) and a new one added.
    writer = MetricsWriter(out, ["mlflow"], start_step=2)
    writer.log_params({"train.max_steps": 3, "train.logging_steps": 5, "train.seed": 1})
    write_steps(writer, [3])
    writer.close()

    assert read_run_ids(out) == {"mlflow": run_id}
    history = mlflow_store.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    run = mlflow_store.get_run(run_id)
    assert run.data.params == {
        "train.max_steps": "3",
        "train.logging_steps": "1",
        "facts.tile_size": "448",
        "train.seed": "1",
    }
    assert "note" not in run.data.metrics  # only numbers reach a tracker
    assert run.info.run_name == "stage1"  # the output directory's name


def test_mlflow_gets_metric_families_next_to_their_head(tmp_path, mlflow_store):
    # `lr` and `lr/vision` (or `loss` and `loss/<dataset>`): the file store keeps a metric in
    # a file named by its key, so MLflow gets the family member as `lr.vision`.
    out = tmp_path / "stage2"
    writer = MetricsWriter(out, ["mlflow"])
    writer.write(1, {"lr": 1e-3, "lr/vision": 2e-4, "loss": 2.0, "loss/captions": 1.5})
    writer.close()
    metrics = mlflow_store.get_run(read_run_ids(out)["mlflow"]).data.metrics
    assert metrics == {"lr": 1e-3, "lr.vision": 2e-4, "loss": 2.0, "loss.captions": 1.5}


def test_wandb_offline_writes_the_run_under_output_dir_and_a_resume_keeps_its_id(
    tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "stage2"
    writer = MetricsWriter(out, ["wandb"])
    writer.log_params({"train.max_steps": 4})
    write_steps(writer, [1, 2])
    writer.close()
    run_id = read_run_ids(out)["wandb"]
    writer = MetricsWriter(out, ["wandb"], start_step=2)
    write_steps(writer, [3])
    writer.close()

    assert read_run_ids(out) == {"wandb": run_id}
    # Offline W&B writes one directory per process, named after the run id: both are ours.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    first = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"loss" in first and b"train.max_steps" in first


def test_tensorboard_and_none_keep_no_run_ids(tmp_path):
    writer = MetricsWriter(tmp_path, ["tensorboard"])
    write_steps(writer, [1])
    writer.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / RUN_IDS_FILE).exists()
    assert backend_names(["none"]) == []


def test_all_means_every_installed_tracker(monkeypatch):
    installed = {"tensorboard", "mlflow"}
    monkeypatch.setattr(
        "vlpretrain.trackers.importlib.util.find_spec",
        lambda name: object() if name in installed else None,
    )
    assert backend_names(["all"]) == ["tensorboard", "mlflow"]


def test_a_tracker_without_its_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # imports as if not installed
    with pytest.raises(MissingPackageError, match=r"vlpretrain\[wandb\]"):
        MetricsWriter(tmp_path, ["wandb"])


def test_other_ranks_build_no_tracker(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail if a rank other than 0 tried
    writer = MetricsWriter(tmp_path, ["wandb"], enabled=False)
    writer.log_params({"a": 1})
    write_steps(writer, [1])
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_start_sets_the_tracker_run_ids_aside(tmp_path):
    (tmp_path / RUN_IDS_FILE).write_text(json.dumps({"wandb": "abc123"}))
    target = set_aside_previous_run(tmp_path, keep=1)
    assert target is not None and read_run_ids(target) == {"wandb": "abc123"}
    assert read_run_ids(tmp_path) == {}


def test_a_damaged_run_ids_file_is_named(tmp_path):
    (tmp_path / RUN_IDS_FILE).write_text('{"wandb": ')
    with pytest.raises(ValueError, match=rf"{RUN_IDS_FILE}: not JSON"):
        read_run_ids(tmp_path)
