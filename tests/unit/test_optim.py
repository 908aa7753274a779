"""AdamW parameter groups (decay on matrices only) and the LR schedule at fixed steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.optim.adam as adam_module  # AdamW's kernels, looked up at each step
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from train_fixtures import TILE, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy
from vlpretrain.train.optim import (
    OptimConfig,
    adamw_implementation,
    build_optimizer,
    build_scheduler,
    decays,
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
    ],
)
def test_invalid_optim_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)


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


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, set]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups
    ]


def test_optimizer_groups_on_the_tiny_model(tiny_vlm):
    optimizer = build_optimizer(tiny_vlm, OptimConfig(weight_decay=0.05))
    (decay, decayed), (no_decay, kept) = group_names(tiny_vlm, optimizer)
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
    (decay, decayed), (no_decay, kept) = group_names(tiny_vlm, optimizer)
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


def test_adamw_implementation_follows_the_device():
    # CUDA: one fused kernel per parameter group; anything else: foreach (a few multi-tensor
    # kernels instead of one small kernel per parameter tensor and operation).
    optimizer = build_optimizer(layered_model(seed=0), OptimConfig())
    assert all(g["foreach"] is True and not g["fused"] for g in optimizer.param_groups)
    assert adamw_implementation({"cuda"}) == {"fused": True, "foreach": False}
    assert adamw_implementation({"cpu"}) == {"fused": False, "foreach": True}
    assert adamw_implementation({"cpu", "cuda"}) == {"fused": False, "foreach": True}


def layered_model(seed: int, num_layers: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()) for _ in range(num_layers))
    )


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
        for layer in model:
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
