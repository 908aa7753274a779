"""`export --to hf` writes a processor that reproduces our inputs: pixels, prompt ids, answers.

torchvision cannot be imported here, so InternVLProcessor itself cannot be built (it insists
on a video processor); its parts are checked instead: the GotOcr2 PIL image processor read
from the export, the tokenizer's chat template, and InternVLProcessor's own image-token
expansion (called unbound), then transformers' generate on those inputs.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLProcessor,
)

from vlpretrain.chat import ChatModel, DecodeConfig, load
from vlpretrain.formats.export import EXPORTERS, export_hf_with_processor
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START

PHOTO = Image.fromarray(skimage.data.chelsea())
"""A real 451 x 300 photo: 3 x 2 tiles of 56 px plus a thumbnail with max_dynamic_patch 6."""


def _chat_dir(built, directory, **settings):
    with torch.no_grad():
        built.model.language_model.lm_head.weight.mul_(1.5)  # untied, as trained models are
    built.model.config = type(built.model.config)(
        **{**built.model.config.to_dict(), "max_dynamic_patch": 6, **settings}
    )
    return save_internvl(built.model, built.tokenizer, directory)


@pytest.fixture
def exported(tiny_model, tmp_path):
    chat_dir = _chat_dir(tiny_model, tmp_path / "chat")
    return chat_dir, export_hf_with_processor(chat_dir, tmp_path / "hf")


def _expand(tokenizer, text: str, num_patches: list[int], image_seq_length: int) -> str:
    """InternVLProcessor's own replacement of each image token, in order."""
    processor = SimpleNamespace(
        start_image_token=tokenizer.start_image_token,
        end_image_token=tokenizer.end_image_token,
        image_token=tokenizer.context_image_token,
        image_seq_length=image_seq_length,
    )
    pieces = text.split(processor.image_token)
    out = pieces[0]
    for index, piece in enumerate(pieces[1:]):
        replacement = InternVLProcessor.replace_image_token(
            processor, {"num_patches": num_patches}, index
        )
        out += replacement + piece
    return out


def _hf_prompt(hf_dir, messages, num_patches):
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    seq_length = json.loads((hf_dir / "processor_config.json").read_text())["image_seq_length"]
    expanded = _expand(tokenizer, text, num_patches, seq_length)
    return tokenizer, tokenizer(expanded, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    ("photo", "num_tiles"),
    # 451x300 -> 3x2 grid, 512x512 -> 2x2, 600x400 and 640x427 -> 3x2; + thumbnail
    [("chelsea", 7), ("astronaut", 5), ("coffee", 7), ("rocket", 7)],
)
def test_image_processor_pixels_equal_ours(exported, photo, num_tiles):
    chat_dir, hf_dir = exported
    image = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(hf_dir))
    theirs = processor(images=[image], return_tensors="pt")
    _, ours = load(chat_dir).prompt_inputs([image], "what is it?")
    assert theirs["num_patches"].tolist() == [num_tiles]
    assert theirs["pixel_values"].shape == ours.shape == (num_tiles, 3, 56, 56)
    # Same PIL bicubic resizes; only the float arithmetic of the normalisation differs.
    torch.testing.assert_close(theirs["pixel_values"], ours, atol=1e-6, rtol=0)
    # Without torchvision, transformers' auto class picks this PIL processor by itself.
    assert type(AutoImageProcessor.from_pretrained(str(hf_dir))) is GotOcr2ImageProcessorPil


