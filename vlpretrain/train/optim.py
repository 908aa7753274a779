"""AdamW with weight decay on matrices only (fused kernels on CUDA, foreach elsewhere), and the
LR schedule (transformers' helpers).

The reference decays every trainable tensor (norms, biases, position embeddings, layer
scale); here decay applies to 2-D+ weight matrices except position and class embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import get_scheduler

NO_DECAY_NAMES = ("position_embedding", "class_embedding")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    learning_rate: float = 2e-4
    """Peak learning rate, reached after warmup [--learning_rate]."""
    weight_decay: float = 0.01
    """Applied to weight matrices only (not norms, biases, position/class embeddings)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay [--adam_beta1]."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay [--adam_beta2]."""
    adam_epsilon: float = 1e-8
    """AdamW denominator epsilon [--adam_epsilon]."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup: constant, linear or cosine to 0 at max_steps [--lr_scheduler_type]."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps (0: use warmup_ratio) [--warmup_steps]."""
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: warmup = ceil(ratio * max_steps)."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def warmup_steps(config: OptimConfig, max_steps: int) -> int:
    if config.warmup_steps:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * max_steps)


def decays(name: str, parameter: torch.Tensor) -> bool:
    return parameter.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in two groups (decay / no decay)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if decays(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in trainable if not decays(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        **adamw_implementation({p.device.type for _, p in trainable}),
    )


def adamw_implementation(device_types: set[str]) -> dict[str, bool]:
    """AdamW's kernels for parameters on these device types: fused on CUDA, foreach elsewhere.

    Both are set explicitly because torch's own default (foreach=None) uses foreach on CUDA
    only, and the one-tensor-at-a-time loop elsewhere: hundreds of small kernel launches per
    step. Under FSDP2 every parameter is a DTensor: DTensor registers sharding rules for the
    foreach ops and for `_fused_adamw_` (torch/distributed/tensor/_ops/_pointwise_ops.py), and
    foreach steps DTensors bit for bit like the loop (tests/unit/test_optim.py). The fused
    CUDA kernel differs from the loop by float rounding only (within 1e-7 in fp32); a run
    keeps one implementation, so resumes stay bit-exact. Off CUDA foreach, not torch's CPU
    fused kernel (faster still, bench/optimizer_step.py): foreach keeps the CPU losses equal
    to the loop's bit for bit, the golden loss files included.
    """
    fused = device_types == {"cuda"}
    return {"fused": fused, "foreach": not fused}


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    name = (
        "constant_with_warmup"
        if config.lr_scheduler_type == "constant"
        else config.lr_scheduler_type
    )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(config, max_steps),
        num_training_steps=max_steps,
    )
