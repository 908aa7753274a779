"""RunFacts: what a run learns from its model and tokenizer, built once and passed explicitly.

    ModelConfig --model.build.build_model--> model, tokenizer --model.build.run_facts--> RunFacts
    ModelConfig --model.build.read_run_facts (config.json + tokenizer files, no weights)--> RunFacts
    RunFacts --> data.build (tiles, placeholder counts, template), data.packing / data.collate
                 (image-span ids, padding id, dummy tile side), show-config

User configs (SampleConfig, PackingConfig, ...) hold only what users set; nothing here can be
set in a TOML file or with --set (the settings they follow from are model.force_image_size,
model.down_sample_ratio, model.conv_style and the tokenizer). Lives at the top of the package
beside tokens.py because data/ and model/ both use it and data/ never imports model/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START, token_id


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """Facts derived from the model and tokenizer; never set by users."""

    tile_size: int
    """Tile side in pixels (the model's force_image_size; from model.force_image_size)."""
    num_image_token: int
    """<IMG_CONTEXT> tokens per tile: (tile_size / ViT patch size)^2 * model.down_sample_ratio^2."""
    template: str
    """Chat template name rendering conversations (the model's template; from model.conv_style)."""
    pad_token_id: int
    """Token id of padding in packed rows (the tokenizer's pad token, else 0)."""
    img_start_token_id: int
    """Id of `<img>` in the tokenizer; packing finds image spans with it."""
    img_end_token_id: int
    """Id of `</img>` in the tokenizer; packing finds image spans with it."""
    img_context_token_id: int
    """Id of `<IMG_CONTEXT>` in the tokenizer; the model scatters tile features there."""

    def __post_init__(self) -> None:
        for name in ("tile_size", "num_image_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunFacts.{name} must be >= 1, got {getattr(self, name)}")
        ids = ("img_start_token_id", "img_end_token_id", "img_context_token_id")
        for name in ("pad_token_id", *ids):
            if getattr(self, name) < 0:
                raise ValueError(f"RunFacts.{name} must be >= 0, got {getattr(self, name)}")
        if len({getattr(self, name) for name in ids}) != len(ids):
            raise ValueError(
                "RunFacts: img_start_token_id, img_end_token_id and img_context_token_id must "
                f"differ, got {[getattr(self, name) for name in ids]}"
            )

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, tile_size: int, num_image_token: int, template: str
    ) -> RunFacts:
        """Facts with the token ids read from `tokenizer` (which has the InternVL tokens)."""
        pad = tokenizer.pad_token_id
        return cls(
            tile_size=tile_size,
            num_image_token=num_image_token,
            template=template,
            pad_token_id=int(pad) if pad is not None else 0,
            img_start_token_id=token_id(tokenizer, IMG_START),
            img_end_token_id=token_id(tokenizer, IMG_END),
            img_context_token_id=token_id(tokenizer, IMG_CONTEXT),
        )
