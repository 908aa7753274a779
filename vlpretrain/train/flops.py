"""Model FLOPs per step, counted for the ViT, projector and LLM separately, and the device peak
that MFU divides them by.

Forward FLOPs are 2 per weight per token for matmuls plus attention scores and values
(QK^T and PV, 2 matmuls over heads x head_dim; causal in the LLM, counted per packed sample).
Backward is split into the gradient with respect to inputs (needed wherever a trainable
parameter lies upstream or inside) and with respect to weights (only for the trainable
fraction), so frozen parts cost no weight-gradient FLOPs. Attention has no weights: wherever
backward crosses it (a frozen LLM in stage 1 still passes gradients to the projector), its
backward is twice its forward (dQ, dK from dS; dP, dV from dO). Only model work counts:
padding segments and dummy or padding tiles are left out, and activation recomputation is not
counted (MFU convention).

Peak: `train.peak_tflops` if set; else a known GPU's dense bf16 tensor-core peak by device
name; else, on a GPU outside the table, a bf16 GEMM measured once at start. A CPU has no peak
(no MFU) unless the user sets one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from vlpretrain.data.collate import PackedBatch
from vlpretrain.model.vlm import InternVLModel

logger = logging.getLogger(__name__)

KNOWN_PEAKS: tuple[tuple[str, str, float], ...] = (
    # (name pattern, entry, dense bf16 TFLOP/s). Vendor datasheets state these peaks with 2:4
    # sparsity; the dense peak is half of it:
    #   NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 / NVL 1,671 (H800 SXM and PCIe: same
    #   silicon and clocks as the H100 SXM and PCIe); H200 datasheet: SXM 1,979 / NVL 1,671;
    #   GH200 datasheet 1,979; H20 datasheet 296; HGX B200 datasheet 36 PFLOPS per 8 GPUs =
    #   4.5 per GPU; A100 / A800 datasheets 624; L40S datasheet 733 (362.05 dense);
    #   A10 datasheet 250; Ada (RTX 4090) whitepaper 330.4 with FP32 accumulate.
    #   AMD Instinct MI300X datasheet: 1,307.4 dense (2,614.9 with sparsity).
    # First match wins, so the specific names come first: GH200 before H200 (and neither is
    # matched by H20), the PCIe and NVL variants before the bare H100 / H800 / H200 (SXM).
    # torch.cuda.get_device_name() spells them e.g. "NVIDIA H100 80GB HBM3" (SXM),
    # "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB",
    # "NVIDIA A100-SXM4-80GB", "AMD Instinct MI300X".
    (r"\bGH200\b", "GH200", 989.4),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5),
    (r"\bH200\b", "H200", 989.4),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.4),
    (r"\bH800\b.*\bPCIe\b", "H800 PCIe", 756.0),
    (r"\bH800\b", "H800 SXM", 989.4),
    (r"\bH20\b", "H20", 148.0),
    (r"\bB200\b", "B200", 2250.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA800\b", "A800", 312.0),
    (r"\bMI300X\b", "MI300X", 1307.4),
    (r"\bL40S\b", "L40S", 362.05),
    (r"\bA10\b", "A10", 125.0),
    (r"\bRTX 4090\b", "RTX 4090", 165.2),
)
"""Dense bf16 tensor-core peaks by device name, most specific first (sources above)."""


@dataclass(frozen=True)
class ComponentShape:
    matmul_params: int
    """Weights used in matmuls per token (linear layers; embeddings excluded)."""
    trainable_fraction: float
    """Share of the matmul weights that train (their weight gradients cost FLOPs)."""
    trains: bool
    """Any parameter trains (then gradients flow back through the component)."""
    layers: int = 0
    attention_width: int = 0
    """Query heads x head_dim: the width of QK^T and PV (not always hidden_size)."""


def _linear_params(module: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            for p in sub.parameters(recurse=False):
                if p.ndim == 2:
                    total += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def component_shape(module: nn.Module, layers: int = 0, attention_width: int = 0) -> ComponentShape:
    total, trainable = _linear_params(module)
    trains = any(p.requires_grad for p in module.parameters())
    return ComponentShape(
        total, trainable / total if total else 0.0, trains, layers, attention_width
    )


class AttentionConfig(Protocol):
    """What attention_width reads of a ViT or LLM config (head_dim is optional)."""

    @property
    def num_attention_heads(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...


def attention_width(config: AttentionConfig) -> int:
    """Query heads x head_dim (head_dim defaults to hidden_size / heads, as the models do when
    the config has none; Qwen3-0.6B has 16 x 128 = 2048 in a 1024-wide model)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * int(head_dim)


