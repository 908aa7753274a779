"""Model FLOPs per step: hand-checked formula values, no weight-gradient FLOPs when frozen, only
real tokens and tiles counted, and the peak MFU is measured against."""

from __future__ import annotations

import logging

import pytest
import torch
from stream_fakes import FACTS, make_sample
from torch import nn
from train_fixtures import TILE, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.data.collate import collate_rows
from vlpretrain.data.packing import PackingConfig, PackItem, PackRow, PieceRef
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.flops import (
    ComponentShape,
    FlopsCounter,
    build_flops_counter,
    component_shape,
    known_peak,
    measure_gemm_tflops,
    peak_tflops,
)
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy
from vlpretrain.train.loop import StepResult, step_metrics


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
    # llm: matmuls 2 * 1000 * 4 tokens = 8000, causal attention 2 * 2 layers * 4 wide *
    # (3^2 + 1^2) = 160. Frozen but downstream of the projector: the matmuls cost forward +
    # input gradient, no weight gradient; attention has no weights and its backward (dQ, dK
    # from dS; dP, dV from dO) is two matmuls per forward one: 2 * 8000 + 3 * 160 = 16480.
    assert flops["llm"] == 2 * 8000 + 3 * 160 == 16480
    # head: 2 * 50 * 2 supervised positions = 200, forward + input gradient
    assert flops["head"] == 2 * 200


def test_toy_all_trainable_costs_three_forwards():
    flops = toy_counter(vision_trains=True, llm_trains=True).step_flops(2, [3, 1], 2)
    assert flops == {"vision": 3 * 1344, "projector": 3 * 80, "llm": 3 * 8160, "head": 3 * 200}


def test_attention_is_counted_per_packed_sample():
    counter = toy_counter(vision_trains=False, llm_trains=False)
    one_long = counter.step_flops(0, [4], 0)["llm"]
    two_short = counter.step_flops(0, [2, 2], 0)["llm"]
    # Same 4 tokens; attention 2*2*4*(16) = 256 vs 2*2*4*(4+4) = 128; the frozen LLM passes
    # gradients back to the projector, so attention costs forward + 2x forward for backward.
    assert one_long - two_short == 3 * (256 - 128)


def test_attention_backward_costs_twice_its_forward_wherever_backward_crosses():
    partial = FlopsCounter(
        vision=ComponentShape(100, 0.5, True, 1, 2),
        projector=ComponentShape(10, 1.0, True),
        llm=ComponentShape(1000, 0.25, True, 2, 4),
        head=ComponentShape(50, 1.0, True),
        vision_tokens_per_tile=3,
        image_tokens_per_tile=2,
    )
    flops = partial.step_flops(2, [3, 1], 2)
    # Half the ViT's matmul weights train: matmuls 1200 * (1 + 1 input grad + 0.5 weight grad)
    # = 3000; attention 144 * (1 + 2) = 432, whatever share of the weights trains.
    assert flops["vision"] == 1200 * 2.5 + 144 * 3 == 3432
    # A quarter of the LLM trains: 8000 * 2.25 + 160 * 3 = 18480.
    assert flops["llm"] == 8000 * 2.25 + 160 * 3 == 18480


def test_component_shape_counts_linear_weights_and_trainable_share():
    module = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    module[2].weight.requires_grad_(False)
    shape = component_shape(module, layers=1, attention_width=8)
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
    # Attention width is heads x head_dim: ViT 4 x 16, Qwen2 4 x 16.
    assert (counter.vision.layers, counter.vision.attention_width) == (2, 64)
    assert (counter.llm.layers, counter.llm.attention_width) == (2, 64)


def test_attention_width_is_heads_times_head_dim_not_hidden_size(train_assets, monkeypatch):  # noqa: F811
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            vision_path=str(train_assets.components.vision_path),
            llm_path=str(train_assets.components.llm_path),
            force_image_size=TILE,
        )
    ).model
    # As in Qwen3-0.6B (16 heads x 128 = 2048 wide attention in a 1024-wide model): 4 heads x
    # 32 = 128 while hidden_size stays 64. Only the config is read, so setting it is enough.
    monkeypatch.setattr(model.language_model.config, "head_dim", 32, raising=False)
    counter = build_flops_counter(model)
    assert counter.llm.attention_width == 128
    # One 10-token sample: causal attention 2 * 2 layers * 128 * 10^2 = 51,200 (not 25,600).
    matmuls = 2 * LLM_MATMUL * 10
    assert counter.step_flops(0, [10], 0)["llm"] == 3 * (matmuls + 51200)


