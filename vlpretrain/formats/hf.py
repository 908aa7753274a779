"""Convert a model directory between the InternVL chat layout and transformers' InternVL format.

    InternVL chat dir                                 transformers dir
    config.json (internvl_chat)        export_hf      config.json (internvl)
    vision_model.*  (fused attn.qkv)  ----------->    vision_tower.*  (q/k/v_proj)
    mlp1.{0,1,3}.*                    <-----------    multi_modal_projector.*
    language_model.{model.*,lm_head}  export_internvl language_model.{model.*,lm_head}
    tokenizer + generation files       (copied)       tokenizer + generation files

The transformers side is `InternVLForConditionalGeneration` (model_type `internvl`), as
`save_pretrained` writes it; `export_internvl` also reads the in-memory key names
(`model.vision_tower.*`, `lm_head.*`). Mapping decisions, checked against the installed
transformers code and pinned by tests/unit/test_export_hf.py:
- InternVL drops the CLS token before pixel shuffle: `vision_feature_select_strategy`
  'default' does that ('full' would keep it), so only 'default' is written or accepted.
- `select_layer` == `vision_feature_layer`: both index (embeddings, layer 1, ..., layer L).
- transformers always uses the row-major (ps_version v2) pixel-shuffle token order; a v1
  checkpoint cannot be represented and is refused.
- InternViT has no final norm: `use_mean_pooling` is True (the vision `layernorm` is Identity).
- transformers' q/k norms always use eps 1e-6; other eps values with qk_normalization are
  refused.
- Chat-config fields transformers does not model (template, tiling, force_image_size, ViT
  drop_path_rate) travel in `internvl_chat_fields`, so the round trip is exact.
What it does not do: instantiate either model (tensors are only renamed, split or fused),
or write the processor files (vlpretrain.formats.export, which needs the data-side settings).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, InternVLConfig, PreTrainedConfig

from vlpretrain.formats.files import write_legacy_bpe_files
from vlpretrain.formats.internvl import chat_config_dict
from vlpretrain.model import hub
from vlpretrain.model.build import LLM_PREFIX
from vlpretrain.model.families import family_adapter
from vlpretrain.model.llm import load_tokenizer
from vlpretrain.model.vision import VisionConfig
from vlpretrain.model.vlm import VLMConfig, num_image_tokens
from vlpretrain.tokens import IMG_CONTEXT, token_id

logger = logging.getLogger(__name__)

EXTRA_FIELDS_KEY = "internvl_chat_fields"
"""HF config key holding the chat-config fields transformers has no place for."""
HF_QK_NORM_EPS = 1e-6
"""transformers builds the vision q/k RMSNorms with their default eps, not layer_norm_eps."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Key tables, chat layout -> transformers on-disk layout. Inverted for the other direction.
CHAT_LAYER_PREFIX = "vision_model.encoder.layers."
HF_LAYER_PREFIX = "vision_tower.encoder.layer."
LAYER_MODULES = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
}
LAYER_PARAMS = {"ls1": "lambda_1", "ls2": "lambda_2"}
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding"
TOP_MODULES = {
    PATCH_EMBEDDING: "vision_tower.embeddings.patch_embeddings.projection",
    "mlp1.0": "multi_modal_projector.layer_norm",
    "mlp1.1": "multi_modal_projector.linear_1",
    "mlp1.3": "multi_modal_projector.linear_2",
}
TOP_PARAMS = {
    "vision_model.embeddings.class_embedding": "vision_tower.embeddings.cls_token",
    "vision_model.embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
}
HF_IN_MEMORY_PREFIXES = {
    # InternVLForConditionalGeneration.state_dict() name -> the name save_pretrained writes.
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}
QKV_PARTS = ("q_proj", "k_proj", "v_proj")
EMBED_KEY = "language_model.model.embed_tokens.weight"
HEAD_KEY = "language_model.lm_head.weight"


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _rename(key: str, modules: dict[str, str], params: dict[str, str]) -> str | None:
    """`key` renamed by an exact parameter entry or by its module path; None if unknown."""
    if key in params:
        return params[key]
    module, _, param = key.rpartition(".")
    if module in modules:
        return f"{modules[module]}.{param}"
    return None


# ----------------------------------------------------------------------------- weights


