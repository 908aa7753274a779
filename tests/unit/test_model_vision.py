"""InternViT pieces and pixel shuffle, with test vectors computed by the reference's code."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.model.projector import pixel_shuffle
from vlpretrain.model.vision import DropPath, InternViT
from vlpretrain.model.vlm import num_image_tokens
from vlpretrain.testing.components import TINY_VISION


def _arange_grid():
    # x(1, 4, 4, 2): patch (r, q) holds channels [2 * (4r + q), 2 * (4r + q) + 1].
    return torch.arange(32).reshape(1, 4, 4, 2)


def test_pixel_shuffle_v2_matches_appendix_a():
    out = pixel_shuffle(_arange_grid(), 0.5, "v2")

    assert out.shape == (1, 2, 2, 8)
    # token (0, 0) = [x(0,0), x(0,1), x(1,0), x(1,1)]
    assert out[0, 0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    # token (0, 1) = [x(0,2), x(0,3), x(1,2), x(1,3)]
    assert out[0, 0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    # token (1, 0) = [x(2,0), x(2,1), x(3,0), x(3,1)]
    assert out[0, 1, 0].tolist() == [16, 17, 18, 19, 24, 25, 26, 27]
    # Row-major flattening: index 1 is token (0, 1).
    assert out.reshape(1, 4, 8)[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_pixel_shuffle_v1_is_column_major():
    out = pixel_shuffle(_arange_grid(), 0.5, "v1").reshape(1, 4, 8)

    # Flat index j * 2 + i: index 1 is token (i=1, j=0) = [x(2,0), x(2,1), x(3,0), x(3,1)].
    assert out[0, 1].tolist() == [16, 17, 18, 19, 24, 25, 26, 27]
    assert out[0, 2].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert out[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_pixel_shuffle_rejects_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(torch.zeros(1, 4, 4, 2), version="v3")


def test_num_image_tokens():
    assert num_image_tokens(448, 14, 0.5) == 256  # (448/14)^2 * 0.25 = 1024 / 4
    assert num_image_tokens(56, 14, 0.5) == 4  # (56/14)^2 * 0.25 = 16 / 4


def test_image_features_pixel_shuffle_the_patch_grid(tiny_model):
    model = tiny_model.model.eval()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        features = model.image_features(pixels)
        hidden = model.vision_model(pixels)[:, 1:].reshape(2, 4, 4, 64)  # drop CLS
        expected = model.projector(pixel_shuffle(hidden).reshape(2, 4, 256))

    assert features.shape == (2, 4, 64)
    assert torch.equal(features, expected)


def test_drop_path_rates_are_linear_over_layers(tiny_components):
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=56,
            drop_path_rate=0.2,
        )
    )
    layers = built.model.vision_model.encoder.layers

    # rate * i / (L - 1) with L = 2: [0, 0.2]
    assert [layer.drop_path1.rate for layer in layers] == pytest.approx([0.0, 0.2])
    assert [layer.drop_path2.rate for layer in layers] == pytest.approx([0.0, 0.2])

    vision = built.model.vision_model.eval()
    pixels = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(1)
        first = vision(pixels)
        torch.manual_seed(2)
        second = vision(pixels)
    assert torch.equal(first, second)


def test_the_tower_builds_on_the_meta_device_with_its_drop_path_rates():
    # Parameter counts of real shapes (bench/stage_memory.py) come from a meta build.
    config = dataclasses.replace(TINY_VISION, drop_path_rate=0.2)
    with torch.device("meta"):
        tower = InternViT(config)

    assert all(p.device.type == "meta" for p in tower.parameters())
    assert [layer.drop_path1.rate for layer in tower.encoder.layers] == pytest.approx([0.0, 0.2])


def test_drop_path_drops_whole_samples_and_rescales():
    drop = DropPath(0.5).train()
    x = torch.ones(64, 3, 2)
    torch.manual_seed(0)

    out = drop(x)

    # Kept samples are scaled by 1 / (1 - 0.5) = 2, dropped ones are 0, per sample.
    per_sample = out.reshape(64, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(per_sample.min(dim=1).values, per_sample.max(dim=1).values)
    assert drop.eval()(x) is x
    assert DropPath(0.0).train()(x) is x


def test_select_layer_picks_embeddings_or_layer_outputs(tiny_model):
    vision = tiny_model.model.vision_model.eval()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        embeddings = vision.embeddings(pixels)
        after_first = vision.encoder.layers[0](embeddings)
        after_last = vision.encoder.layers[1](after_first)

        assert embeddings.shape == (1, 17, 64)  # CLS + 4 * 4 patches
        assert torch.equal(vision(pixels, select_layer=0), embeddings)
        assert torch.equal(vision(pixels, select_layer=-1), after_last)
        assert torch.equal(vision(pixels, select_layer=2), after_last)
        # hidden_states[-2] of the reference = output of the first of the two layers.
        assert torch.equal(vision(pixels, select_layer=-2), after_first)
        assert torch.equal(vision(pixels, select_layer=1), after_first)


def test_vision_select_layer_reaches_the_projector(tiny_components):
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=56,
            vision_select_layer=0,
        )
    )
    model = built.model.eval()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        grid = model.vision_model.embeddings(pixels)[:, 1:].reshape(1, 4, 4, 64)
        expected = model.projector(pixel_shuffle(grid).reshape(1, 4, 256))
        assert torch.equal(model.image_features(pixels), expected)
