"""AdamW parameter groups (decay on matrices only) and the LR schedule at fixed steps."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.distributed as dist
import torch.optim.adam as adam_module  # AdamW's kernels, looked up at each step
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from train_fixtures import TILE, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.distributed.env import DistEnv
from vlpretrain.distributed.parallel import DistConfig, parallelize
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy
from vlpretrain.train.optim import (
    OptimConfig,
    adamw_implementation,
    build_optimizer,
    build_scheduler,
    decays,
    log_parameter_groups,
    module_of,
    parameter_groups,
    scheduled_learning_rates,
    vision_layer_id,
    vision_layer_scale,
    warmup_steps,
)


def schedule(config: OptimConfig, max_steps: int) -> list[float]:
    """LR multiplier used by optimizer steps 1..max_steps (base LR 1.0), as the loop sees it:
    read get_last_lr(), then step the scheduler."""
    parameter = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=config.learning_rate)
    scheduler = build_scheduler(optimizer, config, max_steps)
    values = []
    for _ in range(max_steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    values.append(scheduler.get_last_lr()[0])  # after the last step
    return values


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def test_cosine_with_warmup_steps():
    # W = 2 warmup steps, N = 6: linear from 0 over W, then 0.5 * (1 + cos(pi * (s - W) / (N - W))).
    values = schedule(OptimConfig(learning_rate=1.0, warmup_steps=2), max_steps=6)
    expected = [
        0.0,  # s = 0: 0 / 2
        0.5,  # s = 1: 1 / 2
        1.0,  # s = 2: cos(0)
        cosine(1 / 4),  # 0.8535...
        0.5,  # cosine(2 / 4) = 0.5 * (1 + 0)
        cosine(3 / 4),  # 0.1464...
        0.0,  # cosine(1) = 0
    ]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[3] == pytest.approx(0.8535533905932737)
    assert values[5] == pytest.approx(0.1464466094067262)


def test_schedule_scales_the_base_learning_rate():
    values = schedule(OptimConfig(learning_rate=2e-3, warmup_steps=2), max_steps=6)
    # The tiny e2e run logs these LRs: 0, 1e-3, 2e-3, 1.707e-3, 1e-3, 2.929e-4.
    assert values[:6] == pytest.approx(
        [0.0, 1e-3, 2e-3, 2e-3 * cosine(0.25), 1e-3, 2e-3 * cosine(0.75)], abs=1e-15
    )


def test_linear_with_warmup():
    values = schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="linear"), max_steps=6
    )
    # After warmup: (N - s) / (N - W) = (6 - s) / 4.
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-12)


def test_constant_with_warmup():
    values = schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="constant"), max_steps=5
    )
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0], abs=1e-12)


def test_no_warmup_starts_at_the_full_rate():
    values = schedule(OptimConfig(learning_rate=1.0), max_steps=4)
    assert values == pytest.approx([1.0, cosine(1 / 4), 0.5, cosine(3 / 4), 0.0], abs=1e-12)


@pytest.mark.parametrize(
    ("ratio", "max_steps", "expected"),
    [
        (0.03, 5500, 165),  # ceil(165.0)
        (0.03, 22000, 660),  # ceil(660.0)
        (0.1, 25, 3),  # ceil(2.5)
        (0.03, 10, 1),  # ceil(0.3)
        (0.0, 100, 0),
    ],
)
def test_warmup_ratio_is_ceil_of_ratio_times_steps(ratio, max_steps, expected):
    assert warmup_steps(OptimConfig(warmup_ratio=ratio), max_steps) == expected


def test_warmup_steps_win_over_warmup_ratio():
    assert warmup_steps(OptimConfig(warmup_steps=7, warmup_ratio=0.5), 100) == 7


def test_scheduler_uses_the_ratio_derived_warmup():
    # ceil(0.25 * 10) = 3 warmup steps: 0, 1/3, 2/3, then cosine over the remaining 7.
    values = schedule(OptimConfig(learning_rate=1.0, warmup_ratio=0.25), max_steps=10)
    assert values[:5] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, cosine(1 / 7)], abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"lr_vision": -1e-5}, "optim.lr_vision must be a finite number >= 0, got -1e-05"),
        ({"lr_projector": math.inf}, "optim.lr_projector must be a finite number >= 0"),
        ({"lr_llm": math.nan}, "optim.lr_llm must be a finite number >= 0, got nan"),
        ({"vision_layer_decay": 0.0}, r"optim.vision_layer_decay must be in \(0, 1\], got 0.0"),
        ({"vision_layer_decay": 1.5}, r"optim.vision_layer_decay must be in \(0, 1\], got 1.5"),
    ],
)
def test_invalid_optim_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)


def test_zero_module_rate_and_full_decay_are_valid():
    config = OptimConfig(learning_rate=1e-3, lr_vision=0.0, vision_layer_decay=1.0)
    assert config.module_learning_rates() == {"vision": 0.0, "projector": 1e-3, "llm": 1e-3}


def test_every_rate_problem_is_reported_at_once():
    with pytest.raises(ValueError) as caught:
        OptimConfig(lr_vision=-1.0, lr_llm=-2.0, vision_layer_decay=2.0)
    assert str(caught.value) == (
        "optim.lr_vision must be a finite number >= 0, got -1.0; "
        "optim.lr_llm must be a finite number >= 0, got -2.0; "
        "optim.vision_layer_decay must be in (0, 1], got 2.0"
    )


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("language_model.model.layers.0.self_attn.q_proj.weight", (64, 64), True),
        ("vision_model.embeddings.patch_embedding.weight", (64, 3, 14, 14), True),
        ("language_model.model.embed_tokens.weight", (393, 64), True),
        ("language_model.model.layers.0.self_attn.q_proj.bias", (64,), False),
        ("language_model.model.norm.weight", (64,), False),
        ("vision_model.encoder.layers.0.ls1", (64,), False),
        ("vision_model.embeddings.position_embedding", (1, 5, 64), False),
        ("vision_model.embeddings.class_embedding", (1, 1, 64), False),
    ],
)
def test_decays_only_weight_matrices(name, shape, expected):
    assert decays(name, torch.empty(shape)) is expected


@pytest.fixture
def tiny_vlm(train_assets):  # noqa: F811
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            vision_path=str(train_assets.components.vision_path),
            llm_path=str(train_assets.components.llm_path),
            force_image_size=TILE,
        )
    ).model


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple]:
    """{group name: (peak lr, weight decay, names of its parameters)}."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        g["name"]: (g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
        for g in optimizer.param_groups
    }