@pytest.mark.parametrize(("backend", "bound"), [("pil", 1e-6), ("torchvision", 0.05)])
def test_image_processor_backend_pixel_difference(exported, backend, bound):
    """The largest pixel difference from training's tiles, per backend (docs/checkpoints.md).

    transformers picks torchvision when it can import it; its bicubic resize is not PIL's.
    """
    if backend == "torchvision":
        pytest.importorskip("torchvision", reason="torchvision backend not importable")
    chat_dir, hf_dir = exported
    processor = AutoImageProcessor.from_pretrained(str(hf_dir), backend=backend)
    worst = 0.0
    for photo in ("chelsea", "astronaut", "coffee", "rocket"):
        image = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
        _, ours = load(chat_dir).prompt_inputs([image], "what is it?")
        worst = max(worst, (theirs - ours).abs().max().item())
    print(f"{backend}: max |pixel difference| {worst:.3g}")
    assert worst < bound


def test_chat_template_ids_equal_our_prompt(exported):
    chat_dir, hf_dir = exported
    ours_model = load(chat_dir)
    ours, _ = ours_model.prompt_inputs([PHOTO], "what is it?")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}
    ]
    tokenizer, theirs = _hf_prompt(hf_dir, messages, [7])
    assert theirs == ours[0].tolist()
    assert theirs.count(tokenizer.context_image_token_id) == 7 * 4  # 7 tiles x 4 tokens
    ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
    assert [tokenizer.start_image_token_id, tokenizer.end_image_token_id,
            tokenizer.context_image_token_id] == ids  # fmt: skip


def test_chat_template_with_system_message_and_history(exported):
    chat_dir, hf_dir = exported
    history = [("<image>\nwhat is it?", "a cat")]
    ours, _ = load(chat_dir).prompt_inputs([PHOTO], "and its colour?", history, "be brief")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "and its colour?"},
    ]
    _, theirs = _hf_prompt(hf_dir, messages, [7])
    assert theirs == ours[0].tolist()


@pytest.mark.parametrize("template", ["internlm2-chat", "Hermes-2"])
def test_chat_template_follows_the_run_template(tiny_model, tmp_path, template):
    chat_dir = _chat_dir(tiny_model, tmp_path / "chat", template=template)
    hf_dir = export_hf_with_processor(chat_dir, tmp_path / "hf")
    ours, _ = load(chat_dir).prompt_inputs([PHOTO], "  what is it? ")
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "  what is it? "}]}]  # fmt: skip
    _, theirs = _hf_prompt(hf_dir, messages, [7])
    assert theirs == ours[0].tolist()


def test_transformers_generate_gives_our_answer(exported):
    chat_dir, hf_dir = exported
    ours_model: ChatModel = load(chat_dir)
    input_ids, pixels = ours_model.prompt_inputs([PHOTO], "what is it?")
    ours = ours_model.generate(input_ids, pixels, DecodeConfig(max_new_tokens=6), frozenset())

    processor = GotOcr2ImageProcessorPil.from_pretrained(str(hf_dir))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}
    ]
    _, theirs_ids = _hf_prompt(hf_dir, messages, [7])
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([theirs_ids]),
            pixel_values=processor(images=[PHOTO], return_tensors="pt")["pixel_values"],
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
        )
    assert out[0, len(theirs_ids) :].tolist() == ours


def test_settings_the_processor_cannot_reproduce_are_refused(tiny_model, tmp_path):
    chat_dir = _chat_dir(tiny_model, tmp_path / "chat", use_thumbnail=False)
    with pytest.raises(ValueError, match="use_thumbnail False"):
        export_hf_with_processor(chat_dir, tmp_path / "hf")


def test_export_back_drops_the_processor_tokens(exported, tmp_path):
    chat_dir, hf_dir = exported
    back = EXPORTERS["internvl"](hf_dir, tmp_path / "back")
    config = json.loads((back / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in config
    # The chat layout's tokenizer has exactly the embedding rows (no video token added).
    tokenizer = AutoTokenizer.from_pretrained(str(back))
    rows = json.loads((back / "config.json").read_text())["llm_config"]["vocab_size"]
    assert len(tokenizer) == rows
    assert np.array_equal(
        load(back).prompt_inputs([PHOTO], "what is it?")[0],
        load(chat_dir).prompt_inputs([PHOTO], "what is it?")[0],
    )
