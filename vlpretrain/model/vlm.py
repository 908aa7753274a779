"""The vision-language model: embed text, scatter projected tile features, run the LLM, loss.

    pixel_values (N,3,S,S) --vision--> (N,P,C) --drop CLS, pixel shuffle--> (N,T,4C)
        --projector--> (N,T,D) --keep image_flags==1--> rows for the <IMG_CONTEXT> slots
    input_ids (B,L) --embed--> (B,L,D) with image rows scattered in reading order
        --LLM decoder (position_ids restart per packed sample, use_cache=False)--> (B,L,D)
        --chunked weighted CE on supervised positions--> (loss_sum, weight_sum)

What it does not do: normalise the loss (the loop divides by the global weight sum, which
it knows before the forward) or know about distribution.

Shape legend: N tiles, S tile side, P vision tokens per tile (with CLS), C vision hidden,
T image tokens per tile, B rows, L tokens per row, D LLM hidden, K supervised positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from vlpretrain.data.collate import PackedLayout
from vlpretrain.model.attention import is_varlen, varlen_kwargs
from vlpretrain.model.loss import weighted_cross_entropy_sums
from vlpretrain.model.projector import PixelShuffleVersion, Projector, pixel_shuffle
from vlpretrain.model.vision import InternViT


@dataclass(frozen=True, kw_only=True)
class VLMConfig:
    """Top-level fields of an InternVL chat config.json that shape the VLM and its inputs."""

    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio: 0.5 merges 2x2 patches into one token."""
    ps_version: PixelShuffleVersion = "v2"
    """Pixel-shuffle token order; v1 is the reference's transposed legacy order."""
    select_layer: int = -1
    """Vision hidden state fed to the projector (-1 last layer, 0 embeddings)."""
    template: str = "internvl2_5"
    """Chat template name used to render conversations."""
    force_image_size: int = 448
    """Tile side in pixels."""
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False
    normalize_type: str = "imagenet"
    """Pixel statistics the model was trained with (imagenet, clip or siglip); chat uses them."""
    use_backbone_lora: int = 0
    use_llm_lora: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VLMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def num_image_tokens(tile_size: int, patch_size: int, downsample_ratio: float) -> int:
    """LLM tokens per tile: (S / patch)^2 * ratio^2, e.g. (448/14)^2 / 4 = 256."""
    return int((tile_size // patch_size) ** 2 * downsample_ratio**2)


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of weight * cross-entropy over supervised positions (fp32 scalar)."""
    weight_sum: torch.Tensor
    """Sum of the weights of those positions."""
    num_supervised: int
    dataset_loss_sums: torch.Tensor | None = None
    """(datasets,) fp32 share of loss_sum per dataset index (detached), when asked for."""


class ImageTokenMismatchError(ValueError):
    """The number of <IMG_CONTEXT> tokens differs from the number of image feature rows."""


class InternVLModel(nn.Module):
    """Vision tower + projector + causal LM, with InternVL's checkpoint layout."""

    def __init__(
        self,
        config: VLMConfig,
        vision: InternViT,
        language_model: PreTrainedModel,
        image_context_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_model = vision
        self.language_model = language_model
        llm_hidden = language_model.config.get_text_config().hidden_size
        self.projector = Projector(vision.config.hidden_size, llm_hidden, config.downsample_ratio)
        self.image_context_token_id = image_context_token_id
        self.num_image_token = num_image_tokens(
            config.force_image_size, vision.config.patch_size, config.downsample_ratio
        )

    def image_features(self, pixel_values_N3SS: torch.Tensor) -> torch.Tensor:
        """Projected features (N, T, D) of every tile."""
        hidden_NPC = self.vision_model(pixel_values_N3SS, select_layer=self.config.select_layer)
        patches_NGC = hidden_NPC[:, 1:]
        side = math.isqrt(patches_NGC.shape[1])
        grid_NRQC = patches_NGC.reshape(patches_NGC.shape[0], side, side, -1)
        shuffled = pixel_shuffle(grid_NRQC, self.config.downsample_ratio, self.config.ps_version)
        return self.projector(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    def embed(
        self,
        input_ids_BL: torch.Tensor,
        pixel_values_N3SS: torch.Tensor,
        image_flags_N: torch.Tensor,
        layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written into the <IMG_CONTEXT> slots.

        With the host's `layout` no count is read back from the device."""
        embeds_BLD = self.language_model.get_input_embeddings()(input_ids_BL)
        features_NTD = self.image_features(pixel_values_N3SS)
        slots_BL = input_ids_BL == self.image_context_token_id
        if layout is None:
            real_tiles = features_NTD[image_flags_N == 1]
            num_slots, num_real = int(slots_BL.sum()), int((image_flags_N == 1).sum())
            # Dummy tiles (flag 0) stay in the graph with a zero contribution so every rank
            # runs the same modules and every vision parameter gets a (zero) gradient.
            dummy = features_NTD[image_flags_N == 0].sum() * 0.0
        else:
            real_tiles = features_NTD.index_select(0, layout.real_tiles)
            num_slots, num_real = layout.num_image_slots, int(layout.real_tiles.shape[0])
            dummy = features_NTD.sum() * 0.0  # the whole tower is in the graph either way
        rows_MD = real_tiles.reshape(-1, features_NTD.shape[-1])
        if num_slots != rows_MD.shape[0]:
            raise ImageTokenMismatchError(
                f"{num_slots} <IMG_CONTEXT> tokens but {rows_MD.shape[0]} image feature rows "
                f"({num_real} real tiles x {features_NTD.shape[1]} tokens); a sample was "
                "truncated inside an image span or its text contains a literal <IMG_CONTEXT>"
            )
        embeds_BLD = embeds_BLD.masked_scatter(slots_BL.unsqueeze(-1), rows_MD.to(embeds_BLD.dtype))
        return embeds_BLD + dummy.to(embeds_BLD.dtype)

    def hidden_states(
        self,
        input_ids_BL: torch.Tensor,
        position_ids_BL: torch.Tensor,
        pixel_values_N3SS: torch.Tensor,
        image_flags_N: torch.Tensor,
        layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """Decoder output (B, L, D).

        position_ids restart at 0 for every packed sample and every padding segment, so
        transformers builds a per-sample (block-diagonal) mask from them for sdpa, eager and
        flex. A varlen kernel instead gets the B rows as one (1, B*L) sequence plus the
        cumulative sample lengths: per-sample cost with no mask. Only then are rows flattened
        (under sdpa, one flattened sequence would cost (B*L)^2 instead of B*L^2).
        """
        rows, length = input_ids_BL.shape
        decoder = self.language_model.get_decoder()
        extra: dict[str, Any] = {}
        if is_varlen(self.language_model.config._attn_implementation):
            input_ids_BL = input_ids_BL.reshape(1, -1)
            position_ids_BL = position_ids_BL.reshape(1, -1)
            extra = layout.varlen_kwargs() if layout else varlen_kwargs(position_ids_BL)
        embeds_BLD = self.embed(input_ids_BL, pixel_values_N3SS, image_flags_N, layout)
        out = decoder(
            inputs_embeds=embeds_BLD, position_ids=position_ids_BL, use_cache=False, **extra
        )
        return out.last_hidden_state.reshape(rows, length, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_flags: torch.Tensor,
        labels: torch.Tensor,
        loss_weight: torch.Tensor,
        layout: PackedLayout | None = None,
        per_dataset: bool = False,
    ) -> LossOutput:
        """Weighted loss sum of a packed micro-batch; labels and weights align with input_ids.

        `layout` (from collate_rows): the same result without reading anything back from the
        device (sizes and counts come from the host). `per_dataset` (needs `layout`): also
        the loss sum of each dataset, from the same per-position losses."""
        hidden_BLD = self.hidden_states(input_ids, position_ids, pixel_values, image_flags, layout)
        # Position t predicts token t+1.
        targets_BL = labels[:, 1:]
        weights_BL = loss_weight[:, 1:].float()
        if layout is None:
            keep_BL = (targets_BL != -100) & (weights_BL > 0)
            hidden_KD, targets_K = hidden_BLD[:, :-1][keep_BL], targets_BL[keep_BL]
            weights_K, num_supervised = weights_BL[keep_BL], int(keep_BL.sum())
        else:  # the same positions, in the same order, found on the host
            kept, targets_at = layout.supervised, layout.supervised + 1
            hidden_KD = hidden_BLD.reshape(-1, hidden_BLD.shape[-1]).index_select(0, kept)
            targets_K = labels.reshape(-1).index_select(0, targets_at)
            weights_K = loss_weight.reshape(-1).float().index_select(0, targets_at)
            num_supervised = layout.num_supervised
        if per_dataset and layout is None:
            raise ValueError("per_dataset needs the batch's host layout (collate_rows makes it)")
        groups_K = layout.supervised_datasets if per_dataset and layout is not None else None
        num_datasets = len(layout.dataset_weight_sums) if layout is not None else 0
        loss_sum, dataset_loss_sums = weighted_cross_entropy_sums(
            hidden_KD,
            self.language_model.get_output_embeddings(),
            targets_K,
            weights_K,
            groups_K,
            num_datasets,
        )
        # A micro-batch may have no supervised token. Passing one position through the head
        # with weight zero keeps the decoder *and* the head in the graph, so backward reaches
        # every trainable parameter on every rank (DDP and FSDP2 need the same set each step).
        head = self.language_model.get_output_embeddings()
        loss_sum = loss_sum + head(hidden_BLD[:, :1]).float().sum() * 0.0
        return LossOutput(
            loss_sum=loss_sum,
            weight_sum=weights_K.sum(),
            num_supervised=num_supervised,
            dataset_loss_sums=dataset_loss_sums,
        )

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_flags: torch.Tensor,
    ) -> torch.Tensor:
        """Full logits (B, L, V); for evaluation, tests and generation, not for training."""
        hidden_BLD = self.hidden_states(input_ids, position_ids, pixel_values, image_flags)
        return self.language_model.get_output_embeddings()(hidden_BLD).float()

    def vision_layers(self) -> nn.ModuleList:
        """The ViT's transformer layers (through a PEFT wrapper if LoRA is on)."""
        vision = self.vision_model
        get_base_model = getattr(vision, "get_base_model", None)
        base = get_base_model() if get_base_model is not None else vision
        return base.encoder.layers

    @property
    def llm_hidden_size(self) -> int:
        return int(self.language_model.config.get_text_config().hidden_size)
