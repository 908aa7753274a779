"""The seam between an LLM family's on-disk format and the transformers-native model we train.

Every family trains as a transformers-native model (model/families.py says why). A family
whose checkpoints already are native (Qwen2, Llama, ...) passes through unchanged; a family
that ships as remote code is *converted*: on load its config and tensors become a native
model's, on save they go back to the family's own layout so its ecosystem reads the result.
One `FamilyAdapter` per family owns both directions, so no call site names a family:

    on disk                          adapter                            trained
    config.json dict      --native_config / disk_config-->        PretrainedConfig
    tensors (prefix)      --to_native_state / to_disk_state-->    native tensors
    tokenizer directory   --load_tokenizer-->                     a tokenizer without remote code
    save directory        <--save_files--                         remote-code *.py, tokenizer class

`FamilyAdapter` itself is the identity (what native families use); a converted family
subclasses it (model/internlm2.py) and is registered in model/families.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from vlpretrain.model import hub


class FamilyAdapter:
    """A native family: its on-disk config and tensors are what transformers trains."""

    reads_directory_natively = True
    """Whether transformers' own `from_pretrained` reads the family's directory (sharded,
    memory-mapped); a converted family's tensors are loaded, converted and handed over."""

    def __init__(self, model_type: str, trains_as: str) -> None:
        self.model_type = model_type
        """`model_type` of the family's config.json."""
        self.trains_as = trains_as
        """The transformers-native class it trains as (for messages and docs)."""

    def owns(self, native_config: Any) -> bool:
        """Whether `native_config` was converted by this adapter (identity: by its model_type)."""
        return getattr(native_config, "model_type", None) == self.model_type

    def native_config(
        self,
        config_dict: dict[str, Any],
        code_dir: str | Path | None = None,
        where: str = "llm config",
    ) -> PretrainedConfig:
        """The config we train from an on-disk config dict (`code_dir`: the directory holding
        the family's remote-code files, `where`: named in errors)."""
        values = dict(config_dict)
        model_type = values.pop("model_type")
        return AutoConfig.for_model(model_type, **values)

    def disk_config(self, native_config: Any) -> dict[str, Any]:
        """The on-disk config dict of a config we train (inverse of native_config)."""
        return dict(native_config.to_dict())

    def native_config_dict(self, config_dict: dict[str, Any], where: str) -> dict[str, Any]:
        """An on-disk config dict as the native config's dict, for formats that only know
        native families (transformers' InternVL); unchanged for a native family."""
        return config_dict

    def to_native_state(
        self, state: dict[str, torch.Tensor], native_config: Any, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """The family's tensors under `prefix` renamed to the native model's; others unchanged."""
        return state

    def to_disk_state(
        self, state: dict[str, torch.Tensor], native_config: Any, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """Inverse of to_native_state."""
        return state

    def load_tokenizer(self, directory: Path) -> Any | None:
        """The family's tokenizer read without remote code, or None when `directory` does not
        hold this family's remote-code tokenizer (the generic loader then reads it)."""
        return None

    def save_files(self, native_config: Any, tokenizer: Any, source: Path, directory: Path) -> None:
        """After the weights, config and tokenizer are written to `directory`: the family's
        remote-code *.py files beside them, here those the saved auto_maps name, copied from
        `source` (the directory the tokenizer came from)."""
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
        auto_maps = [getattr(native_config, "auto_map", None), tokenizer_config.get("auto_map")]
        hub.copy_remote_code(source, directory, auto_maps)