def test_frozen_parts_cost_no_weight_gradient_flops(train_assets):  # noqa: F811
    stage1 = tiny_counter(train_assets, FreezeConfig(freeze_backbone=True, freeze_llm=True))
    stage2 = tiny_counter(train_assets, FreezeConfig())
    tiles, segments, supervised = 3, [10, 6], 4
    vocab = stage2.head.matmul_params // 64

    # Forward FLOPs, worked out:
    vision = 2 * VIT_MATMUL * 3 * 5 + 4 * 2 * 64 * 3 * 5**2  # 1,966,080 + 38,400 = 2,004,480
    projector = 2 * PROJECTOR_MATMUL * 3 * 1  # 122,880
    llm_matmuls = 2 * LLM_MATMUL * 16  # 2,359,296
    llm_attention = 2 * 2 * 64 * (10**2 + 6**2)  # 34,816
    llm = llm_matmuls + llm_attention
    head = 2 * vocab * 64 * supervised
    assert (vision, projector, llm) == (2004480, 122880, 2394112)

    one = stage1.step_flops(tiles, segments, supervised)
    # Stage 1 trains only the projector: the frozen ViT runs forward only; the frozen LLM and
    # head pass gradients back to the projector (input gradient; attention's backward is twice
    # its forward) but compute no weight gradient.
    assert one == {
        "vision": vision,
        "projector": 3 * projector,
        "llm": 2 * llm_matmuls + 3 * llm_attention,
        "head": 2 * head,
    }
    two = stage2.step_flops(tiles, segments, supervised)
    assert two == {
        "vision": 3 * vision,
        "projector": 3 * projector,
        "llm": 3 * llm,
        "head": 3 * head,
    }
    # The whole difference: ViT input + weight gradients, LLM and head weight gradients.
    assert sum(two.values()) - sum(one.values()) == 2 * vision + llm_matmuls + head


def test_partially_unfrozen_vit_pays_for_its_share(train_assets):  # noqa: F811
    counter = tiny_counter(
        train_assets, FreezeConfig(freeze_backbone=True, freeze_llm=True, unfreeze_vit_layers=1)
    )
    # One of two identical ViT layers trains: half of its matmul weights get gradients;
    # attention's backward is counted in full (twice its forward).
    assert counter.vision.trainable_fraction == pytest.approx(0.5)
    matmuls, attention = 2 * VIT_MATMUL * 1 * 5, 4 * 2 * 64 * 1 * 25
    assert counter.step_flops(1, [8], 2)["vision"] == pytest.approx(
        matmuls * (1 + 1 + 0.5) + attention * 3
    )


CUDA = torch.device("cuda")  # a device object only: nothing here touches a real GPU


def never_measure(device: torch.device) -> float:
    raise AssertionError(f"a known device or an override must not be measured ({device})")


