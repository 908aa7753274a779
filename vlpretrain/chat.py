"""Inference: answer a question about images with a saved InternVL chat model; `vlpretrain chat`.

    images --tile_images (the model's tiling settings, imagenet stats)--> pixels (N,3,S,S)
    history + question --<image> tags, placeholder expansion, template--> prompt ids (1,L)
    ids + pixels --model.embed--> (1,L,D) --LLM prefill, use_cache--> cache, logits (V)
        --pick_token, feed the token back one position at a time--> ids until a stop id
        --decode--> answer text

The prompt is built by the training code paths (data.tiling, data.templates), so the ids a
model sees at inference equal its training ids up to the first answer token.
What it does not do: batch several questions, read video, or parse arguments (`vlpretrain chat`
lives in cli.py).

Shape legend: N tiles, S tile side, L prompt tokens, D LLM hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from vlpretrain.data import media, tiling
from vlpretrain.data.records import RecordError
from vlpretrain.data.templates import (
    IMAGE_TAG,
    TemplateRenderer,
    Turns,
    check_reserved_strings,
    expand_image_placeholders,
    get_template,
)
from vlpretrain.data.tiling import NormalizeType
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.model.vlm import InternVLModel, VLMConfig

ImageInput = Image.Image | str | Path
History = list[tuple[str, str]]
"""Earlier (question, answer) pairs, questions as sent (with their <image> tags)."""


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How tokens are chosen."""

    max_new_tokens: int = 64
    """Stop after this many tokens even without a stop token."""
    do_sample: bool = False
    """Sample from the distribution instead of taking the argmax."""
    temperature: float = 1.0
    """Logits are divided by this before sampling."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probability mass reaches top_p."""
    seed: int = 0
    """Seed of the sampling generator (one per call, so a call is reproducible)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def with_image_tags(question: str, num_images: int, history: History | None = None) -> str:
    """Prepend '<image>\\n' (one image) or 'Image-i: <image>\\n' lines (several) to `question`,
    unless it or an earlier question already has <image> tags (the user placed them)."""
    earlier = [q for q, _ in history or []]
    if num_images == 0 or any(IMAGE_TAG in text for text in [*earlier, question]):
        return question
    if num_images == 1:
        return f"{IMAGE_TAG}\n{question}"
    return "".join(f"Image-{i + 1}: {IMAGE_TAG}\n" for i in range(num_images)) + question


def load_images(images: Sequence[ImageInput]) -> list[Image.Image]:
    """RGB images from paths or PIL images; ValueError for a missing or unreadable file."""
    loaded = []
    for image in images:
        if isinstance(image, Image.Image):
            loaded.append(image.convert("RGB"))
            continue
        try:
            loaded.append(media.load_image(Path(image)))
        except RecordError as err:
            raise ValueError(err.detail) from err
    return loaded


def tile_images(images: list[Image.Image], config: VLMConfig) -> tuple[np.ndarray, list[int]]:
    """Normalised tiles (N, 3, S, S) of all images and the tile count of each, tiled exactly
    as the training data (per-image budget max_dynamic_patch // num_images, no augmentation)."""
    max_num = tiling.image_tile_budget(config.max_dynamic_patch, len(images))
    size = config.force_image_size
    normalize_type = cast(NormalizeType, config.normalize_type)
    per_image = [
        tiling.make_tiles(
            image,
            dynamic=config.dynamic_image_size,
            min_num=min(config.min_dynamic_patch, max_num),
            max_num=max_num,
            tile_size=size,
            use_thumbnail=config.use_thumbnail,
            pad2square=config.pad2square,
            normalize_type=normalize_type,
            augment_rng=None,
        )
        for image in images
    ]
    tiles = [tile for image_tiles in per_image for tile in image_tiles]
    if not tiles:
        return np.zeros((0, 3, size, size), dtype=np.float32), []
    return tiling.normalize(tiles, normalize_type, size), [len(t) for t in per_image]


def conversation_turns(question: str, history: History | None, system_message: str | None) -> Turns:
    """Template turns: optional system turn, the history pairs, then the question."""
    turns: list[tuple[str, str]] = [] if system_message is None else [("system", system_message)]
    for earlier_question, answer in history or []:
        turns += [("human", earlier_question), ("gpt", answer)]
    turns.append(("human", question))
    return tuple(turns)


def top_p_filter(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches `top_p` (at least one); renormalise."""
    sorted_V, order_V = probs_V.sort(descending=True)
    mass_before_V = sorted_V.cumsum(0) - sorted_V
    sorted_V = sorted_V.masked_fill(mass_before_V >= top_p, 0.0)
    kept_V = torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)
    return kept_V / kept_V.sum()


def pick_token(logits_V: torch.Tensor, decode: DecodeConfig, generator: torch.Generator) -> int:
    """Argmax, or a sample at `decode.temperature` restricted to the top-p nucleus."""
    if not decode.do_sample:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V.float().cpu() / decode.temperature, dim=-1)
    if decode.top_p < 1.0:
        probs_V = top_p_filter(probs_V, decode.top_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def stop_token_ids(tokenizer: Any, template_name: str) -> frozenset[int]:
    """The template's end-of-message token (<|im_end|>, <|end|>) and the tokenizer's eos."""
    end_ids = tokenizer.encode(get_template(template_name).end, add_special_tokens=False)
    ids = set(end_ids) if len(end_ids) == 1 else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class ChatModel:
    """A loaded model, its tokenizer and template: prompt building and decoding."""

    def __init__(self, model: InternVLModel, tokenizer: Any, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.renderer = TemplateRenderer(get_template(model.config.template), tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, model.config.template)

    def prompt_inputs(
        self,
        images: Sequence[ImageInput],
        question: str,
        history: History | None = None,
        system_message: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (1, L) ending with the assistant prefix, and the pixels (N, 3, S, S).

        Raises:
            ValueError: a reserved token in the text, fewer <image> tags than images, or an
                image that cannot be read.
        """
        pixels, tiles_per_image = tile_images(load_images(images), self.model.config)
        question = with_image_tags(question, len(images), history)
        turns = conversation_turns(question, history, system_message)
        tokens_per_image = [self.model.num_image_token * n for n in tiles_per_image]
        try:
            check_reserved_strings(turns)
            turns = expand_image_placeholders(turns, tokens_per_image)
        except RecordError as err:
            raise ValueError(err.detail) from err
        input_ids = self.renderer.generation_prompt(turns)
        return (
            torch.from_numpy(input_ids).unsqueeze(0).to(self.device),
            torch.from_numpy(pixels).to(self.device),
        )

    def _embed(self, input_ids_1L: torch.Tensor, pixel_values_N3SS: torch.Tensor) -> torch.Tensor:
        if pixel_values_N3SS.shape[0] == 0:
            return self.model.language_model.get_input_embeddings()(input_ids_1L)
        flags_N = torch.ones(pixel_values_N3SS.shape[0], dtype=torch.long, device=self.device)
        return self.model.embed(input_ids_1L, pixel_values_N3SS, flags_N)

    @torch.no_grad()
    def generate(
        self,
        input_ids_1L: torch.Tensor,
        pixel_values_N3SS: torch.Tensor,
        decode: DecodeConfig,
        stop_ids: frozenset[int] | None = None,
    ) -> list[int]:
        """New token ids (stop token excluded): prefill the prompt once with the image features,
        then one cached step per token at positions L, L+1, ...

        `stop_ids` defaults to the template's end token and eos; pass an empty set to always
        produce `max_new_tokens` tokens.
        """
        stop_ids = self.stop_ids if stop_ids is None else stop_ids
        llm = self.model.language_model
        length = input_ids_1L.shape[1]
        out = llm(
            inputs_embeds=self._embed(input_ids_1L, pixel_values_N3SS),
            position_ids=torch.arange(length, device=self.device).unsqueeze(0),
            use_cache=True,
            logits_to_keep=1,
        )
        generator = torch.Generator().manual_seed(decode.seed)
        generated: list[int] = []
        while len(generated) < decode.max_new_tokens:
            token = pick_token(out.logits[0, -1], decode, generator)
            if token in stop_ids:
                break
            generated.append(token)
            if len(generated) == decode.max_new_tokens:
                break
            out = llm(
                input_ids=torch.tensor([[token]], device=self.device),
                position_ids=torch.tensor([[length + len(generated) - 1]], device=self.device),
                cache=out.cache,
                use_cache=True,
            )
        return generated

    def chat(
        self,
        images: Sequence[ImageInput],
        question: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        history: History | None = None,
        system_message: str | None = None,
    ) -> str:
        """The model's answer to `question` about `images` (all images of the conversation).

        Images get '<image>' tags prepended unless the question or history has them;
        `system_message` None means the template's default.
        """
        decode = DecodeConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return self.answer(images, question, decode, history, system_message)

    def answer(
        self,
        images: Sequence[ImageInput],
        question: str,
        decode: DecodeConfig,
        history: History | None = None,
        system_message: str | None = None,
    ) -> str:
        """`chat` with the decoding settings as one DecodeConfig."""
        input_ids, pixels = self.prompt_inputs(images, question, history, system_message)
        new_ids = self.generate(input_ids, pixels, decode)
        return self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def load(model_dir: str | Path, device: str = "cpu") -> ChatModel:
    """A ChatModel from an InternVL chat directory (Path A, settings from its config.json)."""
    built = build_model(ModelConfig(model_name_or_path=str(model_dir)))
    return ChatModel(built.model, built.tokenizer, device)
