"""Every family goes through what the three stages do: Path B build, a training step, the
InternVL export, Path A reload, both `vlpretrain export` directions, and chat.

Tiny LLM directories per family (tests/llm_families.py); logits after each save/load must
equal the trained model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TILE
from llm_families import family_configs, write_internlm2_dir
from PIL import Image

from vlpretrain.chat import ChatModel, DecodeConfig
from vlpretrain.formats.hf import export_hf, export_internvl
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model import hub
from vlpretrain.model.build import ModelConfig, build_model, new_vision, save_vision
from vlpretrain.model.families import PACKED_FAMILIES
from vlpretrain.testing.components import TINY_VISION
from vlpretrain.testing.tokenizer import train_tiny_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def llm_dir(family: str, directory: Path) -> Path:
    if family == "internlm2":
        write_internlm2_dir(
            directory, ASSETS / "internlm2_tiny_tokenizer.model", max_position_embeddings=4096
        )
        return directory
    import transformers

    tokenizer = train_tiny_tokenizer(directory)
    torch.manual_seed(0)
    config = family_configs()[family](len(tokenizer))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    return directory


def logits(built, batch) -> torch.Tensor:
    built.model.eval()
    keys = ("input_ids", "position_ids", "pixel_values", "image_flags")
    return built.model.logits(*(batch[k] for k in keys))


@pytest.mark.parametrize("family", sorted(PACKED_FAMILIES))
def test_family_trains_saves_reloads_exports_and_chats(family, tmp_path, make_vlm_batch):
    vision = save_vision(new_vision(TINY_VISION, 0), tmp_path / "vit")
    llm = llm_dir(family, tmp_path / "llm")
    torch.manual_seed(0)
    built = build_model(
        ModelConfig(vision_path=str(vision), llm_path=str(llm), force_image_size=TINY_TILE)
    )
    batch = make_vlm_batch(built)
    optimizer = torch.optim.SGD(built.model.parameters(), lr=0.1)
    out = built.model(**batch)
    (out.loss_sum / out.weight_sum).backward()
    head_grad = built.model.language_model.get_output_embeddings().weight.grad
    assert torch.isfinite(out.loss_sum) and head_grad is not None and head_grad.abs().sum() > 0
    optimizer.step()
    trained = logits(built, batch)

    stage = save_internvl(built.model, built.tokenizer, tmp_path / "stage")
    saved_type = hub.read_config(stage)["llm_config"]["model_type"]
    assert saved_type == family
    reloaded = build_model(ModelConfig(model_name_or_path=str(stage)))
    assert torch.equal(logits(reloaded, batch), trained)

    back = export_internvl(export_hf(stage, tmp_path / "hf"), tmp_path / "back")
    round_trip = build_model(ModelConfig(model_name_or_path=str(back)))
    assert (logits(round_trip, batch) - trained).abs().max() < 1e-5

    chat = ChatModel(reloaded.model, reloaded.tokenizer, "cpu")
    pixels = torch.rand(64, 64, 3).mul(255).byte().numpy()
    image = Image.fromarray(pixels)
    answer = chat.answer([image], "<image>\nwhat is it?", DecodeConfig(max_new_tokens=4))
    assert isinstance(answer, str)
