"""Random-weight VLMs and synthetic packed micro-batches for the GPU and memory benchmarks.

    ModelShape --random_vlm--> InternVLModel (our ViT, projector, an HF LLM from a config dict)
        --prepare (freeze policy, checkpoint hooks, device, train mode: as prepare_model)-->
    seeded sample lengths --packed_batch--> PackedBatch rows of <= N tokens and <= T tiles

No files and no tokenizer: token ids are random below the vocabulary, the image context id is
the last id. Each sample is a prompt, one image of k tiles (k * tokens-per-tile context
tokens), and a supervised answer; positions restart per sample, padding is its own segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from vlpretrain.config import RunConfig, TrainConfig
from vlpretrain.data.collate import BatchStats, PackedBatch
from vlpretrain.distributed.parallel import enable_activation_checkpointing
from vlpretrain.model import attention
from vlpretrain.model.build import ModelConfig
from vlpretrain.model.llm import llm_from_config
from vlpretrain.model.vision import InternViT, VisionConfig, init_vision_weights
from vlpretrain.model.vlm import InternVLModel, VLMConfig
from vlpretrain.train.freeze import FreezeConfig, apply_freeze_policy, apply_train_mode

INTERNVIT_300M = VisionConfig(
    image_size=448, qkv_bias=True, hidden_size=1024, num_attention_heads=16,
    intermediate_size=4096, qk_normalization=False, num_hidden_layers=24, norm_type="layer_norm",
    initializer_factor=1.0,
)  # fmt: skip
"""InternViT-300M-448px's shape (config.json of OpenGVLab/InternViT-300M-448px)."""
QWEN2_5_1_5B = {
    "model_type": "qwen2", "vocab_size": 151936 + 9, "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
}  # fmt: skip
"""Qwen2.5-1.5B's shape (+ the 9 InternVL tokens, untied head as our Path B makes it)."""
QWEN2_5_0_5B = {
    **QWEN2_5_1_5B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2,
}  # fmt: skip
"""Qwen2.5-0.5B's shape, the 1B recipe's LLM (+ the 9 InternVL tokens, untied head as our Path
B makes it: the checkpoint ties it to the embedding)."""
INTERNLM2_5_7B = {
    "model_type": "llama", "vocab_size": 92544 + 9, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False,
}  # fmt: skip
"""internlm2_5-7b-chat's shape (+ the 9 InternVL tokens), the 8B recipe's LLM, as the Llama it
trains as (model/internlm2.py)."""

STAGES = {
    "stage1": FreezeConfig(freeze_backbone=True, freeze_llm=True),
    "stage1_5": FreezeConfig(freeze_llm=True),
    "stage2": FreezeConfig(),
}


@dataclass(frozen=True)
class ModelShape:
    vision: VisionConfig
    llm: dict[str, Any] = field(default_factory=dict)
    tile: int = 448


def random_vlm(shape: ModelShape, attn_implementation: str, seed: int = 0) -> InternVLModel:
    """A random-weight VLM of `shape` on CPU, fp32 (the loop's master-weight dtype)."""
    torch.manual_seed(seed)
    attention.register_kernels()
    vision = InternViT(replace(shape.vision, image_size=shape.tile))
    device = vision.embeddings.class_embedding.device  # the caller's torch.device context
    if device.type != "meta":  # a meta build only counts: it has no values to initialise
        init_vision_weights(vision, torch.Generator(device=device).manual_seed(seed))
    llm = llm_from_config(shape.llm, attn_implementation)
    image_context = int(shape.llm["vocab_size"]) - 1
    return InternVLModel(VLMConfig(force_image_size=shape.tile), vision, llm, image_context)


def prepare(model: InternVLModel, stage: str, checkpointing: bool, device: torch.device) -> None:
    """What prepare_model does after the build, for one GPU (no wrapper)."""
    apply_freeze_policy(model, STAGES[stage])
    mode = "full" if checkpointing else "none"
    enable_activation_checkpointing(model, vision=mode, llm=mode)
    model.to(device)
    apply_train_mode(model)