def decay_split(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, set]]:
    """(weight decay, parameter names) of the decayed, then the undecayed parameters, over
    every module's groups."""
    by_decay: dict[float, set] = {}
    for _, weight_decay, names in group_names(model, optimizer).values():
        by_decay.setdefault(weight_decay, set()).update(names)
    return sorted(by_decay.items(), reverse=True)


def test_optimizer_groups_on_the_tiny_model(tiny_vlm):
    optimizer = build_optimizer(tiny_vlm, OptimConfig(weight_decay=0.05))
    (decay, decayed), (no_decay, kept) = decay_split(tiny_vlm, optimizer)
    assert (decay, no_decay) == (0.05, 0.0)
    assert decayed.isdisjoint(kept)
    assert decayed | kept == {n for n, _ in tiny_vlm.named_parameters()}
    params = dict(tiny_vlm.named_parameters())
    assert all(params[n].ndim >= 2 for n in decayed)
    assert all(params[n].ndim < 2 or "embedding" in n for n in kept)
    assert {
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.encoder.layers.0.norm1.weight",
        "vision_model.encoder.layers.0.ls1",
        "projector.norm.weight",
        "projector.fc1.bias",
        "language_model.model.norm.weight",
        "language_model.model.layers.1.input_layernorm.weight",
    } <= kept
    assert {
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.1.attn.qkv.weight",
        "projector.fc1.weight",
        "projector.fc2.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    } <= decayed


def test_optimizer_holds_exactly_the_trainable_parameters(tiny_vlm):
    apply_freeze_policy(
        tiny_vlm, FreezeConfig(freeze_backbone=True, freeze_llm=True, unfreeze_vit_layers=1)
    )
    optimizer = build_optimizer(tiny_vlm, OptimConfig())
    (decay, decayed), (no_decay, kept) = decay_split(tiny_vlm, optimizer)
    assert (decay, no_decay) == (0.01, 0.0)
    trainable = {n for n, p in tiny_vlm.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept
    # Only matrices decay: the two projector Linears and the last ViT layer's four Linears.
    layer = "vision_model.encoder.layers.1"
    linears = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert decayed == {"projector.fc1.weight", "projector.fc2.weight"} | {
        f"{layer}.{m}.weight" for m in linears
    }
    layer_vectors = {f"{layer}.{m}.bias" for m in linears} | {
        f"{layer}.{n}" for n in ("ls1", "ls2", "norm1.weight", "norm1.bias", "norm2.weight",
                                 "norm2.bias")
    }  # fmt: skip
    assert kept == {"projector.norm.weight", "projector.norm.bias", "projector.fc1.bias",
                    "projector.fc2.bias"} | layer_vectors  # fmt: skip
    # Projector: 256*64 + 64*64 matrices + (256 + 256 + 64 + 64) vectors = 21,120.
    # ViT layer (64 wide, MLP 128): 64*192 + 64*64 + 64*128 + 128*64 = 32,768 in matrices,
    # 192 + 64 + 128 + 64 biases + 4 * 64 norm + 2 * 64 layer scale = 832 in vectors.
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert total == 21120 + 32768 + 832 == 54720


RATES = OptimConfig(learning_rate=1e-3, lr_vision=1e-5, lr_projector=1e-4, lr_llm=2e-5)
"""Every module at a rate of its own (powers of ten: no float noise in the expected values)."""

STAGE_FREEZES = {
    "stage 1": FreezeConfig(freeze_backbone=True, freeze_llm=True),  # projector only
    "stage 1.5": FreezeConfig(freeze_llm=True),  # vision + projector
    "stage 2": FreezeConfig(),  # everything
}


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("stage 1", {"projector": 1e-4}),
        ("stage 1.5", {"vision": 1e-5, "projector": 1e-4}),
        ("stage 2", {"vision": 1e-5, "projector": 1e-4, "llm": 2e-5}),
    ],
)
def test_each_trained_module_gets_its_own_groups_and_rate(tiny_vlm, stage, expected):
    apply_freeze_policy(tiny_vlm, STAGE_FREEZES[stage])
    optimizer = build_optimizer(tiny_vlm, RATES)
    groups = group_names(tiny_vlm, optimizer)
    # Frozen modules get no group; each trained one a decay and a no-decay group.
    assert list(groups) == [f"{m}.{kind}" for m in expected for kind in ("decay", "no_decay")]
    params = dict(tiny_vlm.named_parameters())
    for name, (lr, weight_decay, names) in groups.items():
        module, kind = name.split(".")
        assert lr == expected[module], name
        # The weight-decay rule holds in every module: matrices decay, nothing else does.
        assert weight_decay == (0.01 if kind == "decay" else 0.0), name
        assert all(decays(n, params[n]) is (kind == "decay") for n in names), name
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set().union(*(names for _, _, names in groups.values())) == trainable


