"""Shared fixtures: tiny pretrained components on disk and the Path B model built from them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from vlpretrain.model.build import BuiltModel, ModelConfig, build_model
from vlpretrain.testing.components import TinyComponents, build_tiny_components
from vlpretrain.testing.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START, add_internvl_tokens

TINY_TILE = 56
"""Tile side of the tiny ViT: (56 / 14)^2 = 16 patches -> 16 * 0.5^2 = 4 LLM tokens per tile."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a tokenizers object
    """The tiny BPE tokenizer with InternVL's special tokens; one per test module (tests may
    add tokens to it)."""
    tok = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    add_internvl_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory: pytest.TempPathFactory) -> TinyComponents:
    """A 2-layer 64-wide InternViT dir and a 2-layer 64-wide Qwen2 dir (+ BPE tokenizer)."""
    return build_tiny_components(tmp_path_factory.mktemp("tiny_components"), seed=0)


@pytest.fixture
def tiny_model(tiny_components: TinyComponents) -> BuiltModel:
    """A fresh Path B model (model + tokenizer) on 56-px tiles; safe to mutate."""
    torch.manual_seed(0)  # the projector is freshly initialised from the global RNG
    return build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=TINY_TILE,
        )
    )


@pytest.fixture
def make_vlm_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory for one packed row of two samples, for a built model.

    Sample 1: `<|im_start|>` + "the circle" + `<img>` + k x `<IMG_CONTEXT>` + `</img>` +
    " is red" + `<|im_end|>`, with one real tile. Sample 2 is text only. Tile 1 is a dummy
    (image_flags 0). Labels equal input_ids on the answer tokens (" is red<|im_end|>" and
    " yes<|im_end|>"), -100 elsewhere; loss_weight is 1 on labelled tokens, 0 elsewhere.
    `num_context` defaults to the model's num_image_token.
    """

    def make(built: BuiltModel, num_context: int | None = None) -> dict[str, torch.Tensor]:
        tokenizer = built.tokenizer
        k = built.model.num_image_token if num_context is None else num_context
        start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        img_start, img_end, context = tokenizer.convert_tokens_to_ids(
            [IMG_START, IMG_END, IMG_CONTEXT]
        )

        def text(s: str) -> list[int]:
            return tokenizer.encode(s, add_special_tokens=False)

        prompt1 = [start, *text("the circle"), img_start, *([context] * k), img_end]
        answer1 = [*text(" is red"), end]
        prompt2 = [start, *text("how many shapes?")]
        answer2 = [*text(" yes"), end]
        ids = prompt1 + answer1 + prompt2 + answer2
        labels = [-100] * len(prompt1) + answer1 + [-100] * len(prompt2) + answer2
        len1 = len(prompt1) + len(answer1)
        len2 = len(prompt2) + len(answer2)
        positions = list(range(len1)) + list(range(len2))
        generator = torch.Generator().manual_seed(1)
        label_t = torch.tensor([labels])
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "pixel_values": torch.randn(2, 3, TINY_TILE, TINY_TILE, generator=generator),
            "image_flags": torch.tensor([1, 0]),
            "labels": label_t,
            "loss_weight": (label_t != -100).float(),
        }

    return make
