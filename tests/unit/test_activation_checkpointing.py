"""Activation checkpointing recomputes frozen layers too, without putting them in train mode.

Stage 1 trains only the projector: the ViT and LLM are frozen and kept in eval(), yet backward
runs through every LLM layer to reach the projector. transformers' own flag checkpoints only
modules in train mode, so there it saved every activation; our hooks recompute regardless.
"""

import torch

from vlpretrain.distributed.parallel import enable_activation_checkpointing
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy, apply_train_mode

STAGE1 = FreezeConfig(freeze_backbone=True, freeze_llm=True)


def _forward_counts(built, batch, checkpointing: bool) -> tuple[int, int, dict]:
    model = built.model
    apply_freeze_policy(model, STAGE1)
    enable_activation_checkpointing(model, vision=checkpointing, llm=checkpointing)
    apply_train_mode(model)
    counts = {"llm": 0, "vision": 0}
    layer = model.language_model.get_decoder().layers[0]
    # Pre-hooks: a recompute stops early once it has what backward needs (no post-hook).
    layer.register_forward_pre_hook(lambda *_: counts.__setitem__("llm", counts["llm"] + 1))
    vision_layer = model.vision_layers()[0]
    vision_layer.register_forward_pre_hook(
        lambda *_: counts.__setitem__("vision", counts["vision"] + 1)
    )
    out = model(**batch)
    out.loss_sum.backward()
    modes = {"llm": model.language_model.training, "vision": model.vision_model.training,
             "projector": model.projector.training}  # fmt: skip
    return counts["llm"], counts["vision"], modes


def test_frozen_llm_layers_are_recomputed_in_backward(tiny_model, make_vlm_batch):
    batch = make_vlm_batch(tiny_model)
    llm_calls, vision_calls, modes = _forward_counts(tiny_model, batch, checkpointing=True)
    # Forward once, then once more in backward: the frozen layer's activations were dropped.
    assert llm_calls == 2
    # Nothing upstream of the frozen ViT trains: no backward through it, no recompute.
    assert vision_calls == 1
    assert modes == {"llm": False, "vision": False, "projector": True}
    assert tiny_model.model.projector.fc1.weight.grad is not None


def test_without_checkpointing_each_layer_runs_once(tiny_model, make_vlm_batch):
    batch = make_vlm_batch(tiny_model)
    llm_calls, vision_calls, _ = _forward_counts(tiny_model, batch, checkpointing=False)
    assert (llm_calls, vision_calls) == (1, 1)


def test_checkpointing_keeps_parameter_names(tiny_model):
    names = [name for name, _ in tiny_model.model.named_parameters()]
    enable_activation_checkpointing(tiny_model.model, vision=True, llm=True)
    assert [name for name, _ in tiny_model.model.named_parameters()] == names


def test_checkpointed_gradients_equal_plain_ones(tiny_model, make_vlm_batch):
    """Stage-1 projector gradients with and without recomputation are bit-identical."""
    batch = make_vlm_batch(tiny_model)
    model = tiny_model.model
    apply_freeze_policy(model, STAGE1)
    apply_train_mode(model)
    model(**batch).loss_sum.backward()
    plain = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad(set_to_none=True)
    enable_activation_checkpointing(model, vision=True, llm=True)
    model(**batch).loss_sum.backward()
    for expected, parameter in zip(plain, model.projector.parameters(), strict=True):
        assert torch.equal(parameter.grad, expected)