def test_default_rates_are_the_learning_rate_for_every_module(tiny_vlm):
    optimizer = build_optimizer(tiny_vlm, OptimConfig(learning_rate=3e-4))
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {
        f"{m}.{kind}": 3e-4
        for m in ("vision", "projector", "llm")
        for kind in ("decay", "no_decay")
    }


def test_vision_layer_decay_scales_each_vit_block(tiny_vlm):
    # The tiny ViT has N = 2 blocks. decay 0.5, lr_vision 0.8 (exact in binary):
    # embeddings 0.8 * 0.5^3 = 0.1, block 0: 0.8 * 0.5^2 = 0.2, block 1: 0.8 * 0.5^1 = 0.4.
    config = OptimConfig(lr_vision=0.8, lr_projector=1.0, lr_llm=1.0, vision_layer_decay=0.5)
    groups = group_names(tiny_vlm, build_optimizer(tiny_vlm, config))
    rates = {name: lr for name, (lr, _, _) in groups.items()}
    assert rates == {
        "vision.embeddings.decay": 0.1,
        "vision.embeddings.no_decay": 0.1,
        "vision.layer0.decay": 0.2,
        "vision.layer0.no_decay": 0.2,
        "vision.layer1.decay": 0.4,
        "vision.layer1.no_decay": 0.4,
        "projector.decay": 1.0,
        "projector.no_decay": 1.0,
        "llm.decay": 1.0,
        "llm.no_decay": 1.0,
    }
    assert groups["vision.embeddings.decay"][2] == {
        "vision_model.embeddings.patch_embedding.weight"
    }
    assert groups["vision.embeddings.no_decay"][2] == {
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.class_embedding",
    }
    assert all(
        n.startswith("vision_model.encoder.layers.1.") for n in groups["vision.layer1.decay"][2]
    )