@pytest.mark.parametrize(
    ("name", "entry", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H800", "H800 SXM", 989.4),
        ("NVIDIA H800 PCIe", "H800 PCIe", 756.0),
        ("NVIDIA H20", "H20", 148.0),
        ("NVIDIA H200", "H200", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA GH200 144G HBM3e", "GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA A800-SXM4-80GB", "A800", 312.0),
        ("NVIDIA B200", "B200", 2250.0),
        ("AMD Instinct MI300X", "MI300X", 1307.4),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ],
)
def test_peak_from_the_device_name(name, entry, tflops):
    # GH200 must not be caught by H200, H200 not by H20, A100 not by A10, PCIe / NVL H100s
    # not by the SXM entry.
    assert known_peak(name) == (entry, tflops)
    assert peak_tflops(CUDA, device_name=lambda _: name, measure=never_measure) == tflops


def test_unknown_gpu_peak_is_a_measured_bf16_gemm_and_logged_as_measured(caplog):
    caplog.set_level(logging.INFO, logger="vlpretrain.train.flops")
    peak = peak_tflops(CUDA, device_name=lambda _: "NVIDIA RTX PRO 6000", measure=lambda _: 321.0)
    assert known_peak("NVIDIA RTX PRO 6000") is None
    assert peak == 321.0
    assert "NVIDIA RTX PRO 6000" in caplog.text and "measured" in caplog.text


def test_peak_override_wins_over_table_and_measurement():
    assert (
        peak_tflops(CUDA, 500.0, device_name=lambda _: "NVIDIA H100", measure=never_measure)
        == 500.0
    )
    assert peak_tflops(torch.device("cpu"), override=12.5, measure=never_measure) == 12.5


def test_cpu_has_no_peak_unless_the_user_sets_one():
    # A CPU has no tensor-core peak to compare with (a small fp32 matmul "peak" gave MFU > 1).
    assert peak_tflops(torch.device("cpu"), measure=never_measure) == 0.0


def test_gemm_measurement_returns_achieved_tflops():
    # Runs on CPU here (fp32, tiny) only to check the arithmetic path; on a GPU it times bf16
    # 8192^3 products with a synchronize around the timed loop.
    achieved = measure_gemm_tflops(torch.device("cpu"), size=64, dtype=torch.float32, repeats=3)
    assert 0.0 < achieved < 100.0


def text_row(lengths: list[int], first_record: int = 0) -> PackRow:
    row = PackRow()
    for offset, length in enumerate(lengths):
        record = first_record + offset
        sample = make_sample(0, (), 2, line=record + 1, num_prompt=length - 2)
        row.append(PackItem(PieceRef.whole(sample, record, 0), sample))
    return row


def image_row(record: int) -> PackRow:
    row = PackRow()
    sample = make_sample(0, (1,), 10, line=record + 1)  # 2 + (1 + 4 + 1) + 10 = 18 tokens
    row.append(PackItem(PieceRef.whole(sample, record, 0), sample))
    return row


def metrics_of(batch, peak: float = 0.0, seconds: float = 1.0) -> dict:
    result = StepResult(loss=1.0, grad_norm=1.0, weight_sum=4.0, num_supervised=4)
    counter = toy_counter(vision_trains=True, llm_trains=True)
    return step_metrics(result, [batch], {"lr": 1e-3}, seconds, counter, peak, world_size=1)


def component_tflops(metrics: dict) -> dict[str, float]:
    return {k: metrics[f"tflops_{k}"] * 1e12 for k in ("vision", "projector", "llm", "head")}


def test_padding_segments_and_padding_tiles_cost_no_flops():
    # Strict mode: two rows of one 18-token, 1-tile sample, each padded to 128 tokens and
    # 4 tiles: cu_seqlens [0, 18, 128, 146, 256] and 6 padding tiles (flag 0).
    config = PackingConfig(max_packed_tokens=128, num_images_expected=4, strict_mode=True)
    batch = collate_rows([image_row(0), image_row(1)], config, FACTS, num_datasets=1)
    assert torch.diff(batch.cu_seqlens).tolist() == [18, 110, 18, 110]
    expected = toy_counter(vision_trains=True, llm_trains=True).step_flops(2, [18, 18], 4)
    assert component_tflops(metrics_of(batch)) == pytest.approx(expected, rel=1e-12)


def test_rows_of_other_lengths_and_the_dummy_tile_cost_no_flops():
    # Text only, two rows: [25, 30] and [20], so the second row is padded with a 35-token
    # segment up to the longer row's 55; one dummy tile runs the ViT but is not model work.
    config = PackingConfig(max_packed_tokens=64, num_images_expected=4)
    rows = [text_row([25, 30]), text_row([20], first_record=2)]
    batch = collate_rows(rows, config, FACTS, num_datasets=1)
    assert torch.diff(batch.cu_seqlens).tolist() == [25, 30, 20, 35]
    assert batch.stats.num_dummy_tiles == 1
    expected = toy_counter(vision_trains=True, llm_trains=True).step_flops(0, [25, 30, 20], 4)
    assert expected["vision"] == 0.0
    assert component_tflops(metrics_of(batch)) == pytest.approx(expected, rel=1e-12)


def test_mfu_is_model_flops_over_time_and_peak_and_absent_without_a_peak():
    config = PackingConfig(max_packed_tokens=64, num_images_expected=4)
    batch = collate_rows([text_row([25, 30])], config, FACTS, num_datasets=1)
    assert "mfu" not in metrics_of(batch, peak=0.0)
    flops = sum(
        toy_counter(vision_trains=True, llm_trains=True).step_flops(0, [25, 30], 4).values()
    )
    # MFU = FLOPs / seconds / (peak TFLOP/s * 1e12).
    mfu = metrics_of(batch, peak=2e-6, seconds=0.5)["mfu"]
    assert mfu == pytest.approx(flops / 0.5 / 2e6, rel=1e-12)
