"""Experiment trackers: where step metrics and run parameters go besides metrics.jsonl.

    train.report_to --build_trackers--> [Tracker] --MetricsWriter--> log_metrics / log_params

One class per backend behind the `Tracker` protocol; the writer holds a list of them and never
asks which backend it has. W&B and MLflow are optional extras, imported only when named. The
run id of each backend that has one is kept in output_dir/trackers.json, so a resumed stage
goes on writing into the same tracker run (a fresh start moves that file aside with the rest
of the earlier run). Only rank 0 builds trackers (the writer of other ranks is disabled).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from vlpretrain.files import write_atomic
from vlpretrain.packages import require

logger = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "wandb", "mlflow", "all", "none"]
"""Values of train.report_to: a backend, 'all' (every installed one) or 'none'."""
RUN_IDS_FILE = "trackers.json"
"""{backend: run id} in output_dir: a resumed stage continues these tracker runs."""
MLFLOW_MAX_PARAM_LENGTH = 6000
"""MLflow refuses longer parameter values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)."""


class Tracker(Protocol):
    """One backend of experiment tracking, fed by MetricsWriter on rank 0."""

    run_id: str | None
    """The backend's id of this run, kept for a resume; None where the backend has none."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the numeric metrics of one optimizer step."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's parameters (flattened 'section.key' names)."""

    def close(self) -> None:
        """Flush and end this process's part of the run."""


class TensorBoardTracker:
    """Event files in output_dir/tensorboard."""

    def __init__(self, output_dir: Path, start_step: int, run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id: str | None = None
        # purge_step hides the interrupted run's events of the steps that are redone.
        self._writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        self._step = start_step

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._step = step
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # One text entry: add_hparams would start a separate run directory for the table.
        lines = [f"    {key} = {value!r}" for key, value in params.items()]
        self._writer.add_text("run parameters", "\n".join(lines), self._step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run (files in output_dir/wandb; WANDB_* variables as W&B reads them,
    the project WANDB_PROJECT or 'vlpretrain', the run named after output_dir)."""

    def __init__(self, output_dir: Path, start_step: int, run_id: str | None) -> None:
        wandb = require("wandb", "train.report_to 'wandb'", "vlpretrain[wandb]")
        # resume='allow' with our stored id continues that run; W&B ignores the records of
        # steps it already has (those an interrupted run logged past its checkpoint).
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "vlpretrain",
            name=output_dir.resolve().name,
            dir=str(output_dir),
            id=run_id,
            resume="allow",
        )
        self.run_id: str | None = str(self._run.id)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # A resumed run may change operational settings (logging_steps, ...): newest wins.
        self._run.config.update(dict(params), allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID or MLFLOW_EXPERIMENT_NAME as
    MLflow reads them; the run named after output_dir).

    Through MlflowClient with the run id, never MLflow's process-wide active run: a stage that
    ended in an exception must not leave a run open that the next stage would collide with.
    """

    def __init__(self, output_dir: Path, start_step: int, run_id: str | None) -> None:
        mlflow = require("mlflow", "train.report_to 'mlflow'", "vlpretrain[mlflow]")
        self._entities = mlflow.entities
        self._client = mlflow.MlflowClient()
        if run_id is None:
            experiment = _mlflow_experiment_id(self._client)
            name = output_dir.resolve().name
            run_id = str(self._client.create_run(experiment, run_name=name).info.run_id)
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id: str | None = run_id
        self._id = run_id

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        metric = self._entities.Metric
        batch = [
            metric(mlflow_metric_name(key), float(value), now_ms, step)
            for key, value in metrics.items()
        ]
        self._client.log_batch(self._id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # MLflow refuses to change a logged parameter: a resumed run adds only new ones.
        logged = self._client.get_run(self._id).data.params
        values = {key: str(value)[:MLFLOW_MAX_PARAM_LENGTH] for key, value in params.items()}
        changed = sorted(key for key in values if key in logged and logged[key] != values[key])
        if changed:
            logger.warning("MLflow keeps the first value of a run's parameters; changed on "
                           "resume and not updated there: %s", ", ".join(changed))  # fmt: skip
        param = self._entities.Param
        new = [param(key, value) for key, value in values.items() if key not in logged]
        if new:
            self._client.log_batch(self._id, params=new)

    def close(self) -> None:
        self._client.set_terminated(self._id)


def mlflow_metric_name(key: str) -> str:
    """The MLflow name of a metric: '/' becomes '.' (lr/vision -> lr.vision). MLflow's file
    store keeps each metric in a file at the key's path, so a family such as 'lr/vision' could
    not sit next to 'lr' (NotADirectoryError at the first step)."""
    return key.replace("/", ".")


def _mlflow_experiment_id(client: Any) -> str:
    """MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME's (created when new), else MLflow's
    Default experiment ('0'), as MLflow's own start_run picks it."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"
    experiment = client.get_experiment_by_name(name)
    return str(experiment.experiment_id if experiment else client.create_experiment(name))


BACKENDS: dict[str, Callable[[Path, int, str | None], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}
"""Backend name -> tracker(output_dir, start_step, stored run id or None)."""
BACKEND_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each backend imports; 'all' picks the backends whose package is installed."""


def backend_names(report_to: Sequence[str]) -> list[str]:
    """The backends `report_to` names, in order: 'none' none, 'all' every installed one (as
    the reference trainer's report_to 'all' means)."""
    if "all" in report_to:
        names = [n for n, m in BACKEND_MODULES.items() if importlib.util.find_spec(m) is not None]
        logger.info("train.report_to 'all': the installed trackers are %s", ", ".join(names))
        return names
    return list(dict.fromkeys(name for name in report_to if name != "none"))


def build_trackers(report_to: Sequence[str], output_dir: Path, start_step: int) -> list[Tracker]:
    """The trackers `report_to` names, continuing the runs recorded in output_dir."""
    names = backend_names(report_to)
    run_ids = read_run_ids(output_dir)
    trackers = [BACKENDS[name](output_dir, start_step, run_ids.get(name)) for name in names]
    started = {name: t.run_id for name, t in zip(names, trackers, strict=True) if t.run_id}
    if any(run_ids.get(name) != run_id for name, run_id in started.items()):
        text = json.dumps({**run_ids, **started}) + "\n"
        write_atomic(output_dir / RUN_IDS_FILE, lambda handle: handle.write(text.encode()))
    return trackers


def read_run_ids(output_dir: Path) -> dict[str, str]:
    """{backend: run id} of output_dir/trackers.json; {} when absent.

    Raises:
        ValueError: the file is not a JSON object of strings (names the file).
    """
    path = output_dir / RUN_IDS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not JSON ({error}); delete it to start new tracker runs"
        ) from None
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise ValueError(f"{path}: expected {{backend: run id}}, got {ids!r}")
    return ids
