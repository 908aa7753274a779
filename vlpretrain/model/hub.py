"""Read and write model directories: standalone InternViT, and the InternVL chat layout.

The InternVL chat layout is what the reference and its ecosystem load: config.json with
`architectures: [InternVLChatModel]`, `model_type: internvl_chat`, `vision_config`,
`llm_config` and the top-level image fields; sharded safetensors with an index; tokenizer
files. Our `projector.{norm,fc1,fc2}` is renamed to the reference's `mlp1.{0,1,3}` here and
nowhere else.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from vlpretrain.files import apply_umask
from vlpretrain.model.projector import PROJECTOR_KEY_TO_REFERENCE

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


def to_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state-dict keys -> InternVL checkpoint keys (projector.X -> mlp1.N)."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("projector."):
            module, rest = key[len("projector.") :].split(".", 1)
            key = f"mlp1.{PROJECTOR_KEY_TO_REFERENCE[module]}.{rest}"
        renamed[key] = value
    return renamed


def from_reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternVL checkpoint keys -> ours (inverse of to_reference_keys)."""
    index_to_module = {v: k for k, v in PROJECTOR_KEY_TO_REFERENCE.items()}
    renamed = {}
    for key, value in state.items():
        if key.startswith("mlp1."):
            index, rest = key[len("mlp1.") :].split(".", 1)
            key = f"projector.{index_to_module[index]}.{rest}"
        renamed[key] = value
    return renamed


def save_weights(
    state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None = None
) -> None:
    """Write safetensors shards (+ index when more than one) of contiguous, unaliased tensors;
    floating tensors are cast to `dtype` when given (one tensor at a time)."""
    state = {
        k: v.detach()
        .to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)
        .contiguous()
        .clone()
        for k, v in state.items()
    }
    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(directory / filename), metadata={"format": "pt"})
        apply_umask(directory / filename)  # safetensors creates its files 0600
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: sharded or single safetensors, or pytorch_model.bin."""
    directory = Path(directory)
    index_path = directory / SAFETENSORS_INDEX
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(directory / name)))
        return state
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin found"
    )


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a model directory")
    return json.loads(path.read_text())


def write_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` with it removed; the state unchanged when no key has it."""
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


LORA_ADAPTER = "default"
"""The one PEFT adapter name our LoRA set-up uses (train/freeze.py)."""


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """Scaling of every LoRA layer of `model`, keyed by module name, as PEFT computed it from
    the adapter's own LoraConfig (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora,
    rank_pattern and alpha_pattern applied); empty without adapters."""
    from peft.tuners.lora import LoraLayer

    scalings = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if set(module.scaling) != {LORA_ADAPTER}:
            raise ValueError(
                f"{name}: LoRA adapters {sorted(module.scaling)}; only one adapter named "
                f"{LORA_ADAPTER!r} can be merged"
            )
        scalings[name] = float(module.scaling[LORA_ADAPTER])
    return scalings


def merge_lora_weights(
    state: dict[str, torch.Tensor], scalings: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Fold PEFT LoRA adapters into their base weights and drop PEFT's key prefixes.

    W = W_base + scaling * B @ A, with each layer's scaling from `scalings` (lora_scalings()
    of the model the state came from), so the exported directory is a plain InternVL
    checkpoint. A state without adapters is returned unchanged.
    """
    if not any(".lora_A." in key for key in state):
        return state
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key and key.endswith(".weight"):
            prefix = key[: -len(".base_layer.weight")]
            if prefix not in scalings:
                raise ValueError(f"{prefix}: LoRA weights without a scaling; pass lora_scalings()")
            lora_a = state[f"{prefix}.lora_A.{LORA_ADAPTER}.weight"]
            lora_b = state[f"{prefix}.lora_B.{LORA_ADAPTER}.weight"]
            delta = scalings[prefix] * (lora_b.float() @ lora_a.float())
            value = (value.float() + delta).to(value.dtype)
        clean = key.replace("base_model.model.", "").replace(".base_layer", "")
        merged[clean] = value
    return merged


def remote_code_files(auto_map: dict[str, Any] | list[Any] | None) -> list[str]:
    """The module files an `auto_map` names ("configuration_x.XConfig" -> configuration_x.py)."""
    if not auto_map:
        return []
    refs = auto_map.values() if isinstance(auto_map, dict) else auto_map
    flat = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    # "repo--module.Class" points at another repository's code; only local modules are files.
    names = {f"{ref.rsplit('.', 1)[0]}.py" for ref in flat if ref and "--" not in ref}
    return sorted(names)


def copy_remote_code(source: Path, destination: Path, auto_maps: list[Any]) -> list[str]:
    """Copy the *.py files the auto_maps name from `source`; returns the names copied.

    A file the source lacks is named in a warning (the weights are still worth writing):
    readers that load the model through auto_map need it beside the export.
    """
    names = sorted({name for auto_map in auto_maps for name in remote_code_files(auto_map)})
    missing = [name for name in names if not (source / name).is_file()]
    if missing:
        logger.warning(
            "%s: auto_map names %s but the directory has no such file; copy the LLM's "
            "remote-code files into %s for readers that load it through auto_map",
            source, missing, destination,
        )  # fmt: skip
    names = [name for name in names if name not in missing]
    for name in names:
        if (source / name).resolve() != (destination / name).resolve():
            shutil.copyfile(source / name, destination / name)
    return names
