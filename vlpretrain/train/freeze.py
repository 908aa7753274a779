"""Which parameters train in a stage: freeze flags, partial ViT unfreezing, lm_head, LoRA.

Order matches the reference: freeze_backbone, freeze_llm, unfreeze_lm_head,
backbone LoRA, LLM LoRA, freeze_mlp, unfreeze_vit_layers. Two reference bugs are fixed:
`unfreeze_lm_head` really makes the output head trainable, and `unfreeze_vit_layers = k`
unfreezes the *last k* layers (the reference used a Python slice, so k > 0 unfroze all
but the first k). Frozen modules are kept in eval mode for the whole run (`apply_train_mode`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from torch import nn
from transformers import PreTrainedModel

from vlpretrain.model.llm import LORA_TARGETS, llm_family
from vlpretrain.model.vision import InternViT
from vlpretrain.model.vlm import InternVLModel

logger = logging.getLogger(__name__)

VISION_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass(frozen=True, kw_only=True)
class FreezeConfig:
    """The stage's trainable set."""

    freeze_backbone: bool = False
    """Freeze the vision tower."""
    freeze_llm: bool = False
    """Freeze the language model (incl. embeddings and head)."""
    freeze_mlp: bool = False
    """Freeze the projector."""
    unfreeze_vit_layers: int = 0
    """Make the last k ViT layers trainable after freeze_backbone (k = |value|)."""
    unfreeze_lm_head: bool = False
    """Make the LLM's output head trainable after freeze_llm."""
    use_backbone_lora: int = 0
    """LoRA rank for the ViT (0: off); alpha = 2 * rank, dropout 0.05."""
    use_llm_lora: int = 0
    """LoRA rank for the LLM (0: off); alpha = 2 * rank, dropout 0.05."""

    def __post_init__(self) -> None:
        for name in ("use_backbone_lora", "use_llm_lora"):
            if getattr(self, name) < 0:
                raise ValueError(f"freeze.{name} must be >= 0, got {getattr(self, name)}")


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def _lora(module: nn.Module, rank: int, targets: list[str], causal_lm: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.05,
        target_modules=targets,
        task_type="CAUSAL_LM" if causal_lm else None,
    )
    return get_peft_model(module, config)


def apply_freeze_policy(model: InternVLModel, config: FreezeConfig) -> None:
    """Set requires_grad (and wrap LoRA adapters) on `model` in place."""
    if config.freeze_backbone:
        _set_trainable(model.vision_model, False)
    if config.freeze_llm:
        _set_trainable(model.language_model, False)
    if config.unfreeze_lm_head:
        _set_trainable(model.language_model.get_output_embeddings(), True)
    # The PEFT wrappers forward attribute access to the wrapped module, so the model keeps
    # using them as the tower / LLM they wrap (vision_layers unwraps where structure matters).
    if config.use_backbone_lora:
        model.vision_model = cast(
            InternViT,
            _lora(model.vision_model, config.use_backbone_lora, VISION_LORA_TARGETS, False),
        )
    if config.use_llm_lora:
        targets = LORA_TARGETS[llm_family(model.language_model)]
        model.language_model = cast(
            PreTrainedModel, _lora(model.language_model, config.use_llm_lora, targets, True)
        )
    if config.freeze_mlp:
        _set_trainable(model.projector, False)
    if config.unfreeze_vit_layers:
        layers = vision_layers(model)
        for layer in layers[max(0, len(layers) - abs(config.unfreeze_vit_layers)) :]:
            _set_trainable(layer, True)
    freeze_unused_vision_layers(model)


def freeze_unused_vision_layers(model: InternVLModel) -> None:
    """Freeze ViT layers after `select_layer`: they never run, so they would get no gradient
    (DDP and FSDP2 expect every trainable parameter to receive one each step)."""
    select = model.config.select_layer
    if select == -1:
        return
    layers = vision_layers(model)
    for layer in layers[select % (len(layers) + 1) :]:
        _set_trainable(layer, False)


def vision_layers(model: InternVLModel) -> nn.ModuleList:
    return model.vision_layers()


def trainable_counts(model: InternVLModel) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameter counts per component."""
    counts = {}
    for name in ("vision_model", "projector", "language_model"):
        params = list(getattr(model, name).parameters())
        counts[name] = (
            sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params),
        )
    return counts


def log_trainable(model: InternVLModel) -> int:
    """Log trainable/total per component; returns the trainable total."""
    total = 0
    for name, (trainable, count) in trainable_counts(model).items():
        logger.info("%-15s trainable %12s / %12s", name, f"{trainable:,}", f"{count:,}")
        total += trainable
    if total == 0:
        raise ValueError("the freeze policy leaves no trainable parameter")
    return total


def apply_train_mode(model: InternVLModel) -> None:
    """model.train(), then eval() on every component with no trainable parameter.

    Keeps dropout / drop-path off in frozen parts (the reference's Trainer undid freeze_llm's
    eval() at the first step).
    """
    model.train()
    for name in ("vision_model", "projector", "language_model"):
        module = getattr(model, name)
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()
