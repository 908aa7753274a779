"""`vlpretrain export`: InternVL chat layout <-> transformers' InternVLForConditionalGeneration.

The tiny Path B model (2-layer ViT on 56-px tiles, 2-layer Qwen2) is exported, loaded with
transformers, and must give our logits; exporting back must give identical tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.models.internvl.modeling_internvl import InternVLModel as HFInternVLModel

from vlpretrain.cli import build_parser
from vlpretrain.formats.hf import export_hf, export_internvl, state_from_hf
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.model.hub import load_weights
from vlpretrain.model.projector import pixel_shuffle


def _save_chat(built, directory):
    # Untying copied the embeddings into lm_head; make them differ so that an export which
    # tied them again would change the logits.
    with torch.no_grad():
        built.model.language_model.lm_head.weight.mul_(1.5)
    return save_internvl(built.model, built.tokenizer, directory)


@pytest.fixture
def chat_dir(tiny_model, tmp_path):
    return _save_chat(tiny_model, tmp_path / "chat")


def _our_logits(built, batch):
    built.model.eval()
    return built.model.logits(
        batch["input_ids"], batch["position_ids"], batch["pixel_values"], batch["image_flags"]
    )


def _hf_logits(directory, batch, attn_implementation):
    model = AutoModelForImageTextToText.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    # transformers feeds every tile to the placeholders; ours keeps image_flags == 1 only.
    pixel_values = batch["pixel_values"][batch["image_flags"] == 1]
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            pixel_values=pixel_values,
            position_ids=torch.arange(length)[None],
            use_cache=False,
        )
    return out.logits.float()


def _one_sample(batch):
    """The packed row's first sample alone (it holds the image), so no packing is involved."""
    first_end = int((batch["position_ids"][0] == 0).nonzero()[1])
    cut = {name: batch[name][:, :first_end] for name in ("input_ids", "position_ids")}
    return {**batch, **cut}


@pytest.mark.parametrize(("select_layer", "attn_implementation"), [(-1, "eager"), (1, "sdpa")])
def test_transformers_logits_equal_ours(
    tiny_model, make_vlm_batch, tmp_path, select_layer, attn_implementation
):
    # select_layer 1 feeds the projector the output of ViT layer 1 of 2, which transformers
    # calls vision_feature_layer 1 (hidden_states[0] is the embedding output in both).
    tiny_model.model.config = type(tiny_model.model.config)(
        **{**tiny_model.model.config.to_dict(), "select_layer": select_layer}
    )
    chat = _save_chat(tiny_model, tmp_path / "chat")
    batch = _one_sample(make_vlm_batch(tiny_model))
    assert int((batch["input_ids"] == tiny_model.model.image_context_token_id).sum()) == 4

    hf_dir = export_hf(chat, tmp_path / "hf")

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert config["vision_feature_select_strategy"] == "default"  # drops CLS, as InternVL does
    assert config["vision_feature_layer"] == select_layer
    assert config["image_token_id"] == tiny_model.model.image_context_token_id
    assert config["image_seq_length"] == 4  # (56 / 14)^2 * 0.5^2
    torch.testing.assert_close(
        _hf_logits(hf_dir, batch, attn_implementation),
        _our_logits(tiny_model, batch),
        atol=1e-5,
        rtol=0,
    )


def test_round_trip_reproduces_tensors_and_config(tiny_model, chat_dir, tmp_path):
    hf_dir = export_hf(chat_dir, tmp_path / "hf")
    back = export_internvl(hf_dir, tmp_path / "back")

    before, after = load_weights(chat_dir), load_weights(back)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (chat_dir / "config.json").read_text()
    )
    reloaded = build_model(ModelConfig(model_name_or_path=str(back)))
    assert reloaded.model.config == tiny_model.model.config
    assert reloaded.model.image_context_token_id == tiny_model.model.image_context_token_id


def test_import_accepts_transformers_in_memory_names(chat_dir, tmp_path):
    hf_dir = export_hf(chat_dir, tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32)
    state = model.state_dict()
    assert "model.vision_tower.embeddings.cls_token" in state and "lm_head.weight" in state

    converted = state_from_hf(state)

    chat = load_weights(chat_dir)
    assert sorted(converted) == sorted(chat)
    assert all(torch.equal(converted[key], chat[key]) for key in chat)


def test_hf_weights_split_the_fused_qkv(chat_dir, tmp_path):
    chat = load_weights(chat_dir)
    hf = load_weights(export_hf(chat_dir, tmp_path / "hf"))
    qkv = chat["vision_model.encoder.layers.0.attn.qkv.weight"]  # (3 * 64, 64): q, k, v rows
    layer = "vision_tower.encoder.layer.0.attention"
    assert torch.equal(hf[f"{layer}.q_proj.weight"], qkv[:64])
    assert torch.equal(hf[f"{layer}.k_proj.weight"], qkv[64:128])
    assert torch.equal(hf[f"{layer}.v_proj.weight"], qkv[128:])
    assert torch.equal(hf["multi_modal_projector.linear_2.weight"], chat["mlp1.3.weight"])
    assert not any(k.startswith(("vision_model.", "mlp1.")) for k in hf)


def test_transformers_pixel_shuffle_is_our_row_major_order():
    # Pins upstream behaviour the export relies on: v2 matches, v1 (transposed) does not.
    grid = torch.randn(2, 4, 4, 8)
    theirs = HFInternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)
    assert torch.equal(theirs, pixel_shuffle(grid, 0.5, "v2"))
    assert not torch.equal(theirs, pixel_shuffle(grid, 0.5, "v1"))


def test_v1_pixel_shuffle_is_refused(chat_dir, tmp_path):
    config_path = chat_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "ps_version": "v1"}))
    with pytest.raises(ValueError, match="ps_version 'v1'.*row-major"):
        export_hf(chat_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_wrong_direction_is_refused(chat_dir, tmp_path):
    with pytest.raises(ValueError, match="expected 'internvl'"):
        export_internvl(chat_dir, tmp_path / "back")


def test_cli_export_round_trip(chat_dir, tmp_path):
    parser = build_parser()
    hf_args = parser.parse_args(["export", str(chat_dir), "--to", "hf", str(tmp_path / "hf")])
    assert hf_args.func(hf_args) == 0
    back_args = parser.parse_args(
        ["export", str(tmp_path / "hf"), "--to", "internvl", str(tmp_path / "back")]
    )
    assert back_args.func(back_args) == 0
    assert (tmp_path / "back" / "model.safetensors").exists()
    wrong_way = parser.parse_args(
        ["export", str(chat_dir), "--to", "internvl", str(tmp_path / "x")]
    )
    assert wrong_way.func(wrong_way) == 2


def test_export_choices_of_the_command_line_are_the_converters():
    # The parser lists the formats without importing the converters (so --help stays fast).
    from vlpretrain.cli import EXPORT_FORMATS
    from vlpretrain.formats.export import EXPORTERS

    assert sorted(EXPORT_FORMATS) == sorted(EXPORTERS)
