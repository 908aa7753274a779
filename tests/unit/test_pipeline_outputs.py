"""Recipes own their stages' output directories, and a finished stage is reused only when its
recorded configuration is the one the recipe resolves now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.config import ConfigError, to_dict
from vlpretrain.pipeline import build_stages, load_recipe, plan_stages
from vlpretrain.train.loop import FINAL_MARKER

REPOSITORY = Path(__file__).resolve().parents[2]


def copied_recipe(tmp_path: Path, output_dir: Path) -> Path:
    """The shipped 8B recipe with only its output_dir changed (its stage files name their own
    output_dir and model paths, as every shipped stage file does)."""
    text = (REPOSITORY / "recipes" / "internvl2_5_8b.toml").read_text()
    text = text.replace('output_dir = "work_dirs/internvl2_5_8b"', f'output_dir = "{output_dir}"')
    text = text.replace('config = "../configs/', f'config = "{REPOSITORY / "configs"}/')
    path = tmp_path / "copy.toml"
    path.write_text(text)
    return path


def test_recipe_output_dir_wins_over_the_stage_files_and_chains_stages(tmp_path):
    stages = load_recipe(copied_recipe(tmp_path, tmp_path / "experiment2"))
    outputs = [Path(stage.config.train.output_dir) for stage in stages]
    assert outputs == [tmp_path / "experiment2" / n for n in ("stage1", "stage1_5", "stage2")]
    assert [stage.output_source for stage in stages] == ["recipe [pipeline] output_dir"] * 3
    # Stage 1.5's file starts from work_dirs/internvl2_5_8b/stage1 (its stage 1 file's
    # output_dir): in the recipe that is this recipe's stage 1.
    assert Path(stages[1].config.model.model_name_or_path) == outputs[0]
    assert Path(stages[2].config.model.model_name_or_path) == outputs[1]


def test_output_dir_named_in_the_recipe_for_one_stage_wins(tmp_path):
    path = copied_recipe(tmp_path, tmp_path / "experiment2")
    path.write_text(
        path.read_text().replace(
            "[stages.stage1_5]\n", f'[stages.stage1_5]\ntrain = {{ output_dir = "{tmp_path}/x" }}\n'
        )
    )
    stages = load_recipe(path)
    assert Path(stages[1].config.train.output_dir) == tmp_path / "x"
    assert stages[1].output_source == "recipe [stages.stage1_5.train] output_dir"
    assert Path(stages[2].config.model.model_name_or_path) == tmp_path / "x"


def test_stage_file_output_dir_applies_without_a_recipe_output_dir(tmp_path):
    stage_file = tmp_path / "stage.toml"
    stage_file.write_text(
        f'[model]\nmodel_name_or_path = "m"\n[train]\noutput_dir = "{tmp_path}/s"\n'
    )
    recipe = {
        "pipeline": {"stages": ["a", "b"]},
        "stages": {"a": {"config": "stage.toml"}, "b": {"model": {"model_name_or_path": "m"}}},
    }
    first, second = build_stages(recipe, base_dir=tmp_path)
    assert (first.config.train.output_dir, first.output_source) == (f"{tmp_path}/s", "stage file")
    assert (second.config.train.output_dir, second.output_source) == ("runs/pipeline/b", "default")


def inline_recipe(tmp_path: Path, **train: object) -> dict:
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    (tmp_path / "model").mkdir(exist_ok=True)
    stage = {
        "model": {"model_name_or_path": str(tmp_path / "model")},
        "train": {"meta_path": str(meta), **train},
    }
    return {
        "pipeline": {"stages": ["one", "two"], "output_dir": str(tmp_path / "out")},
        "stages": {"one": stage, "two": {"train": {"meta_path": str(meta)}}},
    }


def finish(stage, config_dict: dict) -> None:
    """Make `stage`'s output_dir look like a finished run that recorded `config_dict`."""
    output = Path(stage.config.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.resolved.json").write_text(json.dumps(config_dict))
    (output / FINAL_MARKER).write_text(json.dumps({"step": 3}))


def test_finished_stage_with_the_same_config_is_skipped(tmp_path):
    stages = build_stages(inline_recipe(tmp_path))
    finish(stages[0], to_dict(stages[0].config))
    assert [plan.skip for plan in plan_stages(stages)] == [True, False]


def test_finished_stage_with_another_config_is_refused_naming_dirs_and_keys(tmp_path):
    stages = build_stages(inline_recipe(tmp_path))
    earlier = to_dict(stages[0].config)
    earlier["optim"] = {**earlier["optim"], "learning_rate": 1.0}
    finish(stages[0], earlier)
    with pytest.raises(ConfigError) as caught:
        plan_stages(stages)
    (problem,) = caught.value.problems
    assert str(tmp_path / "out" / "one") in problem
    assert "optim.learning_rate: 1.0 -> 0.0002" in problem
    assert "[pipeline] output_dir" in problem and "train.resume = 'never'" in problem


def test_finished_stage_with_another_config_trains_again_with_resume_never(tmp_path):
    stages = build_stages(inline_recipe(tmp_path, resume="never"))
    earlier = to_dict(stages[0].config)
    earlier["optim"] = {**earlier["optim"], "learning_rate": 1.0}
    finish(stages[0], earlier)
    assert [plan.skip for plan in plan_stages(stages)] == [False, False]


def test_finished_stage_after_a_stage_that_trains_again_is_refused(tmp_path):
    # Stage two's model came from stage one's earlier run, which is replaced now.
    stages = build_stages(inline_recipe(tmp_path))
    finish(stages[1], to_dict(stages[1].config))
    with pytest.raises(ConfigError) as caught:
        plan_stages(stages)
    assert "stage two: finished from stage one's earlier model" in caught.value.problems[0]


def test_check_only_prints_every_stage_output_dir_and_its_origin(tmp_path, capsys):
    recipe = inline_recipe(tmp_path)
    lines = [
        "[pipeline]",
        f'output_dir = "{tmp_path / "out"}"',
        'stages = ["one", "two"]',
        "[stages.one.model]",
        f'model_name_or_path = "{tmp_path / "model"}"',
        "[stages.one.train]",
        f'meta_path = "{recipe["stages"]["one"]["train"]["meta_path"]}"',
        "[stages.two.train]",
        f'meta_path = "{recipe["stages"]["two"]["train"]["meta_path"]}"',
        f'output_dir = "{tmp_path / "two"}"',
    ]
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["pipeline", str(path), "--check-only"]) == 0
    out = capsys.readouterr().out
    assert f"stage one: {tmp_path / 'out' / 'one'} (recipe [pipeline] output_dir); trains" in out
    assert f"stage two: {tmp_path / 'two'} (recipe [stages.two.train] output_dir); trains" in out


def test_set_with_a_stage_name_reaches_that_stage_only(tmp_path):
    overrides = [
        "optim.learning_rate=1e-3",  # every stage
        "stages.two.optim.learning_rate=5e-5",  # then stage two's own value wins
        "stages.one.train.max_steps=7",
    ]
    one, two = build_stages(inline_recipe(tmp_path), overrides)
    assert (one.config.optim.learning_rate, one.config.train.max_steps) == (1e-3, 7)
    assert (two.config.optim.learning_rate, two.config.train.max_steps) == (5e-5, 100)


def test_set_naming_a_stage_the_recipe_lacks_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_stages(inline_recipe(tmp_path), ["stages.three.optim.learning_rate=1e-3"])
    (problem,) = caught.value.problems
    assert "no stage 'three' in [pipeline] stages (one, two)" in problem
