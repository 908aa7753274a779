"""Inference (vlpretrain.chat): training-identical prompts, KV-cached decoding, the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.chat import ChatModel, DecodeConfig, load, top_p_filter, with_image_tags
from vlpretrain.cli import main
from vlpretrain.data import tiling
from vlpretrain.data.build import DatasetSource, SampleConfig
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.data.samples import IGNORE_INDEX
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import ModelConfig, build_model, run_facts

TILE = 56
"""Tiny ViT tile: (56 / 14)^2 = 16 patches -> 16 * 0.5^2 = 4 <IMG_CONTEXT> tokens per tile."""


@pytest.fixture(scope="module")
def model_dir(tiny_components, tmp_path_factory):
    torch.manual_seed(0)  # the fresh projector draws from the global RNG
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(tiny_components.llm_path),
            force_image_size=TILE,
        )
    )
    # A random untied head: with the tied tiny init the random LLM echoes its last prompt
    # token ("\n") forever, so every greedy answer would strip to "".
    head = built.model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        head.normal_(generator=torch.Generator().manual_seed(0))
    return save_internvl(built.model, built.tokenizer, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return load(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 112x56 image (2 tiles + thumbnail = 3 tiles) and a 56x56 one (1 tile), on disk."""
    root = tmp_path_factory.mktemp("images")
    wide = Image.new("RGB", (112, 56), (200, 30, 30))
    wide.paste((20, 20, 220), (60, 10, 100, 40))
    square = Image.new("RGB", (56, 56), (30, 160, 40))
    wide.save(root / "wide.png")
    square.save(root / "square.png")
    return [root / "wide.png", root / "square.png"]


def _training_sample(chat_model, record, root, tmp_path):
    """The TokenizedSample the training data path builds for `record` (no augmentation)."""
    annotation = tmp_path / "train.jsonl"
    annotation.write_text(json.dumps(record) + "\n")
    config = chat_model.model.config
    sample_config = SampleConfig(
        dynamic_image_size=config.dynamic_image_size,
        use_thumbnail=config.use_thumbnail,
        min_dynamic_patch=config.min_dynamic_patch,
        max_dynamic_patch=config.max_dynamic_patch,
        cache_dir=str(tmp_path / "cache"),
    )
    spec = DatasetSpec(name="t", dataset_index=0, root=root, annotation=annotation,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    facts = run_facts(chat_model.model, chat_model.tokenizer)
    source = DatasetSource(spec, sample_config, facts, chat_model.tokenizer)
    return source.load_line(0, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("names", "question"),
    [
        (["wide.png"], "what colour is the circle?"),
        (["wide.png", "square.png"], "Image-1: <image>\nImage-2: <image>\nhow many shapes?"),
        ([], "how many shapes?"),
    ],
    ids=["one_image", "two_images", "text_only"],
)
def test_prompt_equals_the_training_ids_up_to_the_answer(
    chat_model, images, tmp_path, names, question
):
    root = images[0].parent
    record = {"conversations": [{"from": "human", "value": question},
                                {"from": "gpt", "value": "the circle is red"}]}  # fmt: skip
    if len(names) == 1:
        record["image"] = names[0]
    elif names:
        record["image"] = names
    sample = _training_sample(chat_model, record, root, tmp_path)
    # One image: both sides auto-insert "<image>\n"; two: the tags are in the question.
    ids, pixels = chat_model.prompt_inputs([root / n for n in names], question)
    first_answer = int(np.argmax(sample.labels != IGNORE_INDEX))
    assert ids[0].tolist() == sample.input_ids[:first_answer].tolist()
    assert ids.shape[1] == first_answer
    # Training ships uint8 tiles and normalises them in the step; chat normalises at once.
    trained = tiling.normalize_pixels(torch.from_numpy(sample.pixel_values), "imagenet")
    np.testing.assert_array_equal(pixels.numpy(), trained.numpy())
    # wide.png alone: 2x1 grid + thumbnail = 3 tiles; with square.png the per-image budget is
    # 12 // 2 = 6, so still 3 + 1 tiles; each tile is 4 <IMG_CONTEXT> tokens.
    expected_tiles = {0: 0, 1: 3, 2: 4}[len(names)]
    assert pixels.shape == (expected_tiles, 3, TILE, TILE)
    context = chat_model.model.image_context_token_id
    assert int((ids == context).sum()) == 4 * expected_tiles


def test_prompt_ends_with_the_assistant_prefix_and_keeps_history(chat_model):
    history = [("<image>\nwhat is it?", "a circle")]
    ids, _ = chat_model.prompt_inputs([], "and its colour?", history=history,
                                      system_message="be brief")  # fmt: skip
    text = chat_model.tokenizer.decode(ids[0].tolist())
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\n<image>\nwhat is it?<|im_end|>\n"
        "<|im_start|>assistant\na circle<|im_end|>\n"
        "<|im_start|>user\nand its colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_image_tags_are_inserted_only_when_absent():
    assert with_image_tags("q?", 0) == "q?"
    assert with_image_tags("q?", 1) == "<image>\nq?"
    assert with_image_tags("q?", 2) == "Image-1: <image>\nImage-2: <image>\nq?"
    assert with_image_tags("see <image> q?", 1) == "see <image> q?"
    assert with_image_tags("more?", 1, history=[("<image>\nq?", "a")]) == "more?"


def test_missing_image_tags_raise_with_both_counts(chat_model, images):
    with pytest.raises(ValueError, match="2 images but 1 <image> tags"):
        chat_model.prompt_inputs(images, "<image> only one tag")


def test_chat_returns_a_string_and_greedy_is_deterministic(chat_model, images):
    first = chat_model.chat([str(images[0])], "what colour is the circle?", max_new_tokens=6)
    again = chat_model.chat([Image.open(images[0])], "what colour is the circle?",
                            max_new_tokens=6)  # fmt: skip
    assert isinstance(first, str) and first
    assert first == again


def test_sampling_is_reproducible_per_seed(chat_model, images):
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=5.0, top_p=0.9)
    a = chat_model.chat([images[0]], "hello", seed=1, **kwargs)
    b = chat_model.chat([images[0]], "hello", seed=1, **kwargs)
    assert a == b
    assert a != chat_model.chat([images[0]], "hello", seed=2, **kwargs)