@pytest.mark.parametrize(
    ("name", "layer_id"),
    [
        ("vision_model.embeddings.patch_embedding.weight", 0),
        ("vision_model.embeddings.class_embedding", 0),
        ("vision_model.encoder.layers.0.attn.qkv.weight", 1),
        ("vision_model.encoder.layers.23.mlp.fc2.bias", 24),
        # DDP's prefix, a checkpointed block, a PEFT-wrapped tower with LoRA weights:
        ("module.vision_model.encoder.layers.5.norm1.weight", 6),
        ("vision_model.encoder.layers.7._checkpoint_wrapped_module.ls1", 8),
        ("vision_model.base_model.model.encoder.layers.3.attn.qkv.lora_A.default.weight", 4),
        ("vision_model.base_model.model.embeddings.position_embedding", 0),
        ("vision_model.final_norm.weight", 25),  # none in InternViT: above the 24 blocks
    ],
)
def test_vision_layer_id_counts_depth_as_internvl_does(name, layer_id):
    assert module_of(name) == "vision"
    assert vision_layer_id(name, num_blocks=24) == layer_id


def test_vision_layer_scale_of_a_24_block_vit():
    # InternViT-300M (N = 24), decay 0.9: block i gets 0.9^(24 - i), the embeddings 0.9^25,
    # the last block 0.9^1 (one step below lr_vision, as InternVL's optimizer has it).
    assert vision_layer_scale(0, 24, 0.9) == 0.9**25
    assert vision_layer_scale(1, 24, 0.9) == 0.9**24  # block 0
    assert vision_layer_scale(24, 24, 0.9) == 0.9  # block 23
    assert vision_layer_scale(25, 24, 0.9) == 1.0
    assert vision_layer_scale(13, 24, 1.0) == 1.0


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("vision_model.encoder.layers.0.attn.qkv.weight", "vision"),
        ("projector.fc1.weight", "projector"),
        ("module.projector.norm.bias", "projector"),
        ("language_model.model.embed_tokens.weight", "llm"),
        ("module.language_model.base_model.model.lm_head.weight", "llm"),
    ],
)
def test_module_of_a_parameter_name(name, module):
    assert module_of(name) == module


def test_a_parameter_outside_the_vlm_components_is_refused():
    with pytest.raises(ValueError, match="'head.weight' belongs to none of the VLM's components"):
        module_of("head.weight")


def test_frozen_vit_blocks_still_count_in_the_depth(tiny_vlm):
    # Stage 1.5 with only the last block trained: it keeps its depth (block 1 of 2, 0.5^1).
    apply_freeze_policy(
        tiny_vlm, FreezeConfig(freeze_backbone=True, freeze_llm=True, unfreeze_vit_layers=1)
    )
    config = OptimConfig(learning_rate=1.0, vision_layer_decay=0.5)
    rates = {g["name"]: g["lr"] for g in build_optimizer(tiny_vlm, config).param_groups}
    assert rates == {
        "vision.layer1.decay": 0.5,
        "vision.layer1.no_decay": 0.5,
        "projector.decay": 1.0,
        "projector.no_decay": 1.0,
    }


class StandInVLM(nn.Module):
    """InternVLModel's parameter names in miniature: ViT embeddings and blocks, projector, LLM."""

    def __init__(self, seed: int, num_blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        embeddings = nn.Module()
        embeddings.patch_embedding = nn.Linear(8, 8)
        embeddings.class_embedding = nn.Parameter(torch.randn(1, 8))
        encoder = nn.Module()
        encoder.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(num_blocks)
        )
        self.vision_model = nn.Module()
        self.vision_model.embeddings, self.vision_model.encoder = embeddings, encoder
        self.projector = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.language_model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        embeddings = self.vision_model.embeddings
        hidden = embeddings.patch_embedding(inputs) + embeddings.class_embedding
        for layer in self.vision_model.encoder.layers:
            hidden = layer(hidden)
        return self.language_model(self.projector(hidden))


