"""The recipe runner end to end on tiny components: chaining, skipping, resuming, checking."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.testing.components import TINY_VISION, build_tiny_components
from vlpretrain.testing.shapes import caption_corpus
from vlpretrain.testing.synthetic import make_shapes_dataset

pytestmark = pytest.mark.slow

STAGE_COMMON = """
[stages.{name}.data]
max_seq_length = 1024
max_dynamic_patch = 4
max_skip_fraction = 0.1
[stages.{name}.packing]
max_packed_tokens = 1024
num_images_expected = 16
[stages.{name}.train]
meta_path = "{meta}"
max_steps = {steps}
save_steps = 2
report_to = "none"
progress_bar = false
grad_checkpoint = false
"""


def write_recipe(tmp_path: Path, components, meta: Path, steps: int = 3) -> Path:
    text = f"""
[pipeline]
output_dir = "{tmp_path / "stages"}"
stages = ["stage1", "stage1_5", "stage2"]
[stages.stage1.model]
vision_path = "{components.vision_path}"
llm_path = "{components.llm_path}"
force_image_size = 28
[stages.stage1.freeze]
freeze_backbone = true
freeze_llm = true
[stages.stage1_5.model]
drop_path_rate = 0.1
[stages.stage1_5.freeze]
freeze_llm = true
[stages.stage2.model]
drop_path_rate = 0.1
"""
    for name in ("stage1", "stage1_5", "stage2"):
        text += STAGE_COMMON.format(name=name, meta=meta, steps=steps)
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = make_shapes_dataset(root / "data", seed=0, num_caption=80, num_qa=80, num_eval=4)
    components = build_tiny_components(
        root / "components",
        corpus=caption_corpus(0),
        vision_config=replace(TINY_VISION, image_size=28),
    )
    return components, data


def test_three_stages_chain_and_rerun_skips_finished(tmp_path, recipe_inputs, caplog):
    components, data = recipe_inputs
    recipe = write_recipe(tmp_path, components, data.meta_pretrain_path)
    assert main(["pipeline", str(recipe)]) == 0
    stages = tmp_path / "stages"
    for name in ("stage1", "stage1_5", "stage2"):
        assert (stages / name / "training_complete.json").exists()
        config = json.loads((stages / name / "config.json").read_text())
        assert config["model_type"] == "internvl_chat"
    resolved = json.loads((stages / "stage2" / "config.resolved.json").read_text())
    assert resolved["model"]["model_name_or_path"] == str(stages / "stage1_5")
    # The stage 1.5 / 2 models were trained: the ViT changed between stage 1 and 1.5 exports.
    metrics_before = (stages / "stage2" / "metrics.jsonl").read_text()

    caplog.set_level(logging.INFO)
    assert main(["pipeline", str(recipe)]) == 0
    skipped = [r for r in caplog.records if "already finished" in r.getMessage()]
    assert len(skipped) == 3
    assert (stages / "stage2" / "metrics.jsonl").read_text() == metrics_before


def test_half_finished_stage_resumes(tmp_path, recipe_inputs, caplog):
    components, data = recipe_inputs
    recipe = write_recipe(tmp_path, components, data.meta_pretrain_path, steps=4)
    assert main(["pipeline", str(recipe)]) == 0
    stage2 = tmp_path / "stages" / "stage2"
    losses = [
        json.loads(line)["loss"] for line in (stage2 / "metrics.jsonl").read_text().splitlines()
    ]
    # Pretend stage 2 was killed after its step-2 checkpoint.
    (stage2 / "training_complete.json").unlink()
    for path in (stage2 / "checkpoints").iterdir():
        if path.name != "step-00000002":
            import shutil

            shutil.rmtree(path)
    (stage2 / "metrics.jsonl").write_text("")
    caplog.set_level(logging.INFO)
    assert main(["pipeline", str(recipe)]) == 0
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    resumed = [
        json.loads(line)["loss"] for line in (stage2 / "metrics.jsonl").read_text().splitlines()
    ]
    assert resumed == losses[2:]


def test_check_only_reports_every_stage_problem(tmp_path, recipe_inputs, capsys):
    components, data = recipe_inputs
    recipe = write_recipe(tmp_path, components, data.meta_pretrain_path)
    text = recipe.read_text().replace(
        "freeze_llm = true\n[stages.stage1_5", "freeze_lm = true\n[stages.stage1_5"
    )
    text = text.replace(f'meta_path = "{data.meta_pretrain_path}"', 'meta_path = "/nope.json"', 1)
    recipe.write_text(text)
    assert main(["pipeline", str(recipe), "--check-only"]) == 2
    err = capsys.readouterr().err
    assert "stage stage1: unknown key freeze.freeze_lm (did you mean freeze_llm" in err