def run_config(precision: str) -> RunConfig:
    """The settings train_step reads (no paths are opened)."""
    return RunConfig(
        model=ModelConfig(model_name_or_path="random-weights"),
        train=TrainConfig(precision=precision, report_to=("none",), resume="never"),
    )


def sample_lengths(
    rng: np.random.Generator, count: int, max_tiles: int, max_text: int
) -> list[tuple[int, int]]:
    """(text tokens, tiles) per sample: a caption/QA-like mixture of 1..max_tiles tiles."""
    tiles = rng.integers(1, max_tiles + 1, size=count)
    text = rng.integers(16, max_text, size=count)
    return list(zip(text.tolist(), tiles.tolist(), strict=True))


def packed_batch(
    model: InternVLModel, rows: int, row_tokens: int, row_tiles: int, seed: int = 0
) -> PackedBatch:
    """`rows` packed rows for `model` of at most `row_tokens` tokens and `row_tiles` tiles."""
    return synthetic_rows(
        model.num_image_token,
        model.image_context_token_id,
        model.config.force_image_size,
        rows,
        row_tokens,
        row_tiles,
        seed,
    )


def synthetic_rows(
    per_tile: int,
    image_context: int,
    tile: int,
    rows: int,
    row_tokens: int,
    row_tiles: int,
    seed: int = 0,
    max_tiles_per_sample: int = 13,
) -> PackedBatch:
    """Greedily filled packed rows; token ids below `image_context`, which marks image slots."""
    rng = np.random.default_rng(seed)
    vocab = image_context
    ids, labels, positions, segments, tile_count = [], [], [], [], 0
    num_samples = real = 0
    for _ in range(rows):
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_positions: list[int] = []
        row_tile_count = misses = 0
        max_tiles = min(max_tiles_per_sample, row_tiles)
        for text, tiles in sample_lengths(rng, 4096, max_tiles, max(32, row_tokens // 8)):
            length = text + tiles * per_tile
            if len(row_ids) + length > row_tokens or row_tile_count + tiles > row_tiles:
                misses += 1
                if misses > 64:  # the row is about full: close it
                    break
                continue
            prompt = rng.integers(0, vocab, size=text // 2).tolist()
            answer = rng.integers(0, vocab, size=text - text // 2).tolist()
            row_ids += prompt + [vocab] * (tiles * per_tile) + answer
            row_labels += [-100] * (len(prompt) + tiles * per_tile) + answer
            row_positions += list(range(length))
            segments.append(length)
            row_tile_count += tiles
            num_samples += 1
        real += len(row_ids)
        pad = row_tokens - len(row_ids)
        if pad:
            segments.append(pad)
        ids.append(row_ids + [0] * pad)
        labels.append(row_labels + [-100] * pad)
        positions.append(row_positions + list(range(pad)))
        tile_count += row_tile_count
    label_t = torch.tensor(labels)
    cu = torch.tensor([0, *np.cumsum(segments).tolist()], dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    return PackedBatch(
        input_ids=torch.tensor(ids),
        labels=label_t,
        position_ids=torch.tensor(positions),
        cu_seqlens=cu,
        max_seqlen=max(segments),
        loss_weight=(label_t != -100).float(),
        pixel_values=torch.randn(tile_count, 3, tile, tile, generator=generator),
        image_flags=torch.ones(tile_count, dtype=torch.long),
        num_tiles_per_image=(),
        sample_ids=(),
        stats=BatchStats(
            num_rows=rows,
            num_samples=num_samples,
            num_real_tokens=real,
            num_padding_tokens=rows * row_tokens - real,
            num_tiles=tile_count,
            num_dummy_tiles=0,
            samples_per_dataset=(num_samples,),
            token_capacity=rows * row_tokens,
        ),
    )
