"""Freeze policy: exact trainable sets per stage, eval mode, no frozen grads."""

from __future__ import annotations

import pytest
import torch

from vlpretrain.train.freeze import (
    FreezeConfig,
    apply_freeze_policy,
    apply_train_mode,
    log_trainable,
    trainable_counts,
)

PROJECTOR = {
    f"projector.{module}.{kind}" for module in ("norm", "fc1", "fc2") for kind in ("weight", "bias")
}


def _names(model, prefix=""):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model, flags):
    apply_freeze_policy(model, FreezeConfig(**flags))
    return model


def test_stage1_trains_only_the_projector(tiny_model):
    model = _frozen(tiny_model.model, {"freeze_backbone": True, "freeze_llm": True})

    assert _trainable(model) == PROJECTOR
    # LayerNorm 2 * 256 + Linear 256 * 64 + 64 + Linear 64 * 64 + 64
    #   = 512 + 16384 + 64 + 4096 + 64 = 21120
    assert trainable_counts(model)["projector"] == (21120, 21120)
    assert log_trainable(model) == 21120


def test_stage1_5_trains_vision_and_projector(tiny_model):
    model = _frozen(tiny_model.model, {"freeze_llm": True})

    assert _trainable(model) == _names(model, "vision_model.") | PROJECTOR


def test_stage2_trains_everything(tiny_model):
    model = _frozen(tiny_model.model, {})

    assert _trainable(model) == _names(model)


def test_unfreeze_vit_layers_unfreezes_only_the_last_layer(tiny_model):
    model = _frozen(
        tiny_model.model, {"freeze_backbone": True, "freeze_llm": True, "unfreeze_vit_layers": 1}
    )

    last_layer = _names(model, "vision_model.encoder.layers.1.")
    assert len(last_layer) == 14  # ls1, ls2, qkv, proj, fc1, fc2, norm1, norm2 (+ biases)
    assert _trainable(model) == PROJECTOR | last_layer


def test_negative_unfreeze_vit_layers_counts_from_the_end(tiny_model):
    model = _frozen(
        tiny_model.model, {"freeze_backbone": True, "freeze_llm": True, "unfreeze_vit_layers": -2}
    )

    assert _trainable(model) == PROJECTOR | _names(model, "vision_model.encoder.layers.")


def test_unfreeze_lm_head_with_frozen_llm(tiny_model):
    model = _frozen(
        tiny_model.model, {"freeze_backbone": True, "freeze_llm": True, "unfreeze_lm_head": True}
    )

    # The head is untied, so the input embeddings stay frozen.
    assert _trainable(model) == PROJECTOR | {"language_model.lm_head.weight"}


def test_freeze_mlp(tiny_model):
    model = _frozen(tiny_model.model, {"freeze_mlp": True})

    assert _trainable(model) == _names(model) - PROJECTOR


def test_nothing_trainable_is_an_error(tiny_model):
    model = _frozen(
        tiny_model.model, {"freeze_backbone": True, "freeze_llm": True, "freeze_mlp": True}
    )

    assert _trainable(model) == set()
    with pytest.raises(ValueError, match="no trainable parameter"):
        log_trainable(model)


def test_llm_lora_trains_only_adapters_and_projector(tiny_model):
    model = _frozen(
        tiny_model.model, {"freeze_backbone": True, "freeze_llm": True, "use_llm_lora": 4}
    )
    trainable = _trainable(model)
    lora = trainable - PROJECTOR

    assert PROJECTOR <= trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in lora)
    # 2 layers x 7 targets (q, k, v, o, gate, up, down) x (A, B) = 28
    assert len(lora) == 28
    assert all(n.startswith("language_model.base_model.model.model.layers.") for n in lora)
    q_a = "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert dict(model.named_parameters())[q_a].shape == (4, 64)


def test_train_mode_keeps_frozen_components_in_eval(tiny_model):
    model = _frozen(tiny_model.model, {"freeze_backbone": True, "freeze_llm": True})
    model.eval()

    apply_train_mode(model)

    assert model.training
    assert model.projector.training
    assert not any(m.training for m in model.vision_model.modules())
    assert not any(m.training for m in model.language_model.modules())


def test_train_mode_with_nothing_frozen_trains_everything(tiny_model):
    model = _frozen(tiny_model.model, {})
    model.eval()

    apply_train_mode(model)

    assert all(m.training for m in model.modules())


def test_stage1_backward_leaves_frozen_grads_none(tiny_model, make_vlm_batch):
    model = _frozen(tiny_model.model, {"freeze_backbone": True, "freeze_llm": True})
    apply_train_mode(model)
    batch = make_vlm_batch(tiny_model)

    out = model(**batch)
    (out.loss_sum / out.weight_sum).backward()

    for name, parameter in model.named_parameters():
        if name in PROJECTOR:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    assert model.projector.fc2.weight.grad.abs().sum() > 0


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