def test_default_groups_step_like_the_former_two_groups():
    # Unset module rates and no layer decay: the per-module groups update every weight bit for
    # bit as the former optimizer did (one decay and one no-decay group over the whole model).
    config = OptimConfig(learning_rate=1e-2, weight_decay=0.1)
    model, reference = StandInVLM(seed=0), StandInVLM(seed=0)
    got = trained_parameters(model, build_optimizer(model, config))
    named = list(reference.named_parameters())
    former = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.1},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=1e-2,
        foreach=True,
    )
    expected = trained_parameters(reference, former)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_every_group_follows_the_schedule_from_its_own_peak():
    # Cosine with W = 2 warmup steps over N = 6 (as test_cosine_with_warmup_steps): every
    # group's lr is its peak times the one schedule, and the metrics report the same factor.
    config = OptimConfig(
        learning_rate=1.0,
        lr_vision=0.25,
        lr_projector=4.0,
        vision_layer_decay=0.5,
        warmup_steps=2,
    )
    model = StandInVLM(seed=0)
    optimizer = build_optimizer(model, config)
    peaks = {g["name"]: g["lr"] for g in optimizer.param_groups}
    # N = 2 ViT blocks: embeddings 0.25 * 0.5^3, block 0 0.25 * 0.5^2, block 1 0.25 * 0.5.
    assert peaks["vision.embeddings.decay"] == 0.03125
    assert peaks["vision.layer0.decay"] == 0.0625
    assert peaks["vision.layer1.no_decay"] == 0.125
    assert (peaks["projector.decay"], peaks["llm.decay"]) == (4.0, 1.0)
    scheduler = build_scheduler(optimizer, config, max_steps=6)
    factors = [0.0, 0.5, 1.0, cosine(1 / 4), 0.5, cosine(3 / 4)]
    for factor in factors:
        rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert rates == pytest.approx({name: peak * factor for name, peak in peaks.items()})
        assert scheduled_learning_rates(optimizer, scheduler, config) == pytest.approx(
            {"lr": factor, "lr/vision": 0.25 * factor, "lr/projector": 4.0 * factor,
             "lr/llm": factor}
        )  # fmt: skip
        optimizer.step()
        scheduler.step()


def test_metrics_carry_the_rates_of_trained_modules_only():
    model = StandInVLM(seed=0)
    for parameter in [*model.vision_model.parameters(), *model.language_model.parameters()]:
        parameter.requires_grad_(False)  # stage 1: the projector alone trains
    config = OptimConfig(learning_rate=2e-3, lr_projector=1e-3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, max_steps=4)
    # No warmup: step 1 runs at the peaks; `lr` stays learning_rate under the schedule.
    assert scheduled_learning_rates(optimizer, scheduler, config) == {
        "lr": 2e-3,
        "lr/projector": 1e-3,
    }
    assert scheduler.get_last_lr() == [1e-3, 1e-3]


def test_the_groups_are_logged_once_each(caplog):
    model = StandInVLM(seed=0)
    optimizer = build_optimizer(model, OptimConfig(lr_llm=5e-5, weight_decay=0.05))
    with caplog.at_level(logging.INFO, logger="vlpretrain.train.optim"):
        log_parameter_groups(optimizer)
    lines = [r.getMessage().split() for r in caplog.records]
    assert [line[2] for line in lines] == [
        "vision.decay",
        "vision.no_decay",
        "projector.decay",
        "projector.no_decay",
        "llm.decay",
        "llm.no_decay",
    ]
    # llm.decay: two 8x8 matrices = 128 parameters at 5e-5 with weight decay 0.05.
    assert lines[4][3:] == ["128", "params", "lr", "5.000e-05", "weight", "decay", "0.05"]
    # vision.no_decay: patch bias 8 + class embedding 8 + 2 blocks x (bias 8 + norm 16) = 64.
    assert lines[1][3] == "64"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_groups_of_the_wrapped_model_hold_its_parameters(one_rank_group, tiny_vlm, strategy):
    # Built on the wrapper's parameters (DDP prefixes names with `module.`, FSDP2 swaps in
    # DTensors): the same groups and rates as on the plain model.
    config = OptimConfig(lr_vision=1e-5, lr_projector=1e-4, lr_llm=2e-5, vision_layer_decay=0.5)
    plain = {g["name"]: (g["lr"], len(g["params"])) for g in parameter_groups(tiny_vlm, config)}
    if strategy == "ddp":
        wrapped: nn.Module = DistributedDataParallel(tiny_vlm)
    else:
        env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
        wrapped = parallelize(tiny_vlm, DistConfig(strategy="fsdp"), env)
    optimizer = build_optimizer(wrapped, config)
    assert {g["name"]: (g["lr"], len(g["params"])) for g in optimizer.param_groups} == plain
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in wrapped.parameters()}
    if strategy == "fsdp":
        assert all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def test_adamw_implementation_follows_the_device():
    # CUDA: one fused kernel per parameter group; anything else: foreach (a few multi-tensor
    # kernels instead of one small kernel per parameter tensor and operation).
    optimizer = build_optimizer(layered_model(seed=0), OptimConfig())
    assert all(g["foreach"] is True and not g["fused"] for g in optimizer.param_groups)
    assert adamw_implementation({"cuda"}) == {"fused": True, "foreach": False}
    assert adamw_implementation({"cpu"}) == {"fused": False, "foreach": True}
    assert adamw_implementation({"cpu", "cuda"}) == {"fused": False, "foreach": True}


