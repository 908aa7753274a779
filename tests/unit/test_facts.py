"""RunFacts: derived once from the model and tokenizer, read cheaply for show-config, never set."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vlpretrain.cli import main
from vlpretrain.data.build import SampleConfig
from vlpretrain.facts import RunFacts
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import ModelConfig, build_model, read_run_facts, run_facts
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START


def test_facts_of_a_built_path_b_model(tiny_model):
    facts = run_facts(tiny_model.model, tiny_model.tokenizer)
    tokenizer = tiny_model.tokenizer
    start, end, context = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
    # 56-px tiles, 14-px patches: (56 / 14)^2 = 16 patches * 0.5^2 = 4 tokens per tile.
    assert (facts.tile_size, facts.num_image_token, facts.template) == (56, 4, "internvl2_5")
    assert (facts.img_start_token_id, facts.img_end_token_id) == (start, end)
    assert facts.img_context_token_id == context == tiny_model.model.image_context_token_id
    assert facts.pad_token_id == (tokenizer.pad_token_id or 0)


def test_read_facts_equal_built_facts_on_both_paths(tiny_components, tiny_model, tmp_path):
    path_b = ModelConfig(
        vision_path=str(tiny_components.vision_path),
        llm_path=str(tiny_components.llm_path),
        force_image_size=56,
    )
    assert read_run_facts(path_b) == run_facts(tiny_model.model, tiny_model.tokenizer)
    exported = save_internvl(tiny_model.model, tiny_model.tokenizer, tmp_path / "export")
    path_a = ModelConfig(
        model_name_or_path=str(exported), force_image_size=28, conv_style="phi3-chat"
    )
    # Explicit settings win over the checkpoint's, as in build_model: 28 px -> 1 token per tile.
    facts = read_run_facts(path_a)
    assert (facts.tile_size, facts.num_image_token, facts.template) == (28, 1, "phi3-chat")
    built = build_model(path_a)
    assert facts == run_facts(built.model, built.tokenizer)
    assert replace(facts, tile_size=56, num_image_token=4, template="internvl2_5") == run_facts(
        tiny_model.model, tiny_model.tokenizer
    )


def test_export_records_the_tiling_settings_of_the_data(tiny_model, tmp_path):
    settings = replace(SampleConfig(), max_dynamic_patch=6, use_thumbnail=False).image_settings()
    directory = save_internvl(
        tiny_model.model, tiny_model.tokenizer, tmp_path / "out", image_settings=settings
    )
    saved = json.loads((directory / "config.json").read_text())
    assert (saved["max_dynamic_patch"], saved["use_thumbnail"]) == (6, False)
    assert saved["force_image_size"] == 56  # the model's own fields are untouched


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"num_image_token": 0}, "num_image_token"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"img_end_token_id": 5}, "img_end_token_id"),  # equal to img_start_token_id
    ],
)
def test_invalid_facts_are_refused(change, field):
    valid = dict(
        tile_size=28,
        num_image_token=1,
        template="internvl2_5",
        pad_token_id=0,
        img_start_token_id=5,
        img_end_token_id=6,
        img_context_token_id=7,
    )
    RunFacts(**valid)
    with pytest.raises(ValueError, match=field):
        RunFacts(**{**valid, **change})


def test_show_config_prints_settings_and_facts_labelled(tiny_components, tmp_path, capsys):
    path = tmp_path / "stage.toml"
    path.write_text(
        f'[model]\nvision_path = "{tiny_components.vision_path}"\n'
        f'llm_path = "{tiny_components.llm_path}"\nforce_image_size = 56\n'
    )
    assert main(["show-config", str(path)]) == 0
    out = capsys.readouterr().out
    settings, facts = out.split("# Derived from the model and tokenizer")
    assert "[data]" in settings and "tile_size" not in settings.split("[data]")[1]
    assert "[facts]" in facts
    assert "tile_size = 56  # Tile side in pixels" in facts
    assert "num_image_token = 4  #" in facts


def test_show_config_without_the_model_files_says_why(tmp_path, capsys):
    path = tmp_path / "stage.toml"
    path.write_text('[model]\nvision_path = "vit"\nllm_path = "llm"\n')
    assert main(["show-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[facts]\n# unavailable:" in out and "vit" in out.split("[facts]")[1]
