"""InternViT vision encoder: tiles (N, 3, S, S) -> patch features (N, P, D).

Written from InternViT's published architecture, state-dict compatible with InternViT checkpoints
(`embeddings.*`, `encoder.layers.N.{attn,mlp,norm1,norm2,ls1,ls2}.*`) and config-compatible
with `InternVisionConfig` (config.json fields). Attention uses PyTorch SDPA. What it does not
do: pixel shuffle or projection (see projector.py).

Shape legend: N tiles, S tile side in pixels, G patches per side (S / patch), P = G*G + 1
tokens (CLS first), D hidden size, H heads, K head dim, I MLP size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The fields of InternVisionConfig that shape the network (config.json compatible)."""

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    """Tile side the position embeddings were trained for."""
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    hidden_act: str = "gelu"
    norm_type: Literal["rms_norm", "layer_norm"] = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    """Stochastic depth at the last layer; layer i gets rate * i / (L - 1)."""
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1
    """Initial value of the layer-scale vectors ls1 / ls2."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(
                f"vision norm_type must be rms_norm or layer_norm, not {self.norm_type!r}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        """Read an InternVisionConfig dict (standalone or the `vision_config` of a full model)."""
        raw = raw.get("vision_config", raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VisionConfig:
        return cls.from_dict(json.loads((Path(directory) / "config.json").read_text()))

    def to_dict(self) -> dict[str, Any]:
        """config.json content that InternVL's own code and ours both read."""
        return {
            **asdict(self),
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "use_flash_attn": False,
        }


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back, then scaled (InternRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def build_norm(config: VisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x_NPD
        keep = 1.0 - self.rate
        mask_N11 = x_NPD.new_empty((x_NPD.shape[0], 1, 1)).bernoulli_(keep)
        return x_NPD * mask_N11 / keep


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, dim))

    def grid_positions(self, height: int, width: int) -> torch.Tensor:
        """Patch position embeddings resized (bicubic) to a (height, width) patch grid."""
        side = self.image_size // self.patch_size
        grid_1DGG = (
            self.position_embedding[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        )
        if (height, width) != (side, side):
            grid_1DGG = F.interpolate(
                grid_1DGG, size=(height, width), mode="bicubic", align_corners=False
            )
        return grid_1DGG.reshape(1, -1, height * width).permute(0, 2, 1)

    def forward(self, pixel_values_N3SS: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches_NDGG = self.patch_embedding(pixel_values_N3SS.to(dtype))
        num_tiles, dim, height, width = patches_NDGG.shape
        patches_NGD = patches_NDGG.flatten(2).transpose(1, 2)
        cls_N1D = self.class_embedding.expand(num_tiles, 1, dim).to(dtype)
        tokens_NPD = torch.cat([cls_N1D, patches_NGD], dim=1)
        positions_1PD = torch.cat(
            [self.position_embedding[:, :1].float(), self.grid_positions(height, width)], dim=1
        )
        return tokens_NPD + positions_1PD.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_normalization = config.qk_normalization
        if config.qk_normalization:
            # Normalised over all heads at once, and always RMSNorm, as InternViT does.
            self.q_norm = RMSNorm(dim, config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, config.layer_norm_eps)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        num_tiles, num_tokens, dim = x_NPD.shape
        q_NPD, k_NPD, v_NPD = self.qkv(x_NPD).chunk(3, dim=-1)
        if self.qk_normalization:
            q_NPD, k_NPD = self.q_norm(q_NPD), self.k_norm(k_NPD)

        def heads(t_NPD: torch.Tensor) -> torch.Tensor:
            return t_NPD.reshape(num_tiles, num_tokens, self.num_heads, -1).transpose(1, 2)

        out_NHPK = F.scaled_dot_product_attention(
            heads(q_NPD),
            heads(k_NPD),
            heads(v_NPD),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out_NHPK.transpose(1, 2).reshape(num_tiles, num_tokens, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        if config.hidden_act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionLayer(nn.Module):
    """Pre-norm transformer block with layer scale and stochastic depth."""

    def __init__(self, config: VisionConfig, drop_path_rate: float) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.norm1 = build_norm(config, dim)
        self.norm2 = build_norm(config, dim)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        x_NPD = x_NPD + self.drop_path1(self.attn(self.norm1(x_NPD).to(x_NPD.dtype)) * self.ls1)
        return x_NPD + self.drop_path2(self.mlp(self.norm2(x_NPD).to(x_NPD.dtype)) * self.ls2)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        # On the host even under a meta-device context: the rates are read as numbers, and a
        # meta build (parameter counts without allocating) has none to read.
        rates = torch.linspace(0, config.drop_path_rate, num_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(VisionLayer(config, rate) for rate in rates)


def num_layers_run(num_layers: int, select_layer: int) -> int:
    """How many encoder layers a forward with `select_layer` runs (-1: all of them)."""
    return num_layers if select_layer == -1 else select_layer % (num_layers + 1)


class InternViT(nn.Module):
    """The InternViT vision tower."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values_N3SS: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states (N, P, D) after layer `select_layer` (-1: last; 0: embeddings)."""
        stop = num_layers_run(len(self.encoder.layers), select_layer)
        x_NPD = self.embeddings(pixel_values_N3SS)
        # Activation checkpointing and compilation, when on, are applied to each layer in place
        # (distributed/parallel.py).
        for layer in self.encoder.layers[:stop]:
            x_NPD = layer(x_NPD)
        return x_NPD

    def resize_position_embeddings(self, new_image_size: int) -> None:
        """Bicubically resize the patch grid for tiles of `new_image_size` pixels."""
        embeddings = self.embeddings
        if new_image_size == embeddings.image_size:
            return
        side = new_image_size // embeddings.patch_size
        with torch.no_grad():
            grid_1GD = embeddings.grid_positions(side, side)
            cls_11D = embeddings.position_embedding[:, :1].float()
            resized = torch.cat([cls_11D, grid_1GD], dim=1)
        dtype = embeddings.position_embedding.dtype
        embeddings.position_embedding = nn.Parameter(resized.to(dtype))
        embeddings.image_size = new_image_size
        self.config = replace(self.config, image_size=new_image_size)


def init_vision_weights(model: InternViT, generator: torch.Generator | None = None) -> None:
    """Initialise a fresh tower: truncated-normal linears, unit norms, configured layer scale."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | RMSNorm):
            nn.init.ones_(module.weight)
            bias = getattr(module, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)
    nn.init.trunc_normal_(model.embeddings.class_embedding, std=std, generator=generator)
    nn.init.trunc_normal_(model.embeddings.position_embedding, std=std, generator=generator)
