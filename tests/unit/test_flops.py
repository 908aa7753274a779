"""Model FLOPs per step: hand-checked formula values, and no weight-gradient FLOPs when frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_fixtures import TILE, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.flops import (
    ComponentShape,
    FlopsCounter,
    build_flops_counter,
    component_shape,
    peak_tflops,
)
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy


def toy_counter(vision_trains: bool, llm_trains: bool) -> FlopsCounter:
    return FlopsCounter(
        vision=ComponentShape(100, 1.0 if vision_trains else 0.0, vision_trains, 1, 2),
        projector=ComponentShape(10, 1.0, True),
        llm=ComponentShape(1000, 1.0 if llm_trains else 0.0, llm_trains, 2, 4),
        head=ComponentShape(50, 1.0 if llm_trains else 0.0, llm_trains),
        vision_tokens_per_tile=3,
        image_tokens_per_tile=2,
    )


def test_toy_forward_flops_by_hand():
    # 2 tiles, two packed samples of 3 and 1 tokens, 2 supervised positions; nothing trains
    # upstream of the projector and the LLM is frozen (stage 1).
    flops = toy_counter(vision_trains=False, llm_trains=False).step_flops(2, [3, 1], 2)
    # vision: 2 * 100 weights * (2 tiles * 3 tokens) + 4 * 1 layer * 2 hidden * 2 tiles * 3^2
    #       = 1200 + 144 = 1344, forward only (no gradient reaches it)
    assert flops["vision"] == 1344
    # projector: forward 2 * 10 * (2 tiles * 2 tokens) = 80; trains: + input grad + weight grad
    assert flops["projector"] == 3 * 80
    # llm: 2 * 1000 * 4 tokens + 2 * 2 layers * 4 hidden * (3^2 + 1^2) = 8000 + 160 = 8160;
    # frozen but downstream of the projector: forward + input gradient, no weight gradient
    assert flops["llm"] == 2 * 8160
    # head: 2 * 50 * 2 supervised positions = 200, forward + input gradient
    assert flops["head"] == 2 * 200


def test_toy_all_trainable_costs_three_forwards():
    flops = toy_counter(vision_trains=True, llm_trains=True).step_flops(2, [3, 1], 2)
    assert flops == {"vision": 3 * 1344, "projector": 3 * 80, "llm": 3 * 8160, "head": 3 * 200}


def test_attention_is_counted_per_packed_sample():
    counter = toy_counter(vision_trains=False, llm_trains=False)
    one_long = counter.step_flops(0, [4], 0)["llm"]
    two_short = counter.step_flops(0, [2, 2], 0)["llm"]
    # Same 4 tokens; attention 2*2*4*(16) = 256 vs 2*2*4*(4+4) = 128, doubled for backward.
    assert one_long - two_short == 2 * (256 - 128)


def test_component_shape_counts_linear_weights_and_trainable_share():
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    module[2].weight.requires_grad_(False)
    shape = component_shape(module, layers=1, hidden=8)
    # Matmul weights: 4*8 + 8*2 = 48 (biases and the norm excluded); trainable 32 of 48.
    assert shape.matmul_params == 48
    assert shape.trainable_fraction == pytest.approx(32 / 48)
    assert shape.trains is True
    for p in module.parameters():
        p.requires_grad_(False)
    assert component_shape(module).trains is False
    assert component_shape(module).trainable_fraction == 0.0


def tiny_counter(train_assets, freeze: FreezeConfig) -> FlopsCounter:  # noqa: F811
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vision_path=str(train_assets.components.vision_path),
            llm_path=str(train_assets.components.llm_path),
            force_image_size=TILE,
        )
    ).model
    apply_freeze_policy(model, freeze)
    return build_flops_counter(model)


# Linear weights of the tiny model (ViT 2 x 64-wide, 128 MLP; Qwen2 2 x 64-wide, 4 heads,
# 2 KV heads of 16, 128 MLP; projector LN(256) -> 256x64 -> 64x64):
VIT_MATMUL = 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64)  # qkv, proj, fc1, fc2 = 65,536
PROJECTOR_MATMUL = 256 * 64 + 64 * 64  # 20,480
LLM_MATMUL = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, MLP = 73,728


def test_tiny_model_shapes(train_assets):  # noqa: F811
    counter = tiny_counter(train_assets, FreezeConfig())
    assert counter.vision.matmul_params == VIT_MATMUL == 65536
    assert counter.projector.matmul_params == PROJECTOR_MATMUL == 20480
    assert counter.llm.matmul_params == LLM_MATMUL == 73728
    vocab = counter.head.matmul_params // 64
    assert counter.head.matmul_params == vocab * 64
    # 28-px tiles at patch 14: 2x2 patches + class token = 5 ViT tokens, 1 LLM token per tile.
    assert (counter.vision_tokens_per_tile, counter.image_tokens_per_tile) == (5, 1)
    assert (counter.vision.layers, counter.vision.hidden) == (2, 64)
    assert (counter.llm.layers, counter.llm.hidden) == (2, 64)


def test_frozen_parts_cost_no_weight_gradient_flops(train_assets):  # noqa: F811
    stage1 = tiny_counter(train_assets, FreezeConfig(freeze_backbone=True, freeze_llm=True))
    stage2 = tiny_counter(train_assets, FreezeConfig())
    tiles, segments, supervised = 3, [10, 6], 4
    vocab = stage2.head.matmul_params // 64

    # Forward FLOPs, worked out:
    vision = 2 * VIT_MATMUL * 3 * 5 + 4 * 2 * 64 * 3 * 5**2  # 1,966,080 + 38,400 = 2,004,480
    projector = 2 * PROJECTOR_MATMUL * 3 * 1  # 122,880
    llm = 2 * LLM_MATMUL * 16 + 2 * 2 * 64 * (10**2 + 6**2)  # 2,359,296 + 34,816 = 2,394,112
    head = 2 * vocab * 64 * supervised
    assert (vision, projector, llm) == (2004480, 122880, 2394112)

    one = stage1.step_flops(tiles, segments, supervised)
    # Stage 1 trains only the projector: the frozen ViT runs forward only; the frozen LLM and
    # head pass gradients back to the projector (input gradient) but compute no weight gradient.
    assert one == {"vision": vision, "projector": 3 * projector, "llm": 2 * llm, "head": 2 * head}
    two = stage2.step_flops(tiles, segments, supervised)
    assert two == {
        "vision": 3 * vision,
        "projector": 3 * projector,
        "llm": 3 * llm,
        "head": 3 * head,
    }
    # The whole difference: ViT input + weight gradients, LLM and head weight gradients.
    assert sum(two.values()) - sum(one.values()) == 2 * vision + llm + head


def test_partially_unfrozen_vit_pays_for_its_share(train_assets):  # noqa: F811
    counter = tiny_counter(
        train_assets, FreezeConfig(freeze_backbone=True, freeze_llm=True, unfreeze_vit_layers=1)
    )
    # One of two identical ViT layers trains: half of its matmul weights get gradients.
    assert counter.vision.trainable_fraction == pytest.approx(0.5)
    vision = 2 * VIT_MATMUL * 1 * 5 + 4 * 2 * 64 * 1 * 25
    assert counter.step_flops(1, [8], 2)["vision"] == pytest.approx(vision * (1 + 1 + 0.5))


def test_peak_tflops_override_and_cpu_measurement():
    assert peak_tflops(torch.device("cpu"), override=12.5) == 12.5
    assert peak_tflops(torch.device("cpu")) > 0.0