def test_kv_cache_generation_equals_no_cache_argmax(chat_model, images):
    ids, pixels = chat_model.prompt_inputs(images, "how many shapes?")
    decode = DecodeConfig(max_new_tokens=5)
    generated = chat_model.generate(ids, pixels, decode, stop_ids=frozenset())
    assert len(generated) == 5
    flags = torch.ones(pixels.shape[0], dtype=torch.long)
    sequence = ids
    for token in generated:
        positions = torch.arange(sequence.shape[1]).unsqueeze(0)
        logits = chat_model.model.logits(sequence, positions, pixels, flags)
        assert int(logits[0, -1].argmax()) == token
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    # Sorted: 0.5, 0.3, 0.1, 0.1; mass before each: 0, 0.5, 0.8, 0.9 -> top_p 0.7 keeps 2.
    kept = top_p_filter(probs, 0.7)
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.625, 0.375, 0.0]))
    # The most likely token always survives.
    assert top_p_filter(probs, 0.01).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_decode_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        DecodeConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=1.5)


def test_cli_prints_one_answer(chat_model, model_dir, images, capsys):
    code = main(["chat", "--model", str(model_dir), "--image", str(images[0]),
                 "--max-new-tokens", "6", "what colour is the circle?"])  # fmt: skip
    assert code == 0
    expected = chat_model.chat([images[0]], "what colour is the circle?", max_new_tokens=6)
    assert expected
    assert capsys.readouterr().out == expected + "\n"


def test_cli_reports_a_missing_image(model_dir, tmp_path, capsys):
    code = main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "no.png"), "q"])
    assert code == 2
    assert "no.png" in capsys.readouterr().err


def test_cli_interactive_loop_keeps_history(chat_model, model_dir, images, capsys, monkeypatch):
    calls = []
    answer = ChatModel.answer

    def recording_answer(self, images, question, decode, history=None, system_message=None):
        calls.append((question, list(history or [])))
        return answer(self, images, question, decode, history, system_message)

    monkeypatch.setattr(ChatModel, "answer", recording_answer)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it?\n\nand its colour?\nexit\nnever\n"))
    code = main(["chat", "--model", str(model_dir), "--image", str(images[0]),
                 "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    cli_calls = list(calls)
    first = chat_model.chat([images[0]], "what is it?", max_new_tokens=4)
    history = [("<image>\nwhat is it?", first)]
    second = chat_model.chat([images[0]], "and its colour?", max_new_tokens=4, history=history)
    # The blank line is skipped and nothing after 'exit' is read; turn 2 sees turn 1.
    assert cli_calls == [("<image>\nwhat is it?", []), ("and its colour?", history)]
    assert capsys.readouterr().out == f"{first}\n{second}\n"
