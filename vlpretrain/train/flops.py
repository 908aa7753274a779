"""Model FLOPs per step, counted for the ViT, projector and LLM separately, and MFU.

Forward FLOPs are 2 per weight per token for matmuls plus attention scores (causal in the
LLM, counted per packed sample). Backward is split into the gradient with respect to inputs
(needed wherever a trainable parameter lies upstream or inside) and with respect to weights
(only for the trainable fraction), so frozen parts cost no weight-gradient FLOPs. Activation
recomputation is not counted (MFU convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from vlpretrain.model.vlm import InternVLModel

KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "4090": 165.0,
    "V100": 125.0,
}
"""Dense bf16 tensor-core peaks by GPU name fragment."""


@dataclass(frozen=True)
class ComponentShape:
    matmul_params: int
    """Weights used in matmuls per token (linear layers; embeddings excluded)."""
    trainable_fraction: float
    """Share of the matmul weights that train (their weight gradients cost FLOPs)."""
    trains: bool
    """Any parameter trains (then gradients flow back through the component)."""
    layers: int = 0
    hidden: int = 0


def _linear_params(module: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            for p in sub.parameters(recurse=False):
                if p.ndim == 2:
                    total += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def component_shape(module: nn.Module, layers: int = 0, hidden: int = 0) -> ComponentShape:
    total, trainable = _linear_params(module)
    trains = any(p.requires_grad for p in module.parameters())
    return ComponentShape(total, trainable / total if total else 0.0, trains, layers, hidden)


@dataclass(frozen=True)
class FlopsCounter:
    vision: ComponentShape
    projector: ComponentShape
    llm: ComponentShape
    head: ComponentShape
    vision_tokens_per_tile: int
    image_tokens_per_tile: int

    def step_flops(
        self, num_tiles: int, segment_lengths: list[int], num_supervised: int
    ) -> dict[str, float]:
        """FLOPs (forward + backward) of one optimizer step's micro-batches, per component."""
        patches = num_tiles * self.vision_tokens_per_tile
        vision_fwd = 2.0 * self.vision.matmul_params * patches + (
            4.0
            * self.vision.layers
            * self.vision.hidden
            * num_tiles
            * self.vision_tokens_per_tile**2
        )
        projector_fwd = 2.0 * self.projector.matmul_params * num_tiles * self.image_tokens_per_tile
        tokens = sum(segment_lengths)
        attention = 2.0 * self.llm.layers * self.llm.hidden * sum(n * n for n in segment_lengths)
        llm_fwd = 2.0 * self.llm.matmul_params * tokens + attention
        head_fwd = 2.0 * self.head.matmul_params * num_supervised
        upstream = False
        totals = {}
        for name, shape, forward in (
            ("vision", self.vision, vision_fwd),
            ("projector", self.projector, projector_fwd),
            ("llm", self.llm, llm_fwd),
            ("head", self.head, head_fwd),
        ):
            input_grad = forward if (upstream or shape.trains) else 0.0
            weight_grad = forward * shape.trainable_fraction
            totals[name] = forward + input_grad + weight_grad
            upstream = upstream or shape.trains
        return totals


def build_flops_counter(model: InternVLModel) -> FlopsCounter:
    vision = model.vision_model
    vision_config = vision.config
    llm = model.language_model
    text_config = llm.config.get_text_config()
    head = llm.get_output_embeddings()
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    return FlopsCounter(
        vision=component_shape(vision, vision_config.num_hidden_layers, vision_config.hidden_size),
        projector=component_shape(model.projector),
        llm=component_shape(
            llm.get_decoder(), text_config.num_hidden_layers, text_config.hidden_size
        ),
        head=component_shape(head),
        vision_tokens_per_tile=grid + 1,
        image_tokens_per_tile=model.num_image_token,
    )


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """Per-device peak: the override, a known GPU's bf16 peak, or a measured CPU matmul peak."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, value in KNOWN_PEAK_TFLOPS.items():
            if fragment in name:
                return value
        return 0.0
    return measure_cpu_matmul_tflops()


def measure_cpu_matmul_tflops(size: int = 512, seconds: float = 0.2) -> float:
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * count / elapsed / 1e12
