"""Build the VLM from `ModelConfig`: Path B (separate ViT + LLM) or Path A (InternVL dir).

    Path B: vision_path (InternViT dir) + llm_path (HF causal LM dir) [+ mlp_path]
            -> tokens added, embeddings resized (mean rows), LLM untied, fresh projector
    Path A: model_name_or_path (InternVL chat dir written by us or the reference)
            -> everything restored; settings the user does not set explicitly come from the
               checkpoint (the reference overwrote them with its CLI defaults)

Also derives the RunFacts of a built model (`run_facts`) or, without loading weights, of a
ModelConfig (`read_run_facts`); saving in the InternVL chat layout is formats/internvl.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from vlpretrain.facts import RunFacts
from vlpretrain.model import attention, hub
from vlpretrain.model.families import adapter_of
from vlpretrain.model.llm import (
    llm_from_config,
    load_llm,
    load_tokenizer,
    resize_for_tokens,
    untie_embeddings,
)
from vlpretrain.model.vision import InternViT, VisionConfig, init_vision_weights
from vlpretrain.model.vlm import InternVLModel, VLMConfig, num_image_tokens
from vlpretrain.tokens import IMG_CONTEXT, token_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Where the model comes from and the settings that shape it."""

    model_name_or_path: str = ""
    """Path A: an InternVL chat directory (the previous stage's export)."""
    vision_path: str = ""
    """Path B: a standalone InternViT directory."""
    llm_path: str = ""
    """Path B: a HF causal-LM directory (also the tokenizer source)."""
    mlp_path: str = ""
    """Optional projector state dict (`0.weight`, `1.weight`, `3.weight`, ...) loaded strictly."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the ViT at its last layer (linear over layers)."""
    force_image_size: int | None = None
    """Tile side; position embeddings are resized when it differs (None: checkpoint / 448)."""
    down_sample_ratio: float | None = None
    """Pixel-shuffle ratio (None: checkpoint's, or 0.5 on Path B)."""
    ps_version: Literal["v1", "v2"] | None = None
    """Pixel-shuffle order (None: checkpoint's, or v2 on Path B)."""
    vision_select_layer: int | None = None
    """ViT layer feeding the projector (None: checkpoint's, or -1)."""
    conv_style: str | None = None
    """Chat template (None: checkpoint's, or internvl2_5)."""
    attn_implementation: str = "auto"
    """LLM attention kernel: auto (CUDA: flash_attention_2 if flash-attn is installed, else
    torch_varlen, else flex_attention; CPU: sdpa), or one of sdpa, eager, flex_attention,
    flash_attention_2, torch_varlen; torch_varlen_reference runs the varlen path on CPU with a
    slow per-sample kernel, for tests (model/attention.py)."""
    trust_remote_code: bool = False
    """Allow a tokenizer that exists only as remote code (auto_map) to run Python from its
    directory. InternLM2 needs no remote code (native tokenizer and Llama conversion); LLMs
    themselves never run remote code (model/families.py)."""
    use_fast_tokenizer: bool = True
    """False: the directory's own slow (sentencepiece) tokenizer where it has one (remote code,
    so it needs trust_remote_code; InternLM2's native tokenizer is the sentencepiece one
    anyway). The reference's scripts pass --use_fast_tokenizer False."""

    def __post_init__(self) -> None:
        if self.model_name_or_path and (self.vision_path or self.llm_path):
            raise ValueError(
                "model: set either model_name_or_path (Path A) or vision_path + llm_path "
                "(Path B), not both"
            )
        if not self.model_name_or_path and not (self.vision_path and self.llm_path):
            raise ValueError(
                "model: set model_name_or_path (Path A), or both vision_path and llm_path (Path B)"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.attn_implementation not in attention.KNOWN_KERNELS:
            raise ValueError(
                f"model.attn_implementation {self.attn_implementation!r} is not one of "
                f"{list(attention.KNOWN_KERNELS)}"
            )


@dataclass
class BuiltModel:
    model: InternVLModel
    tokenizer: Any
    path: Literal["A", "B"]


PATH_B_DEFAULTS = VLMConfig()
LLM_PREFIX = "language_model."
"""Where the LLM's tensors live in the InternVL chat layout."""


def _vlm_config(base: VLMConfig, config: ModelConfig) -> VLMConfig:
    explicit = {
        "force_image_size": config.force_image_size,
        "downsample_ratio": config.down_sample_ratio,
        "ps_version": config.ps_version,
        "select_layer": config.vision_select_layer,
        "template": config.conv_style,
    }
    # Any: replace() checks **changes against every field's type; each value fits its own field.
    changes: dict[str, Any] = {k: v for k, v in explicit.items() if v is not None}
    return replace(base, **changes)


def build_model(
    config: ModelConfig, device: torch.device | None = None, half_precision: bool | None = None
) -> BuiltModel:
    """Build the VLM (fp32, CPU) from `config`; `device` is where it will run and
    `half_precision` whether it trains in bf16 (None: unknown): they decide the LLM attention
    kernel of "auto"."""
    kernel, reason = attention.select_attention(
        config.attn_implementation, device or torch.device("cpu"), half_precision
    )
    attention.register_kernels()
    attention.log_choice(kernel, reason)
    config = replace(config, attn_implementation=kernel)
    if config.model_name_or_path:
        return _build_path_a(config)
    return _build_path_b(config)


def run_facts(model: InternVLModel, tokenizer: Any) -> RunFacts:
    """The facts data and packing need, from a built model and its tokenizer."""
    return RunFacts.from_tokenizer(
        tokenizer,
        tile_size=model.config.force_image_size,
        num_image_token=model.num_image_token,
        template=model.config.template,
    )


def read_run_facts(config: ModelConfig) -> RunFacts:
    """The RunFacts `build_model(config)` gives, read from config.json and tokenizer files only
    (no weights are loaded; for show-config and data check)."""
    if config.model_name_or_path:
        raw = hub.read_config(config.model_name_or_path)
        vlm_config = _vlm_config(VLMConfig.from_dict(raw), config)
        patch_size = VisionConfig.from_dict(raw["vision_config"]).patch_size
        tokenizer_dir = config.model_name_or_path
    else:
        vlm_config = _vlm_config(PATH_B_DEFAULTS, config)
        patch_size = VisionConfig.from_pretrained(config.vision_path).patch_size
        tokenizer_dir = config.llm_path
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    return RunFacts.from_tokenizer(
        tokenizer,
        tile_size=vlm_config.force_image_size,
        num_image_token=num_image_tokens(
            vlm_config.force_image_size, patch_size, vlm_config.downsample_ratio
        ),
        template=vlm_config.template,
    )


def load_vision(directory: str | Path, drop_path_rate: float) -> InternViT:
    """A standalone InternViT; also accepts a full InternVL dir (strips `vision_model.`)."""
    vision_config = VisionConfig.from_pretrained(directory)
    vision = InternViT(replace(vision_config, drop_path_rate=drop_path_rate))
    state = hub.strip_prefix(hub.load_weights(directory), "vision_model.")
    vision.load_state_dict(state, strict=True)
    return vision


def _build_path_b(config: ModelConfig) -> BuiltModel:
    vision = load_vision(config.vision_path, config.drop_path_rate)
    tokenizer, num_added = load_tokenizer(
        config.llm_path, config.trust_remote_code, config.use_fast_tokenizer
    )
    llm = load_llm(config.llm_path, config.attn_implementation)
    untie_embeddings(llm)
    resize_for_tokens(llm, len(tokenizer), num_added)
    vlm_config = _vlm_config(PATH_B_DEFAULTS, config)
    model = InternVLModel(vlm_config, vision, llm, token_id(tokenizer, IMG_CONTEXT))
    _fit_image_size(model)
    if config.mlp_path:
        _load_projector(model, config.mlp_path)
    logger.info("built Path B model from %s + %s", config.vision_path, config.llm_path)
    return BuiltModel(model=model, tokenizer=tokenizer, path="B")


def _build_path_a(config: ModelConfig) -> BuiltModel:
    directory = Path(config.model_name_or_path)
    raw = hub.read_config(directory)
    if raw.get("model_type") != "internvl_chat":
        raise ValueError(
            f"{directory}/config.json: model_type is {raw.get('model_type')!r}, expected "
            "'internvl_chat' (use vision_path + llm_path for separate components)"
        )
    model, tokenizer = _instantiate(raw, config, directory)
    checkpoint_config = model.config
    model.config = _vlm_config(checkpoint_config, config)
    if model.config.downsample_ratio != checkpoint_config.downsample_ratio:
        raise ValueError(
            f"model.down_sample_ratio {model.config.downsample_ratio} differs from the "
            f"checkpoint's {checkpoint_config.downsample_ratio} in {directory}"
        )
    _fit_image_size(model)
    if config.mlp_path:
        _load_projector(model, config.mlp_path)
    logger.info("loaded Path A model from %s", directory)
    return BuiltModel(model=model, tokenizer=tokenizer, path="A")


def _instantiate(
    raw: dict[str, Any], config: ModelConfig, directory: Path
) -> tuple[InternVLModel, Any]:
    vision_config = VisionConfig.from_dict(raw["vision_config"])
    vision = InternViT(replace(vision_config, drop_path_rate=config.drop_path_rate))
    llm = llm_from_config(raw["llm_config"], config.attn_implementation, code_dir=directory)
    tokenizer, num_added = load_tokenizer(
        directory, config.trust_remote_code, config.use_fast_tokenizer
    )
    if num_added:
        raise ValueError(
            f"{directory}: tokenizer lacks the InternVL tokens; not an InternVL export"
        )
    model = InternVLModel(VLMConfig.from_dict(raw), vision, llm, token_id(tokenizer, IMG_CONTEXT))
    state = hub.from_reference_keys(hub.load_weights(directory))
    state = adapter_of(llm.config).to_native_state(state, llm.config, prefix=LLM_PREFIX)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied-embedding export written by the reference has no lm_head: untie from the input.
    head_key = "language_model.lm_head.weight"
    if missing == [head_key] and "language_model.model.embed_tokens.weight" in state:
        logger.warning("%s: no %s in checkpoint; copying the input embeddings", directory, head_key)
        with torch.no_grad():
            llm.get_output_embeddings().weight.copy_(
                state["language_model.model.embed_tokens.weight"]
            )
        missing = []
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match: missing {missing}, unexpected {unexpected}"
        )
    return model, tokenizer


