"""Edge cases found in review: each test names the failure it guards against."""

from __future__ import annotations

import torch

from vlpretrain.config import ConfigError, build_run_config, validate
from vlpretrain.flags import apply_reference_flags
from vlpretrain.pipeline import build_stages
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy


def test_batch_without_supervised_token_still_reaches_the_head(tiny_model, make_vlm_batch):
    # DDP/FSDP2 need every trainable parameter in the graph every step, lm_head included.
    batch = make_vlm_batch(tiny_model)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["loss_weight"] = torch.zeros_like(batch["loss_weight"])
    out = tiny_model.model(**batch)
    out.loss_sum.backward()
    assert out.num_supervised == 0 and float(out.loss_sum) == 0.0
    missing = [n for n, p in tiny_model.model.named_parameters() if p.grad is None]
    assert missing == []


def test_two_rows_equal_each_row_alone(tiny_model, make_vlm_batch):
    # Rows run as one flattened sequence (flash-attention varlen needs batch size 1); the
    # restarting position_ids keep them independent: the loss of 2 rows is the sum.
    model = tiny_model.model.eval()
    one = make_vlm_batch(tiny_model)
    two = {k: torch.cat([v, v]) for k, v in one.items()}  # rows and their tiles, twice
    with torch.no_grad():
        single = model(**one).loss_sum
        double = model(**two).loss_sum
    torch.testing.assert_close(double, 2 * single, rtol=1e-5, atol=1e-6)


def test_unfreeze_more_vit_layers_than_exist_unfreezes_all(tiny_model):
    model = tiny_model.model
    apply_freeze_policy(model, FreezeConfig(freeze_backbone=True, unfreeze_vit_layers=26))
    layers = model.vision_model.encoder.layers
    assert all(p.requires_grad for p in layers.parameters())


def test_vit_layers_after_select_layer_are_frozen(tiny_model):
    # select_layer 1 of 2 layers: layer index 1 never runs, so it must not be trainable.
    model = tiny_model.model
    model.config = type(model.config)(**{**model.config.to_dict(), "select_layer": 1})
    apply_freeze_policy(model, FreezeConfig())
    layers = model.vision_model.encoder.layers
    assert all(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in layers[1].parameters())


def test_reference_seed_flag_seeds_model_and_data():
    raw: dict = {}
    apply_reference_flags(raw, ["--seed", "7"])
    assert raw["train"]["seed"] == 7 and raw["stream"]["seed"] == 7


def test_training_rejects_a_finite_stream(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    config = build_run_config(
        {
            "model": {"model_name_or_path": str(tmp_path)},
            "train": {"meta_path": str(meta)},
            "stream": {"num_epochs": 1},
        }
    )
    try:
        validate(config, 1)
    except ConfigError as error:
        assert any("stream.num_epochs" in p for p in error.problems)
    else:
        raise AssertionError("num_epochs was accepted for training")


def test_recipe_inline_section_refines_stage_file_key_by_key(tmp_path):
    stage_file = tmp_path / "stage.toml"
    stage_file.write_text(
        '[model]\nmodel_name_or_path = "x"\n[train]\nmax_steps = 100\nprecision = "bf16"\n'
    )
    recipe = {
        "pipeline": {"stages": ["s"], "output_dir": str(tmp_path / "out")},
        "stages": {"s": {"config": "stage.toml", "train": {"max_steps": 10}}},
    }
    (stage,) = build_stages(recipe, base_dir=tmp_path)
    assert stage.config.train.max_steps == 10
    assert stage.config.train.precision == "bf16"