@dataclass(frozen=True)
class FlopsCounter:
    vision: ComponentShape
    projector: ComponentShape
    llm: ComponentShape
    head: ComponentShape
    vision_tokens_per_tile: int
    image_tokens_per_tile: int

    def step_flops(
        self, num_tiles: int, segment_lengths: Sequence[int], num_supervised: int
    ) -> dict[str, float]:
        """FLOPs (forward + backward) of real tiles and packed samples, per component."""
        patches = num_tiles * self.vision_tokens_per_tile
        vision_attention = (
            4.0
            * self.vision.layers
            * self.vision.attention_width
            * num_tiles
            * self.vision_tokens_per_tile**2
        )
        # Causal: half of the 4 * n^2 * width of full attention.
        llm_attention = (
            2.0 * self.llm.layers * self.llm.attention_width * sum(n * n for n in segment_lengths)
        )
        tokens = sum(segment_lengths)
        upstream = False
        totals = {}
        for name, shape, matmuls, attention in (
            ("vision", self.vision, 2.0 * self.vision.matmul_params * patches, vision_attention),
            (
                "projector",
                self.projector,
                2.0 * self.projector.matmul_params * num_tiles * self.image_tokens_per_tile,
                0.0,
            ),
            ("llm", self.llm, 2.0 * self.llm.matmul_params * tokens, llm_attention),
            ("head", self.head, 2.0 * self.head.matmul_params * num_supervised, 0.0),
        ):
            crossed = 1.0 if upstream or shape.trains else 0.0  # does backward pass through it
            matmul_total = matmuls * (1.0 + crossed + shape.trainable_fraction)
            attention_total = attention * (1.0 + 2.0 * crossed)  # no weights: dQ, dK, dP, dV
            totals[name] = matmul_total + attention_total
            upstream = upstream or shape.trains
        return totals

    def batches_flops(
        self, batches: Sequence[PackedBatch], num_supervised: int
    ) -> dict[str, float]:
        """`step_flops` of micro-batches' real work: their samples (packed pieces, whose token
        ranges `sample_ids` record) and real tiles, without the padding segment that closes a
        short row in `cu_seqlens` or the dummy and padding tiles (image flag 0)."""
        lengths = [ref.token_end - ref.token_start for b in batches for ref in b.sample_ids]
        real_tokens = sum(b.stats.num_real_tokens for b in batches)
        assert sum(lengths) == real_tokens, f"sample_ids cover {sum(lengths)} of {real_tokens}"
        tiles = sum(b.stats.num_tiles for b in batches)
        return self.step_flops(tiles, lengths, num_supervised)


def build_flops_counter(model: InternVLModel) -> FlopsCounter:
    vision = model.vision_model
    vision_config = vision.config
    llm = model.language_model
    text_config = llm.config.get_text_config()
    head = llm.get_output_embeddings()
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    return FlopsCounter(
        vision=component_shape(
            vision, vision_config.num_hidden_layers, attention_width(vision_config)
        ),
        projector=component_shape(model.projector),
        llm=component_shape(
            llm.get_decoder(), text_config.num_hidden_layers, attention_width(text_config)
        ),
        head=component_shape(head),
        vision_tokens_per_tile=grid + 1,
        image_tokens_per_tile=model.num_image_token,
    )


def known_peak(device_name: str) -> tuple[str, float] | None:
    """(table entry, dense bf16 TFLOP/s) of a device name, or None if it is not in the table."""
    for pattern, entry, tflops in KNOWN_PEAKS:
        if re.search(pattern, device_name):
            return entry, tflops
    return None


def _cuda_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def peak_tflops(
    device: torch.device,
    override: float = 0.0,
    *,
    device_name: Callable[[torch.device], str] = _cuda_device_name,
    measure: Callable[[torch.device], float] | None = None,
) -> float:
    """Peak TFLOP/s that MFU is measured against; 0.0 means no MFU.

    The override (`train.peak_tflops`) wins; then a known GPU's dense bf16 peak; then, on a GPU
    outside the table, a measured bf16 GEMM. A CPU gets 0.0: its fp32 matmul speed is no
    tensor-core peak (it made MFU read above 1). `device_name` and `measure` are
    `torch.cuda.get_device_name` and `measure_gemm_tflops` unless a test stands in for them.
    """
    if override > 0:
        logger.info("MFU peak: %.1f TFLOP/s (train.peak_tflops)", override)
        return override
    if device.type != "cuda":
        logger.info("MFU: not reported on %s (set train.peak_tflops to report it)", device.type)
        return 0.0
    name = device_name(device)
    known = known_peak(name)
    if known is not None:
        entry, tflops = known
        logger.info("MFU peak: %.1f TFLOP/s dense bf16 (%s, as %s)", tflops, name, entry)
        return tflops
    tflops = (measure or measure_gemm_tflops)(device)
    logger.info(
        "MFU peak: %.1f TFLOP/s measured (bf16 GEMM at start; %r is not in the peak table; "
        "set train.peak_tflops to use the datasheet figure)",
        tflops,
        name,
    )
    return tflops


def measure_gemm_tflops(
    device: torch.device,
    size: int = 8192,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
) -> float:
    """Achieved TFLOP/s of `repeats` size^3 matmuls, after warm-up, timed between syncs."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):  # kernel selection and clocks settle before timing
        a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * repeats / elapsed / 1e12


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
