"""Tiny stand-ins for pretrained components, saved as HF-format directories.

Tests and benchmarks cannot download weights, so they build a small InternViT directory and a
small Qwen2 directory (with a byte-level BPE tokenizer) here; tools/make_demo_components.py
pretrains the demo's from the same configs. Both are loaded back through exactly the same
Path B code a real InternViT-300M and Qwen2.5 would use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlpretrain.model.build import new_vision, save_vision
from vlpretrain.model.vision import VisionConfig
from vlpretrain.testing.tokenizer import DEFAULT_CORPUS, train_tiny_tokenizer

TINY_VISION = VisionConfig(
    patch_size=14,
    image_size=56,
    qkv_bias=True,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
    qk_normalization=False,
    num_hidden_layers=2,
    norm_type="layer_norm",
    initializer_factor=1.0,
)
"""A 2-layer, 64-wide ViT on 56-px tiles: 16 patches -> 4 LLM tokens per tile."""


@dataclass(frozen=True)
class TinyComponents:
    vision_path: Path
    llm_path: Path


def tiny_llm_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.02,
    heads: tuple[int, int] = (4, 2),
) -> Qwen2Config:
    """A tiny Qwen2; `init_std` is the weights' initial standard deviation (Qwen2's 0.02 by
    default: the demo's LLM pretraining starts wider, see tools/make_demo_components.py); `heads` is
    (attention heads, key/value heads)."""
    # attn_implementation is a PreTrainedConfig kwarg consumed in __post_init__; the
    # dataclass_transform signature mypy sees lists only the Qwen2Config fields.
    return Qwen2Config(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=init_std,
        attn_implementation="sdpa",
    )


def build_tiny_components(
    output_dir: str | Path,
    seed: int = 0,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    vision_config: VisionConfig = TINY_VISION,
    llm_hidden_size: int = 64,
    llm_layers: int = 2,
) -> TinyComponents:
    """Write `vit/` and `llm/` (weights + tokenizer) under `output_dir`, randomly initialised."""
    output_dir = Path(output_dir)
    vision_path = save_vision(new_vision(vision_config, seed), output_dir / "vit")
    llm_path = output_dir / "llm"
    tokenizer = train_tiny_tokenizer(llm_path, corpus)
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(tiny_llm_config(len(tokenizer), llm_hidden_size, llm_layers))
    llm.save_pretrained(str(llm_path))
    return TinyComponents(vision_path=vision_path, llm_path=llm_path)
