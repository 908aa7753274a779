"""Make the demo's "pretrained" components: a ViT and an LLM, each trained briefly on its own.

InternVL's recipe starts from a pretrained vision encoder and a pretrained LLM. With nothing
to download, the demo pretrains tiny ones in seconds:

    shapes scenes --render, resize to one tile--> InternViT + linear probe on mean patch
        features, multi-label targets (colour x kind present, kind x position) --> vit/
    chat-formatted texts in the shapes grammar --causal LM on packed 256-token rows--> llm/

Both are saved as the HF-format directories that Path B loads, like real checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Qwen2ForCausalLM

from vlpretrain.data.tiling import normalize
from vlpretrain.demo.components import TINY_VISION, tiny_llm_config
from vlpretrain.demo.shapes import COLOURS, KINDS, POSITIONS, Scene, sample_scene
from vlpretrain.demo.synthetic import render_scene
from vlpretrain.demo.tokenizer import train_tiny_tokenizer
from vlpretrain.model.build import new_vision, save_vision
from vlpretrain.model.vision import InternViT, VisionConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    seed: int = 0
    tile_size: int = 56
    vision_layers: int = 2
    vision_hidden: int = 64
    vision_patch: int = 7
    """7-px patches: a 56-px tile is 8x8 patches -> 16 LLM tokens after pixel shuffle."""
    vision_steps: int = 1500
    vision_batch: int = 32
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_steps: int = 300
    llm_batch: int = 16
    llm_row_tokens: int = 256
    vocab_size: int = 512


def scene_targets(scene: Scene) -> np.ndarray:
    """Multi-hot: (colour, kind) present [12], then (kind, position) present [15]."""
    colour_kind = np.zeros((len(COLOURS), len(KINDS)), dtype=np.float32)
    kind_position = np.zeros((len(KINDS), len(POSITIONS)), dtype=np.float32)
    for shape in scene.shapes:
        colour_kind[COLOURS.index(shape.colour), KINDS.index(shape.kind)] = 1.0
        kind_position[KINDS.index(shape.kind), POSITIONS.index(shape.position)] = 1.0
    return np.concatenate([colour_kind.ravel(), kind_position.ravel()])


def vision_batch(
    rng: np.random.Generator, size: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [sample_scene(rng, tile) for _ in range(size)]
    images = [render_scene(s).resize((tile, tile), Image.Resampling.BICUBIC) for s in scenes]
    pixels = torch.from_numpy(normalize(images, "imagenet"))
    targets = torch.from_numpy(np.stack([scene_targets(s) for s in scenes]))
    return pixels, targets


def pretrain_vision(config: PretrainConfig, output_dir: Path) -> Path:
    """Train a tiny InternViT with a linear probe; save the ViT alone."""
    vision_config: VisionConfig = replace(
        TINY_VISION,
        image_size=config.tile_size,
        patch_size=config.vision_patch,
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
    )
    vision: InternViT = new_vision(vision_config, config.seed)
    probe = nn.Linear(
        config.vision_hidden, len(scene_targets(sample_scene(np.random.default_rng(0), 8)))
    )
    optimizer = torch.optim.AdamW([*vision.parameters(), *probe.parameters()], lr=2e-3)
    rng = np.random.default_rng([config.seed, 11])
    vision.train()
    for step in range(config.vision_steps):
        pixels, targets = vision_batch(rng, config.vision_batch, config.tile_size)
        features = vision(pixels)[:, 1:].mean(dim=1)
        loss = F.binary_cross_entropy_with_logits(probe(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.vision_steps - 1:
            logger.info("vit pretraining step %d: probe loss %.4f", step, loss.item())
    return save_vision(vision.eval(), output_dir)


def packed_rows(token_lists: list[list[int]], row_tokens: int) -> torch.Tensor:
    """Concatenate token lists and cut into rows of `row_tokens` (the tail is dropped)."""
    stream = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
    num_rows = len(stream) // row_tokens
    return torch.from_numpy(stream[: num_rows * row_tokens].reshape(num_rows, row_tokens))


def pretrain_llm(
    config: PretrainConfig, texts: list[str], tokenizer_corpus: list[str], output_dir: Path
) -> Path:
    """Train a BPE tokenizer and a tiny Qwen2 on `texts`; save both in `output_dir`."""
    tokenizer = train_tiny_tokenizer(output_dir, tokenizer_corpus, config.vocab_size)
    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM(tiny_llm_config(len(tokenizer), config.llm_hidden, config.llm_layers))
    rows = packed_rows([tokenizer(t)["input_ids"] for t in texts], config.llm_row_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.llm_steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for step in range(config.llm_steps):
        batch = rows[torch.randint(len(rows), (config.llm_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.llm_steps - 1:
            logger.info("llm pretraining step %d: loss %.4f", step, loss.item())
    model.save_pretrained(str(output_dir))
    return output_dir
