"""What a stage-2 run writes, shown on a tiny model: per-module learning rates, per-dataset
losses, a held-out evaluation, trackers, plots and the end-of-stage summary.

    tiny components + shapes dataset (tests/train_fixtures.py) --> stage-2 config with
    optim.lr_vision / lr_projector / lr_llm, optim.vision_layer_decay, [eval] every 2 steps,
    train.report_to = tensorboard + wandb (offline) + mlflow (a file store in the run folder)
    --> `vlpretrain train` in a subprocess --> prints the optimizer-group lines of its log, one
    step record and one eval record of metrics.jsonl, the files each tracker wrote, the summary

The held-out meta here is the captions meta of the same tiny dataset (a real run names its own
held-out files). Needs the `wandb` and `mlflow` extras (both in `dev`); about 30 s on 2 cores.
Run: .venv/bin/python bench/trainer_outputs.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from train_fixtures import build_train_assets, stage_raw, write_stage  # noqa: E402


def stage_config(root: Path) -> Path:
    assets = build_train_assets(root / "assets")
    raw = stage_raw(
        assets,
        root / "stage2",
        stage="stage2",
        max_steps=4,
        optim={"learning_rate": 1e-3, "warmup_steps": 1, "lr_vision": 2e-4,
               "lr_projector": 2e-3, "lr_llm": 5e-4, "vision_layer_decay": 0.8},
        eval={"meta": str(assets.data.meta_pretrain_path), "steps": 2, "max_batches": 2},
        train={"report_to": ["tensorboard", "wandb", "mlflow"], "logging_steps": 1},
    )  # fmt: skip
    return write_stage(root / "stage2.toml", raw)


def run(config: Path, root: Path) -> str:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": f"file:{root / 'stage2' / 'mlruns'}",
        "PYTHONPATH": str(HERE.parent),
    }
    done = subprocess.run(
        [sys.executable, "-m", "vlpretrain", "train", str(config)],
        env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"train exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done.stderr + done.stdout


def report(log: str, output: Path) -> None:
    print("## optimizer groups (start of the log)")
    for line in log.splitlines():
        if "group" in line and ("lr" in line or "weight decay" in line):
            print(line.split("] ", 1)[-1])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in records if r.get("kind") != "eval" and "loss" in r][-1]  # past warm-up
    evaluation = next(r for r in records if r.get("kind") == "eval")
    print("\n## one step record of metrics.jsonl (loss, per-dataset loss, learning rates)")
    shown = {k: v for k, v in step.items() if k == "step" or k.startswith(("loss", "lr"))}
    print(json.dumps(shown))
    print("\n## one eval record of metrics.jsonl")
    print(json.dumps(evaluation))
    print("\n## files the trackers and the stage wrote")
    wanted = ("events.out", "trackers.json", "loss_curves.png", "training_complete.json", ".wandb")
    for path in sorted(output.rglob("*")):
        if path.is_file() and any(part in path.name for part in wanted):
            print(f"{path.relative_to(output)}  ({path.stat().st_size} bytes)")
    metas = list((output / "mlruns").rglob("meta.yaml"))
    metrics = sorted(p.name for p in (output / "mlruns").rglob("*") if p.parent.name == "metrics")
    print(f"mlruns/: {len(metas)} meta.yaml (experiment and run); metrics {metrics}")
    print("\n## the end-of-stage summary")
    for line in log.splitlines()[-12:]:
        if "stage" in line or "next" in line or "export" in line:
            print(line.split("] ", 1)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="run here and keep the files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        log = run(stage_config(root), root)
        report(log, root / "stage2")


if __name__ == "__main__":
    main()
