"""Save a model in the InternVL chat layout: what every stage exports and the next one loads.

    InternVLModel --to_reference_keys, the family adapter's disk layout--> model*.safetensors
                  --internvl_config_dict (4.x and 5.x keys)----------------> config.json
    tokenizer     --save_pretrained + complete_tokenizer + the adapter's files--> tokenizer files

Reading this layout back is model/build.py's Path A.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch

from vlpretrain.formats.files import complete_tokenizer, with_legacy_keys
from vlpretrain.model import hub
from vlpretrain.model.build import LLM_PREFIX
from vlpretrain.model.families import adapter_of
from vlpretrain.model.vision import VisionConfig
from vlpretrain.model.vlm import InternVLModel, VLMConfig


def internvl_config_dict(
    model: InternVLModel,
    image_settings: dict[str, Any] | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """config.json content of the InternVL chat layout (a converted LLM back in its own keys);
    `image_settings` (VLMConfig tiling fields, e.g. SampleConfig.image_settings()) replace the
    model's own; weights are saved in `torch_dtype`."""
    config = model.language_model.config
    llm_config = adapter_of(config).disk_config(config)
    llm_config["tie_word_embeddings"] = False
    input_embeddings = cast(torch.Tensor, model.language_model.get_input_embeddings().weight)
    llm_config["vocab_size"] = input_embeddings.shape[0]
    vlm_config = replace(model.config, **(image_settings or {}))
    return chat_config_dict(
        vlm_config, model.vision_model.config, llm_config, model.llm_hidden_size, torch_dtype
    )


def chat_config_dict(
    vlm_config: VLMConfig,
    vision_config: VisionConfig,
    llm_config: dict[str, Any],
    llm_hidden_size: int,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """config.json content of the InternVL chat layout from its parts (an untied LLM), with the
    keys transformers 4.x readers need beside the 5.x ones (model.export_files)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        **vlm_config.to_dict(),
        "hidden_size": llm_hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "vision_config": {**vision_config.to_dict(), "torch_dtype": torch_dtype},
        "llm_config": with_legacy_keys(llm_config, torch_dtype),
    }


def save_internvl(
    model: InternVLModel,
    tokenizer: Any,
    directory: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    image_settings: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` in the InternVL chat layout, floating weights in `dtype`; `state` overrides
    the weights (e.g. gathered from FSDP shards on rank 0); `image_settings` are the tiling
    settings the model was trained with, recorded in config.json so chat tiles images the
    same way.

    Beside the weights: config.json with 4.x and 5.x keys, the tokenizer (completed for 4.x
    slow tokenizers) and the LLM's remote-code files, copied from the directory the tokenizer
    came from (llm_path on Path B, model_name_or_path on Path A: the LLM's source too).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = hub.to_reference_keys(state if state is not None else model.state_dict())
    llm_config = model.language_model.config
    adapter = adapter_of(llm_config)
    weights = adapter.to_disk_state(weights, llm_config, prefix=LLM_PREFIX)
    hub.save_weights(weights, directory, dtype)
    config = internvl_config_dict(model, image_settings, str(dtype).removeprefix("torch."))
    hub.write_config(directory, config)
    tokenizer.save_pretrained(str(directory))
    source = Path(tokenizer.name_or_path)
    complete_tokenizer(tokenizer, source if source.is_dir() else None, directory)
    adapter.save_files(llm_config, tokenizer, source, directory)
    generation = {"eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory
