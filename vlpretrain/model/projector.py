"""Pixel-shuffle downsampling and the MLP projector: (N, P, Dv) -> (N, P*r^2, Dl).

Key names follow the reference checkpoint (`mlp1.0` LayerNorm, `mlp1.1` Linear, `mlp1.3`
Linear) so InternVL checkpoints load unchanged; the module is called `projector` in our code
and renamed only at the checkpoint boundary (see model/checkpoint.py).

Shape legend: N tiles, R rows and Q columns of patches, C vision channels, D LLM hidden size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PixelShuffleVersion = Literal["v1", "v2"]


def pixel_shuffle(
    x_NRQC: torch.Tensor, scale: float = 0.5, version: PixelShuffleVersion = "v2"
) -> torch.Tensor:
    """Merge each (1/scale x 1/scale) block of patches into one token with stacked channels.

    For scale 0.5, output token (i, j) holds channels
    [x(2i, 2j), x(2i, 2j+1), x(2i+1, 2j), x(2i+1, 2j+1)]. "v2" returns tokens in row-major
    (i, j) order; "v1" keeps the reference's historical transposed (column-major) order.
    Returns (N, R*scale, Q*scale, C/scale^2) for v2 and (N, Q*scale, R*scale, C/scale^2) for v1.
    """
    num_tiles, rows, cols, channels = x_NRQC.shape
    factor = round(1 / scale)
    if rows % factor or cols % factor:
        raise ValueError(f"patch grid {rows}x{cols} is not divisible by 1/scale = {factor}")
    # Merge horizontal neighbours, then vertical neighbours (on the transposed view).
    x = x_NRQC.reshape(num_tiles, rows, cols // factor, channels * factor)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(num_tiles, cols // factor, rows // factor, channels * factor * factor)
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    elif version != "v1":
        raise ValueError(f"ps_version must be 'v1' or 'v2', not {version!r}")
    return x.contiguous()


class Projector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear on pixel-shuffled vision features."""

    def __init__(self, vision_hidden: int, llm_hidden: int, downsample_ratio: float) -> None:
        super().__init__()
        merged = vision_hidden * round(1 / downsample_ratio) ** 2
        self.norm = nn.LayerNorm(merged, eps=1e-5)
        self.fc1 = nn.Linear(merged, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, features_NTC: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(features_NTC))))


PROJECTOR_KEY_TO_REFERENCE = {"norm": "0", "fc1": "1", "fc2": "3"}
"""Our submodule names -> index in the reference's `mlp1` Sequential."""