class LayeredProjector(nn.Module):
    """A stand-in VLM whose one component is a projector of small blocks: build_optimizer
    picks each parameter's rate by the VLM component its name starts with."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            *(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()) for _ in range(num_layers))
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.projector(inputs)


def layered_model(seed: int, num_layers: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return LayeredProjector(num_layers)


def trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3):
    inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    inputs = inputs.to(next(model.parameters()).device)
    for _ in range(steps):
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]


def adamw_like(
    model: nn.Module, config: OptimConfig, **implementation: bool
) -> torch.optim.Optimizer:
    """build_optimizer's groups and settings, with the given implementation."""
    chosen = build_optimizer(model, config)
    # New group dicts: AdamW writes its defaults (foreach, fused) into the dicts it is given.
    groups = [
        {k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in chosen.param_groups
    ]
    return torch.optim.AdamW(groups, **implementation)


CONFIG = OptimConfig(learning_rate=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("implementation", [{"foreach": True}, {"fused": True}])
def test_implementations_step_like_the_for_loop(implementation):
    # On CPU: foreach is what build_optimizer picks here; fused is CUDA's pick, checked with
    # torch's CPU fused kernel (the CUDA one runs in the gpu test below).
    model, reference = layered_model(seed=0), layered_model(seed=0)
    chosen = adamw_like(model, CONFIG, **implementation)
    assert all(g[name] is True for g in chosen.param_groups for name in implementation)
    got = trained_parameters(model, chosen)
    expected = trained_parameters(reference, adamw_like(reference, CONFIG, foreach=False))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    if "foreach" in implementation:
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_foreach_steps_fsdp2_dtensor_parameters_bit_exactly(one_rank_group, monkeypatch):
    # FSDP2 (one rank, gloo) makes every parameter a DTensor; the foreach kernels accept them
    # and give the for-loop's values bit for bit.
    calls = {"foreach": 0, "for-loop": 0}
    for name, attribute in (("foreach", "_multi_tensor_adam"), ("for-loop", "_single_tensor_adam")):
        original = getattr(adam_module, attribute)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(adam_module, attribute, counted)
    models = []
    for _ in range(2):
        model = layered_model(seed=0)
        for layer in model.projector:
            fully_shard(layer)
        fully_shard(model)
        models.append(model)
    assert all(isinstance(p, DTensor) for p in models[0].parameters())
    chosen = build_optimizer(models[0], CONFIG)
    assert all(g["foreach"] is True for g in chosen.param_groups)
    got = trained_parameters(models[0], chosen)
    # 3 steps x 2 groups (decay / no decay), each through the kernel it asked for:
    assert calls == {"foreach": 6, "for-loop": 0}
    expected = trained_parameters(models[1], adamw_like(models[1], CONFIG, foreach=False))
    assert calls == {"foreach": 6, "for-loop": 6}
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_cuda_adamw_steps_like_the_for_loop():
    model, reference = layered_model(seed=0).cuda(), layered_model(seed=0).cuda()
    chosen = build_optimizer(model, CONFIG)
    assert all(g["fused"] is True for g in chosen.param_groups)
    got = trained_parameters(model, chosen)
    expected = trained_parameters(reference, adamw_like(reference, CONFIG, foreach=False))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_show_config_line_resolves_each_module_rate_and_the_layer_decay():
    config = OptimConfig(learning_rate=1e-4, lr_vision=2e-5, vision_layer_decay=0.9)
    assert config.describe_learning_rates() == (
        "learning rates (peak; an unset one is optim.learning_rate): vision 2e-05, "
        "projector 0.0001, llm 0.0001; ViT layer decay 0.9: of N blocks, block i (0-based) "
        "learns at lr_vision * 0.9^(N - i), the embeddings at lr_vision * 0.9^(N + 1)"
    )