def _layer_key_to_hf(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    index, _, rest = key[len(CHAT_LAYER_PREFIX) :].partition(".")
    prefix = f"{HF_LAYER_PREFIX}{index}."
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        # Our fused projection stacks q, k and v rows in that order (see VisionAttention).
        param = rest.rpartition(".")[2]
        parts = value.chunk(3, dim=0)
        return {
            f"{prefix}attention.{name}.{param}": t for name, t in zip(QKV_PARTS, parts, strict=True)
        }
    renamed = _rename(rest, LAYER_MODULES, LAYER_PARAMS)
    return None if renamed is None else {prefix + renamed: value}


def state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chat-layout tensors -> transformers on-disk names (fused qkv split into q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("language_model."):
            out[key] = value
            continue
        if key.startswith(CHAT_LAYER_PREFIX):
            mapped = _layer_key_to_hf(key, value)
        else:
            renamed = _rename(key, TOP_MODULES, TOP_PARAMS)
            mapped = None if renamed is None else {renamed: value}
        if mapped is None:
            unknown.append(key)
        else:
            out.update(mapped)
    if unknown:
        raise ValueError(f"no transformers name for chat-layout tensors {sorted(unknown)}")
    return out


def _fuse_qkv(state: dict[str, torch.Tensor], prefix: str, param: str) -> torch.Tensor:
    parts = [state.pop(f"{prefix}attention.{name}.{param}") for name in QKV_PARTS]
    return torch.cat(parts, dim=0)


def _to_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the in-memory names of a transformers state dict as well as the on-disk ones."""
    out = {}
    for key, value in state.items():
        for memory, disk in HF_IN_MEMORY_PREFIXES.items():
            if key.startswith(memory):
                key = disk + key[len(memory) :]
                break
        out[key] = value
    return out


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers tensors -> chat-layout names (q/k/v fused into attn.qkv)."""
    state = _to_disk_names(state)
    modules, params = _invert(TOP_MODULES), _invert(TOP_PARAMS)
    layer_modules, layer_params = _invert(LAYER_MODULES), _invert(LAYER_PARAMS)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key in sorted(state):
        if key not in state:  # already consumed by a q/k/v fusion
            continue
        if key.startswith("language_model."):
            out[key] = state[key]
        elif key.startswith(HF_LAYER_PREFIX):
            index, _, rest = key[len(HF_LAYER_PREFIX) :].partition(".")
            prefix, chat_prefix = f"{HF_LAYER_PREFIX}{index}.", f"{CHAT_LAYER_PREFIX}{index}."
            name, _, param = rest.rpartition(".")
            if name in {f"attention.{part}" for part in QKV_PARTS}:
                out[f"{chat_prefix}attn.qkv.{param}"] = _fuse_qkv(state, prefix, param)
                continue
            renamed = _rename(rest, layer_modules, layer_params)
            if renamed is None:
                unknown.append(key)
            else:
                out[chat_prefix + renamed] = state[key]
        else:
            renamed = _rename(key, modules, params)
            if renamed is None:
                unknown.append(key)
            else:
                out[renamed] = state[key]
    if unknown:
        raise ValueError(f"no chat-layout name for transformers tensors {unknown}")
    return out


def _untie_head(state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """Give a tied-embedding checkpoint an explicit lm_head (both formats we write are untied)."""
    if HEAD_KEY not in state and EMBED_KEY in state:
        logger.warning("%s: no %s; copying the input embeddings", directory, HEAD_KEY)
        state = {**state, HEAD_KEY: state[EMBED_KEY].clone()}
    return state


# ----------------------------------------------------------------------------- configs


def vision_config_to_hf(vision: VisionConfig) -> dict[str, Any]:
    """InternVisionConfig fields -> InternVLVisionConfig kwargs."""
    return {
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "hidden_act": vision.hidden_act,
        "attention_bias": vision.qkv_bias,
        "use_qk_norm": vision.qk_normalization,
        "norm_type": vision.norm_type,
        "layer_norm_eps": vision.layer_norm_eps,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": vision.num_channels,
        "attention_dropout": vision.attention_dropout,
        "projection_dropout": vision.dropout,
        "hidden_dropout_prob": 0.0,
        "initializer_range": vision.initializer_range,
        "layer_scale_init_value": vision.initializer_factor,
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
    }


def _square(value: int | list[int] | tuple[int, ...], name: str, problems: list[str]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        problems.append(f"vision {name} {list(value)} is not square")
    return int(value[0])


def vision_config_from_hf(raw: dict[str, Any], drop_path_rate: float) -> VisionConfig:
    """InternVLVisionConfig dict -> our VisionConfig; raises when it cannot be represented."""
    problems: list[str] = []
    if not raw["use_mean_pooling"]:
        problems.append("vision use_mean_pooling is False (a final norm InternViT does not have)")
    if not raw["use_absolute_position_embeddings"]:
        problems.append("vision use_absolute_position_embeddings is False")
    if raw["use_qk_norm"] and raw["layer_norm_eps"] != HF_QK_NORM_EPS:
        problems.append(
            f"vision layer_norm_eps {raw['layer_norm_eps']} with use_qk_norm: transformers' "
            f"q/k norms use {HF_QK_NORM_EPS}, ours would use layer_norm_eps"
        )
    image_size = _square(raw["image_size"], "image_size", problems)
    patch_size = _square(raw["patch_size"], "patch_size", problems)
    if problems:
        raise ValueError("cannot convert to the InternVL chat layout: " + "; ".join(problems))
    if raw["hidden_dropout_prob"]:
        dropout = raw["hidden_dropout_prob"]
        logger.warning("vision hidden_dropout_prob %s has no InternViT field; dropped", dropout)
    return VisionConfig(
        num_channels=raw["num_channels"],
        patch_size=patch_size,
        image_size=image_size,
        qkv_bias=raw["attention_bias"],
        hidden_size=raw["hidden_size"],
        num_attention_heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        qk_normalization=raw["use_qk_norm"],
        num_hidden_layers=raw["num_hidden_layers"],
        hidden_act=raw["hidden_act"],
        norm_type=raw["norm_type"],
        layer_norm_eps=raw["layer_norm_eps"],
        dropout=raw["projection_dropout"],
        drop_path_rate=drop_path_rate,
        attention_dropout=raw["attention_dropout"],
        initializer_range=raw["initializer_range"],
        initializer_factor=raw["layer_scale_init_value"],
    )


def _hf_incompatibilities(chat: dict[str, Any], vlm: VLMConfig, vision: VisionConfig) -> list[str]:
    problems = []
    if vlm.ps_version != "v2":
        problems.append(
            f"ps_version {vlm.ps_version!r}: transformers' InternVL always uses the row-major "
            "(v2) pixel-shuffle token order, and no weight change reproduces the transposed v1 "
            "order; keep this checkpoint in the InternVL chat layout"
        )
    llm_type = chat["llm_config"].get("model_type")
    if llm_type not in CONFIG_MAPPING:
        problems.append(
            f"llm_config model_type {llm_type!r} is not a transformers-native model (remote "
            "code); transformers' InternVL needs one such as qwen2, qwen3 or llama"
        )
    if vision.qk_normalization and vision.layer_norm_eps != HF_QK_NORM_EPS:
        problems.append(
            f"vision layer_norm_eps {vision.layer_norm_eps} with qk_normalization: "
            f"transformers' q/k norms always use eps {HF_QK_NORM_EPS}"
        )
    return problems


def hf_config_from_chat(chat: dict[str, Any], image_token_id: int, dtype: str) -> InternVLConfig:
    """InternVL chat config.json dict -> InternVLConfig; raises listing what cannot convert."""
    vlm = VLMConfig.from_dict(chat)
    vision = VisionConfig.from_dict(chat["vision_config"])
    problems = _hf_incompatibilities(chat, vlm, vision)
    if problems:
        raise ValueError("cannot convert to transformers' InternVL: " + "; ".join(problems))
    mapped = {"downsample_ratio", "ps_version", "select_layer"}
    extra = {k: v for k, v in vlm.to_dict().items() if k not in mapped}
    extra["vision_drop_path_rate"] = vision.drop_path_rate
    text_config = {**chat["llm_config"], "tie_word_embeddings": False}
    extra_fields: dict[str, Any] = {EXTRA_FIELDS_KEY: extra}
    return InternVLConfig(
        vision_config=vision_config_to_hf(vision),
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(
            vlm.force_image_size, vision.patch_size, vlm.downsample_ratio
        ),
        downsample_ratio=vlm.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=vlm.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
        dtype=dtype,
        **extra_fields,
    )


def chat_config_from_hf(hf: InternVLConfig, vocab_size: int) -> dict[str, Any]:
    """InternVLConfig -> InternVL chat config.json dict; raises when it cannot be represented."""
    problems = []
    if hf.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy {hf.vision_feature_select_strategy!r} keeps the "
            "CLS token; InternVL drops it ('default')"
        )
    if not isinstance(hf.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {hf.vision_feature_layer} is not a single layer")
    if hf.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {hf.projector_hidden_act!r} is not gelu")
    if problems:
        raise ValueError("cannot convert to the InternVL chat layout: " + "; ".join(problems))
    vision_config, text_config = hf.vision_config, hf.text_config
    if not isinstance(vision_config, PreTrainedConfig) or not isinstance(
        text_config, PreTrainedConfig
    ):
        raise ValueError(
            "cannot convert to the InternVL chat layout: vision_config and text_config must be "
            f"config objects, got {type(vision_config).__name__} and "
            f"{type(text_config).__name__} (build the InternVLConfig through its constructor)"
        )
    extra = dict(getattr(hf, EXTRA_FIELDS_KEY, None) or {})
    vision = vision_config_from_hf(
        vision_config.to_dict(), float(extra.pop("vision_drop_path_rate", 0.0))
    )
    extra.setdefault("force_image_size", vision.image_size)
    vlm = VLMConfig.from_dict(
        {
            **extra,
            "downsample_ratio": hf.downsample_ratio,
            "ps_version": "v2",
            "select_layer": hf.vision_feature_layer,
        }
    )
    llm_config = text_config.to_dict()
    llm_config.update(tie_word_embeddings=False, vocab_size=vocab_size)
    dtype = str(hf.dtype).removeprefix("torch.") if hf.dtype is not None else "float32"
    return chat_config_dict(vlm, vision, llm_config, text_config.hidden_size, dtype)


# ----------------------------------------------------------------------------- directories


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy tokenizer and generation files that exist in `source` and the tokenizer code its
    auto_map names; a BPE tokenizer.json in the form tokenizers 0.15 reads, with its slow
    files. Returns the names written."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, destination / name)
    if not copied:
        raise FileNotFoundError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    # A directory written before BPE files got their older form (or by another tool) gets it
    # here, so the export loads under tokenizers 0.15 and the slow classes too.
    written = write_legacy_bpe_files(destination)
    copied += [name for name in written if name not in copied]
    return copied + _copy_tokenizer_code(source, destination)


def _copy_tokenizer_code(source: Path, destination: Path) -> list[str]:
    """Copy the remote-code tokenizer files the copied tokenizer_config names (InternLM2's).

    Readers that load the tokenizer through `auto_map` (trust_remote_code=True) find them
    beside the export; without them such a reader fails on a missing module.
    """
    config_path = destination / "tokenizer_config.json"
    if not config_path.is_file():
        return []
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map")
    return hub.copy_remote_code(source, destination, [auto_map])


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def _prepare_output(source: Path, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ValueError(f"output directory {out} is the input directory; choose another")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _native_llm(
    chat: dict[str, Any], state: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The chat config and tensors with the LLM in the native family it trains as (unchanged
    for a native family)."""
    llm_config = chat["llm_config"]
    adapter = family_adapter(llm_config, where)
    native = adapter.native_config(llm_config, where=where)
    state = adapter.to_native_state(state, native, prefix=LLM_PREFIX)
    return {**chat, "llm_config": adapter.native_config_dict(llm_config, where)}, state


def export_hf(internvl_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an InternVL chat directory in transformers' native InternVL format."""
    source = Path(internvl_dir)
    chat = hub.read_config(source)
    if chat.get("model_type") != "internvl_chat":
        raise ValueError(
            f"{source}/config.json: model_type is {chat.get('model_type')!r}, expected "
            "'internvl_chat' (use --to internvl for a transformers InternVL directory)"
        )
    tokenizer, num_added = load_tokenizer(source)
    if num_added:
        raise ValueError(f"{source}: tokenizer lacks the InternVL tokens; not an InternVL export")
    # transformers' InternVL knows native LLMs only: a converted one (InternLM2) becomes the
    # native model it computes as.
    chat, weights = _native_llm(chat, hub.load_weights(source), f"{source}/config.json llm_config")
    state = _untie_head(weights, source)
    config = hf_config_from_chat(chat, token_id(tokenizer, IMG_CONTEXT), _dtype_name(state))
    hf_state = state_to_hf(state)
    out = _prepare_output(source, out_dir)
    hub.save_weights(hf_state, out)
    config.save_pretrained(str(out))
    copied = copy_tokenizer_files(source, out)
    logger.info("exported %s -> %s (transformers InternVL; copied %s)", source, out, copied)
    return out


def export_internvl(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers InternVL directory in the InternVL chat layout (inverses export_hf)."""
    source = Path(hf_dir)
    raw = hub.read_config(source)
    if raw.get("model_type") != "internvl":
        raise ValueError(
            f"{source}/config.json: model_type is {raw.get('model_type')!r}, expected "
            "'internvl' (use --to hf for an InternVL chat directory)"
        )
    hf = InternVLConfig.from_pretrained(str(source))
    state = _untie_head(state_from_hf(hub.load_weights(source)), source)
    chat = chat_config_from_hf(hf, vocab_size=state[EMBED_KEY].shape[0])
    out = _prepare_output(source, out_dir)
    hub.save_weights(state, out)
    hub.write_config(out, chat)
    copied = copy_tokenizer_files(source, out)
    logger.info("exported %s -> %s (InternVL chat layout; copied %s)", source, out, copied)
    return out
