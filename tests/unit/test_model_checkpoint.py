"""InternVL chat layout: Path B -> save_internvl -> Path A, config.json, weight keys, lm_head
of tied LLMs, ps_version precedence, image-size changes, loading a ViT from a full export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import ModelConfig, build_model, load_vision
from vlpretrain.model.hub import load_weights
from vlpretrain.model.vision import InternViT, VisionConfig

VIT_LAYER_KEYS = {
    # The tiny ViT: qkv_bias True, qk_normalization False, norm_type layer_norm.
    "ls1",
    "ls2",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
}
VIT_EMBEDDING_KEYS = {
    "embeddings.class_embedding",
    "embeddings.position_embedding",
    "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias",
}


def _logits(built, batch):
    built.model.eval()
    return built.model.logits(
        batch["input_ids"], batch["position_ids"], batch["pixel_values"], batch["image_flags"]
    )


@pytest.fixture
def exported(tiny_model, tmp_path):
    return save_internvl(tiny_model.model, tiny_model.tokenizer, tmp_path / "export")


def test_path_b_to_path_a_round_trip_reproduces_logits_exactly(
    tiny_model, exported, make_vlm_batch
):
    batch = make_vlm_batch(tiny_model)
    assert int((batch["input_ids"] == tiny_model.model.image_context_token_id).sum()) == 4
    before = _logits(tiny_model, batch)

    reloaded = build_model(ModelConfig(model_name_or_path=str(exported)))

    assert reloaded.path == "A"
    assert len(reloaded.tokenizer) == len(tiny_model.tokenizer)
    assert reloaded.model.image_context_token_id == tiny_model.model.image_context_token_id
    assert reloaded.model.config == tiny_model.model.config
    assert reloaded.model.num_image_token == 4
    after = _logits(reloaded, batch)
    assert after.shape == (1, batch["input_ids"].shape[1], len(tiny_model.tokenizer))
    assert torch.equal(before, after)


def test_saved_config_json_has_the_internvl_chat_fields(tiny_model, exported):
    config = json.loads((exported / "config.json").read_text())

    assert config["architectures"] == ["InternVLChatModel"]
    assert config["model_type"] == "internvl_chat"
    assert config["ps_version"] == "v2"
    assert config["template"] == "internvl2_5"
    assert config["downsample_ratio"] == 0.5
    assert config["force_image_size"] == 56
    assert config["select_layer"] == -1
    assert config["hidden_size"] == 64
    assert config["tie_word_embeddings"] is False
    vision = config["vision_config"]
    assert vision["model_type"] == "intern_vit_6b"
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"]) == (64, 2, 56)
    llm = config["llm_config"]
    assert llm["model_type"] == "qwen2"
    assert llm["tie_word_embeddings"] is False
    # 384 BPE tokens + 9 InternVL tokens.
    assert llm["vocab_size"] == len(tiny_model.tokenizer) == 393


def test_saved_weights_use_the_reference_key_names(tiny_model, exported):
    state = load_weights(exported)
    keys = set(state)

    assert {k for k in keys if k.startswith("mlp1.")} == {
        "mlp1.0.weight",
        "mlp1.0.bias",
        "mlp1.1.weight",
        "mlp1.1.bias",
        "mlp1.3.weight",
        "mlp1.3.bias",
    }
    expected_vit = {f"vision_model.{k}" for k in VIT_EMBEDDING_KEYS} | {
        f"vision_model.encoder.layers.{i}.{k}" for i in range(2) for k in VIT_LAYER_KEYS
    }
    assert {k for k in keys if k.startswith("vision_model.")} == expected_vit
    assert not any(k.startswith("projector.") for k in keys)
    assert all(k.split(".")[0] in {"vision_model", "mlp1", "language_model"} for k in keys)
    for key in (
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.q_proj.bias",
        "language_model.model.layers.1.mlp.down_proj.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ):
        assert key in keys
    # The tiny Qwen2 was tied on disk; the export keeps lm_head with its values.
    assert state["vision_model.embeddings.position_embedding"].shape == (1, 17, 64)  # 4*4 + 1
    assert state["mlp1.1.weight"].shape == (64, 256)  # 4 * 64 -> 64
    lm_head = tiny_model.model.language_model.get_output_embeddings().weight
    assert torch.equal(state["language_model.lm_head.weight"], lm_head.detach())


def test_path_a_copies_input_embeddings_when_lm_head_is_missing(tiny_model, exported):
    # A reference export of a tied LLM lacks lm_head; we fill it from embed_tokens.
    path = exported / "model.safetensors"
    state = load_file(str(path))
    del state["language_model.lm_head.weight"]
    save_file(state, str(path), metadata={"format": "pt"})

    reloaded = build_model(ModelConfig(model_name_or_path=str(exported))).model.language_model

    assert torch.equal(
        reloaded.get_output_embeddings().weight,
        state["language_model.model.embed_tokens.weight"],
    )


def test_path_a_keeps_checkpoint_ps_version_unless_set(tiny_components, tmp_path):
    v1 = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=56,
            ps_version="v1",
        )
    )
    directory = save_internvl(v1.model, v1.tokenizer, tmp_path / "v1")

    default = build_model(ModelConfig(model_name_or_path=str(directory)))
    explicit = build_model(ModelConfig(model_name_or_path=str(directory), ps_version="v2"))

    assert default.model.config.ps_version == "v1"
    assert explicit.model.config.ps_version == "v2"
    # Other checkpoint settings survive the explicit override.
    assert explicit.model.config.force_image_size == 56


def test_path_a_rejects_a_different_downsample_ratio(exported):
    with pytest.raises(ValueError, match="down_sample_ratio 0.25 differs"):
        build_model(ModelConfig(model_name_or_path=str(exported), down_sample_ratio=0.25))


def test_force_image_size_resizes_position_embeddings(tiny_components, tiny_model):
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=112,
        )
    )
    vision = built.model.vision_model
    original = tiny_model.model.vision_model.embeddings.position_embedding

    # (112 / 14)^2 + 1 = 65 positions; (112/14)^2 * 0.5^2 = 16 tokens per tile.
    assert vision.embeddings.position_embedding.shape == (1, 65, 64)
    assert vision.config.image_size == 112
    assert vision.embeddings.image_size == 112
    assert built.model.num_image_token == 16
    assert torch.equal(vision.embeddings.position_embedding[:, :1], original[:, :1])  # CLS kept
    features = built.model.image_features(torch.zeros(1, 3, 112, 112))
    assert features.shape == (1, 16, 64)


def test_position_embedding_resize_to_same_size_is_identity(tiny_model):
    vision = tiny_model.model.vision_model
    before = vision.embeddings.position_embedding
    snapshot = before.detach().clone()

    vision.resize_position_embeddings(56)

    assert vision.embeddings.position_embedding is before
    assert torch.equal(vision.embeddings.position_embedding, snapshot)
    # The per-forward grid interpolation is skipped at the native 4x4 grid.
    assert torch.equal(vision.embeddings.grid_positions(4, 4), snapshot[:, 1:])
    # (56 / 14)^2 * 0.5^2 = 16 * 0.25 = 4
    assert tiny_model.model.num_image_token == 4


def test_resized_model_saves_and_reloads_at_its_new_size(tiny_components, tmp_path):
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=112,
        )
    )
    directory = save_internvl(built.model, built.tokenizer, tmp_path / "big")

    reloaded = build_model(ModelConfig(model_name_or_path=str(directory))).model

    assert reloaded.config.force_image_size == 112
    assert reloaded.vision_model.config.image_size == 112
    assert reloaded.num_image_token == 16
    assert torch.equal(
        reloaded.vision_model.embeddings.position_embedding,
        built.model.vision_model.embeddings.position_embedding,
    )


def test_vision_loads_from_a_full_internvl_directory(tiny_components, tiny_model, exported):
    vision = load_vision(exported, drop_path_rate=0.0)

    expected = tiny_model.model.vision_model.state_dict()
    got = vision.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # The export also works as the vision_path of a new Path B build.
    built = build_model(
        ModelConfig(
            vision_path=str(exported), llm_path=str(tiny_components.llm_path), force_image_size=56
        )
    )
    rebuilt = built.model.vision_model.state_dict()
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)


def test_rms_norm_qk_norm_vit_has_reference_state_dict_keys():
    # InternViT-6B style: rms_norm (no norm bias), qk_normalization, no qkv bias.
    config = VisionConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=1,
        image_size=28,
    )
    keys = set(InternViT(config).state_dict())

    layer = {
        "ls1",
        "ls2",
        "attn.qkv.weight",
        "attn.q_norm.weight",
        "attn.k_norm.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "norm1.weight",
        "norm2.weight",
    }
    assert keys == VIT_EMBEDDING_KEYS | {f"encoder.layers.0.{k}" for k in layer}


def test_merged_lora_export_reproduces_the_unmerged_logits(tiny_model, make_vlm_batch, tmp_path):
    """The export folds each adapter in with its own alpha / r (PEFT's config), not a constant."""
    from peft import LoraConfig, get_peft_model

    from vlpretrain.distributed.env import DistEnv
    from vlpretrain.model.hub import lora_scalings, merge_lora_weights
    from vlpretrain.model.llm import LORA_TARGETS, llm_family
    from vlpretrain.train.freeze import VISION_LORA_TARGETS
    from vlpretrain.train.loop import export_model

    model = tiny_model.model
    targets = LORA_TARGETS[llm_family(model.language_model)]
    # alpha / r = 7 / 4 for the LLM and 3 / 2 for the ViT: not the 2.0 of our own set-up.
    llm_lora = LoraConfig(r=4, lora_alpha=7, target_modules=targets, task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, llm_lora)
    vit_lora = LoraConfig(r=2, lora_alpha=3, target_modules=VISION_LORA_TARGETS)
    model.vision_model = get_peft_model(model.vision_model, vit_lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    scalings = lora_scalings(model)
    assert sorted(set(scalings.values())) == [1.5, 1.75]
    batch = make_vlm_batch(tiny_model)
    unmerged = _logits(tiny_model, batch)

    export_model(
        model,
        tiny_model.tokenizer,
        tmp_path / "merged",
        DistEnv(0, 0, 1, torch.device("cpu"), "gloo"),
    )
    merged = build_model(ModelConfig(model_name_or_path=str(tmp_path / "merged")))
    assert not any("lora" in key for key in merged.model.state_dict())
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=1e-5, atol=1e-5)

    # A hard-coded scaling of 2.0 would not reproduce them.
    wrong = merge_lora_weights(model.state_dict(), dict.fromkeys(scalings, 2.0))
    merged.model.load_state_dict(wrong)
    assert not torch.allclose(_logits(merged, batch), unmerged, rtol=1e-3, atol=1e-3)
