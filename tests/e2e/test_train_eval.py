"""Held-out evaluation and per-dataset losses in a CLI run: evaluating leaves the training
losses untouched bit for bit, counts every held-out record once, and every logged step
carries each dataset's loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import (
    one_thread,  # noqa: F401  (pytest fixture)
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

from vlpretrain.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS = 4


def held_out_meta(train_assets, path: Path) -> tuple[Path, int]:  # noqa: F811
    """A meta of the QA and caption files, each read once; returns it and its line count."""
    meta = json.loads(Path(train_assets.data.meta_finetune_path).read_text())
    entries = {f"held_out_{name}": {**entry, "repeat_time": 1} for name, entry in meta.items()}
    path.write_text(json.dumps(entries))
    lines = sum(
        sum(1 for line in Path(entry["annotation"]).read_text().splitlines() if line.strip())
        for entry in entries.values()
    )
    return path, lines


def run(train_assets, root: Path, name: str, **sections) -> list[dict]:  # noqa: F811
    # drop_path in the ViT: training draws from torch's RNG, so an evaluation that drew from
    # it too (or ran in train mode) would change every later loss.
    raw = stage_raw(train_assets, root / name, stage="stage2", max_steps=STEPS,
                    model={"drop_path_rate": 0.2}, **sections)  # fmt: skip
    assert main(["train", str(write_stage(root / f"{name}.toml", raw))]) == 0
    return read_metrics(root / name)


def test_evaluating_leaves_training_alone_and_reads_each_held_out_record_once(
    train_assets,  # noqa: F811
    tmp_path,
):
    meta, num_records = held_out_meta(train_assets, tmp_path / "held_out.json")
    plain = run(train_assets, tmp_path, "plain", data={"log_per_dataset": False})
    evaluated = run(train_assets, tmp_path, "evaluated", eval={"meta": str(meta), "steps": 3})

    steps = [r for r in evaluated if r.get("kind", "train") == "train"]
    evals = [r for r in evaluated if r.get("kind") == "eval"]
    for key in ("loss", "grad_norm", "lr", "samples"):
        assert [r[key] for r in steps] == [r[key] for r in plain], key
    # every 3 steps, and after the last one (4)
    assert [r["step"] for r in evals] == [3, 4]
    for record in evals:
        assert record["eval/records"] == num_records  # each once, skipped ones included
        assert 0 < record["eval/skipped"] < num_records and record["eval/tokens"] > 0
        per_dataset = [record[f"eval/loss/held_out_{n}"] for n in ("shapes_qa", "shapes_captions")]
        # the overall loss is the weight-weighted mean of the per-dataset ones
        assert min(per_dataset) < record["eval/loss"] < max(per_dataset)
    assert evals[0]["eval/loss"] != evals[1]["eval/loss"]  # the weights moved in between

    assert not any(key.startswith("loss/") for r in plain for key in r)
    for record in steps:
        per_dataset = [v for k, v in record.items() if k.startswith("loss/")]
        assert sorted(k for k in record if k.startswith("loss/")) == [
            "loss/shapes_captions",
            "loss/shapes_qa",
        ], record
        assert min(per_dataset) <= record["loss"] <= max(per_dataset)