def _fit_image_size(model: InternVLModel) -> None:
    if model.vision_model.config.image_size != model.config.force_image_size:
        logger.info(
            "resizing ViT position embeddings %d -> %d px",
            model.vision_model.config.image_size,
            model.config.force_image_size,
        )
        model.vision_model.resize_position_embeddings(model.config.force_image_size)
    patch = model.vision_model.config.patch_size
    ratio = model.config.downsample_ratio
    model.num_image_token = int((model.config.force_image_size // patch) ** 2 * ratio**2)


def _load_projector(model: InternVLModel, mlp_path: str) -> None:
    raw = torch.load(mlp_path, map_location="cpu", weights_only=True)
    state = hub.from_reference_keys({f"mlp1.{k}": v for k, v in raw.items()})
    projector_state = {k[len("projector.") :]: v for k, v in state.items()}
    model.projector.load_state_dict(projector_state, strict=True)


def new_vision(config: VisionConfig, seed: int) -> InternViT:
    """A freshly initialised tower (for tiny test and demo components)."""
    vision = InternViT(config)
    init_vision_weights(vision, torch.Generator().manual_seed(seed))
    return vision


def save_vision(vision: InternViT, directory: str | Path) -> Path:
    """Write a standalone InternViT directory (config.json + model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hub.save_weights(vision.state_dict(), directory)
    hub.write_config(directory, vision.config.to_dict())
    return directory
