"""Activation checkpointing per tower: none, selective or full, without changing a gradient.

Stage 1 trains only the projector: the ViT and LLM are frozen and kept in eval(), yet backward
runs through every LLM layer to reach the projector. transformers' own flag checkpoints only
modules in train mode, so there it saved every activation; ours recomputes regardless.
`selective` keeps the matmul outputs and recomputes the cheap ops between them.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import TINY_TILE
from vlpretrain.config import TrainConfig
from vlpretrain.distributed.parallel import SAVED_OP_NAMES, enable_activation_checkpointing
from vlpretrain.flags import apply_reference_flags
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy, apply_train_mode

STAGE1 = FreezeConfig(freeze_backbone=True, freeze_llm=True)
MODES = ("none", "selective", "full")


def _forward_counts(built, batch, mode: str) -> tuple[int, int, dict]:
    model = built.model
    apply_freeze_policy(model, STAGE1)
    enable_activation_checkpointing(model, vision=mode, llm=mode)
    apply_train_mode(model)
    counts = {"llm": 0, "vision": 0}
    # Pre-hooks on a sublayer: the recompute runs the layer's forward, not its hooks, and it
    # stops early once it has what backward needs (the attention comes first).
    attention = model.language_model.get_decoder().layers[0].self_attn
    attention.register_forward_pre_hook(lambda *_: counts.__setitem__("llm", counts["llm"] + 1))
    vision_attention = model.vision_layers()[0].attn
    vision_attention.register_forward_pre_hook(
        lambda *_: counts.__setitem__("vision", counts["vision"] + 1)
    )
    out = model(**batch)
    out.loss_sum.backward()
    modes = {"llm": model.language_model.training, "vision": model.vision_model.training,
             "projector": model.projector.training}  # fmt: skip
    return counts["llm"], counts["vision"], modes


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_frozen_llm_layers_are_recomputed_in_backward(tiny_model, make_vlm_batch, mode):
    batch = make_vlm_batch(tiny_model)
    llm_calls, vision_calls, modes = _forward_counts(tiny_model, batch, mode)
    # Forward once, then once more in backward: the frozen layer's activations were dropped.
    assert llm_calls == 2
    # Nothing upstream of the frozen ViT trains: no backward through it, no recompute.
    assert vision_calls == 1
    assert modes == {"llm": False, "vision": False, "projector": True}
    assert tiny_model.model.projector.fc1.weight.grad is not None


def test_without_checkpointing_each_layer_runs_once(tiny_model, make_vlm_batch):
    batch = make_vlm_batch(tiny_model)
    llm_calls, vision_calls, _ = _forward_counts(tiny_model, batch, "none")
    assert (llm_calls, vision_calls) == (1, 1)


def test_checkpointing_keeps_parameter_names_and_state_dict(tiny_model):
    model = tiny_model.model
    names = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    enable_activation_checkpointing(model, vision="selective", llm="full")
    assert [name for name, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys


def test_a_layer_is_checkpointed_once(tiny_model):
    enable_activation_checkpointing(tiny_model.model, vision="full", llm="none")
    with pytest.raises(ValueError, match="already checkpointed"):
        enable_activation_checkpointing(tiny_model.model, vision="selective", llm="none")


def _loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tower", ["vision", "llm"])
@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_loss_and_gradients_equal_plain_ones(tiny_model, make_vlm_batch, tower, mode):
    """Every parameter trains (stage 2); CPU fp32 recomputes the same values bit for bit."""
    batch = make_vlm_batch(tiny_model)
    model = tiny_model.model
    apply_train_mode(model)
    plain_loss, plain = _loss_and_gradients(model, batch)
    modes = {"vision": "none", "llm": "none", tower: mode}
    enable_activation_checkpointing(model, **modes)
    loss, gradients = _loss_and_gradients(model, batch)
    assert torch.equal(loss, plain_loss)
    assert gradients.keys() == plain.keys()
    for name, gradient in gradients.items():
        assert torch.equal(gradient, plain[name]), name


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops run below autograd, GEMMs and attention apart from the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["saved" if func.name() in SAVED_OP_NAMES else "other"] += 1
        return func(*args, **(kwargs or {}))


def _op_counts(built, batch, mode: str) -> Counter[str]:
    model = built.model
    apply_train_mode(model)
    enable_activation_checkpointing(model, vision=mode, llm=mode)
    with _OpCounter() as counter:
        model(**batch).loss_sum.backward()
    return counter.counts


def test_selective_recomputes_the_cheap_ops_but_no_matmul(tiny_components, make_vlm_batch):
    counts = {}
    for mode in MODES:
        built = build_model(
            ModelConfig(
                vision_path=str(tiny_components.vision_path),
                llm_path=str(tiny_components.llm_path),
                force_image_size=TINY_TILE,
            )
        )
        counts[mode] = _op_counts(built, make_vlm_batch(built), mode)
    # Selective reruns no GEMM or attention kernel in backward (their outputs were kept)...
    assert counts["selective"]["saved"] == counts["none"]["saved"]
    assert counts["full"]["saved"] > counts["none"]["saved"]
    # ...but does rerun the norms, activations and elementwise ops, as full does.
    assert counts["selective"]["other"] > counts["none"]["other"]
    assert counts["full"]["other"] > counts["none"]["other"]


@pytest.mark.parametrize(
    ("grad_checkpoint", "llm_checkpointing", "resolved"),
    [
        (True, "auto", "full"),  # the default: the reference's --grad_checkpoint True
        (False, "auto", "none"),  # --grad_checkpoint False
        (True, "selective", "selective"),
        (True, "full", "full"),
        (False, "none", "none"),
    ],
)
def test_llm_checkpointing_follows_grad_checkpoint(grad_checkpoint, llm_checkpointing, resolved):
    config = TrainConfig(grad_checkpoint=grad_checkpoint, llm_checkpointing=llm_checkpointing)
    assert config.llm_checkpoint_mode == resolved


def test_defaults_checkpoint_both_towers_fully():
    config = TrainConfig()
    assert (config.vision_checkpointing, config.llm_checkpoint_mode) == ("full", "full")


@pytest.mark.parametrize(
    ("grad_checkpoint", "llm_checkpointing"),
    [(True, "none"), (False, "selective"), (False, "full")],
)
def test_grad_checkpoint_contradicting_llm_checkpointing_is_refused(
    grad_checkpoint, llm_checkpointing
):
    with pytest.raises(ValueError, match="train.grad_checkpoint .* contradicts"):
        TrainConfig(grad_checkpoint=grad_checkpoint, llm_checkpointing=llm_checkpointing)


@pytest.mark.parametrize(("text", "resolved"), [("True", "full"), ("False", "none")])
def test_reference_grad_checkpoint_flag_checkpoints_the_llm_fully_or_not(text, resolved):
    raw: dict = {}
    apply_reference_flags(raw, ["--grad_checkpoint", text])
    train = TrainConfig(**raw["train"])
    assert (train.vision_checkpointing, train.llm_checkpoint_mode) == ("full", resolved)
