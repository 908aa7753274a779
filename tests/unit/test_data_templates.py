"""Template rendering and label masks, token by token (checked against the reference's ids)."""

import logging
from pathlib import Path

import numpy as np
import pytest
from llm_families import write_internlm2_dir
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlpretrain.data.records import RecordError
from vlpretrain.data.samples import IGNORE_INDEX
from vlpretrain.data.templates import (
    TEMPLATES,
    TemplateRenderer,
    check_turn_order,
    expand_image_placeholders,
    expand_video_tag,
    insert_image_tag,
)
from vlpretrain.model.llm import load_tokenizer
from vlpretrain.tokens import add_internvl_tokens

DEFAULT_SYSTEM = TEMPLATES["internvl2_5"].default_system
INTERNLM2_TOKENIZER_MODEL = (
    Path(__file__).resolve().parents[1] / "assets" / ("internlm2_tiny_tokenizer.model")
)


def supervised_spans(tokenizer, input_ids, labels):
    spans, current = [], []
    for tid, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def render(tokenizer, turns, tokens_per_image=(), style="internvl2_5"):
    renderer = TemplateRenderer(TEMPLATES[style], tokenizer)
    turns = expand_image_placeholders(tuple(turns), list(tokens_per_image))
    return renderer.join(renderer.render_segments(turns))


def test_internvl2_5_appendix_a_layout_and_masks(tokenizer):
    turns = [("human", "<image>\nHi"), ("gpt", "Yo"), ("human", "Q2"), ("gpt", "A2")]
    ids, labels = render(tokenizer, turns, [3])
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
    )
    assert tokenizer.decode(ids.tolist()) == expected
    assert supervised_spans(tokenizer, ids, labels) == ["Yo<|im_end|>", "A2<|im_end|>"]
    # token by token: the trailing "\n" after each answer's <|im_end|> is not supervised
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_ends = [i for i in np.flatnonzero(labels == im_end)]
    assert len(supervised_ends) == 2
    assert all(labels[i + 1] == IGNORE_INDEX for i in supervised_ends)
    assert labels[-1] == IGNORE_INDEX and ids[-1] == tokenizer.convert_tokens_to_ids("\u010a")


def test_segments_are_tokenised_separately(tokenizer):
    renderer = TemplateRenderer(TEMPLATES["internvl2_5"], tokenizer)
    segments = renderer.render_segments((("human", "Hi"), ("gpt", "Yo")))
    assert [s.role for s in segments] == ["system", "human", "gpt"]
    gpt = segments[2]
    prefix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert gpt.token_ids[: len(prefix)] == tuple(prefix)
    assert gpt.trainable == (False,) * len(prefix) + (True,) * 3 + (False,)  # Y o <|im_end|>


def test_system_override_and_literal_image_in_text_only(tokenizer):
    ids, labels = render(tokenizer, [("system", "SYS"), ("human", "<image> lit"), ("gpt", "ok")])
    text = tokenizer.decode(ids.tolist())
    assert text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image> lit")
    assert DEFAULT_SYSTEM not in text
    assert supervised_spans(tokenizer, ids, labels) == ["ok<|im_end|>"]


def test_empty_system_still_emits_block(tokenizer):
    ids, _ = render(tokenizer, [("system", ""), ("human", "a"), ("gpt", "b")])
    assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>system\n<|im_end|>\n")


def test_second_image_tag_stays_literal(tokenizer):
    ids, _ = render(tokenizer, [("human", "<image> and <image>"), ("gpt", "x")], [2])
    text = tokenizer.decode(ids.tolist())
    assert "<img><IMG_CONTEXT><IMG_CONTEXT></img> and <image>" in text


def test_fewer_tags_than_images_is_rejected():
    with pytest.raises(RecordError) as info:
        expand_image_placeholders((("human", "<image>"), ("gpt", "x")), [2, 2])
    assert info.value.reason == "placeholder_mismatch"
    assert "2 images but 1 <image>" in info.value.detail


def test_image_tags_in_gpt_turns_are_not_expanded():
    turns = expand_image_placeholders(
        (("human", "q"), ("gpt", "<image>"), ("human", "<image>")), [1]
    )
    assert turns[1][1] == "<image>"
    assert turns[2][1] == "<img><IMG_CONTEXT></img>"


def test_auto_insert_goes_to_first_human_turn_not_system():
    turns = insert_image_tag((("system", "S"), ("human", "Q"), ("gpt", "A")))
    assert turns == (("system", "S"), ("human", "<image>\nQ"), ("gpt", "A"))
    explicit = (("human", "Q"), ("gpt", "A"), ("human", "see <image>"), ("gpt", "B"))
    assert insert_image_tag(explicit) == explicit


def test_video_tag_becomes_frame_lines():
    turns = expand_video_tag((("human", "Describe."), ("gpt", "A")), 2)
    assert turns[0][1] == "Frame-1: <image>\nFrame-2: <image>\nDescribe."
    turns = expand_video_tag((("human", "Look <video>\nnow"), ("gpt", "A")), 1)
    assert turns[0][1] == "Look Frame-1: <image>\nnow"


@pytest.mark.parametrize("style", ["internlm2-chat", "Hermes-2", "phi3-chat"])
def test_legacy_templates_supervise_answer_and_end(tokenizer, style):
    template = TEMPLATES[style]
    ids, labels = render(tokenizer, [("human", " q "), ("gpt", " a ")], style=style)
    spans = supervised_spans(tokenizer, ids, labels)
    answer = "a" if template.strip_values else " a "
    assert spans == [answer + template.end]
    text = tokenizer.decode(ids.tolist())
    assert text.endswith(template.assistant_prefix + answer + template.end)


def test_bos_is_added_once_at_position_zero(tokenizer, monkeypatch):
    renderer = TemplateRenderer(TEMPLATES["internvl2_5"], tokenizer)
    monkeypatch.setattr(renderer, "bos_id", 7)
    ids, labels = renderer.join(renderer.render_segments((("human", "a"), ("gpt", "b"))))
    assert ids[0] == 7 and np.count_nonzero(ids == 7) == 1 and labels[0] == IGNORE_INDEX


def test_truncation_never_cuts_an_image_span(tokenizer):
    renderer = TemplateRenderer(TEMPLATES["internvl2_5"], tokenizer)
    turns = expand_image_placeholders((("human", "<image>\nHi"), ("gpt", "Yo " * 50)), [20])
    ids, labels = renderer.join(renderer.render_segments(turns))
    img_end = int(np.flatnonzero(ids == renderer.img_end_id)[0])
    # cut after the image span: truncated, supervision left
    cut_ids, cut_labels = renderer.truncate(ids, labels, img_end + 20)
    assert cut_ids.shape[0] == img_end + 20 and (cut_labels != IGNORE_INDEX).any()
    # cut inside the image span: skipped
    with pytest.raises(RecordError) as info:
        renderer.truncate(ids, labels, img_end - 5)
    assert info.value.reason == "too_long"
    # cut after the span but before any answer token: skipped (no supervision)
    with pytest.raises(RecordError, match="no supervised token"):
        renderer.truncate(ids, labels, img_end + 2)


def newline_dropping_tokenizer():
    """Words split at whitespace, which is dropped: "\n" alone encodes to no token."""
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "Hi", "Yo"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    add_internvl_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def dummy_prefix_tokenizer(tmp_path_factory):
    """InternLM2's sentencepiece tokenizer: "\n" alone (and after <|im_end|>) is U+2581 "\n"."""
    directory = tmp_path_factory.mktemp("internlm2")
    write_internlm2_dir(directory, INTERNLM2_TOKENIZER_MODEL)
    tokenizer, _ = load_tokenizer(directory)
    return tokenizer


def reference_answer_mask(tokenizer, text):
    """The reference's internvl2_5 label mask of one assistant segment: prefix and last token
    untrained (its preprocessing tokenises the segment with special tokens, drops the BOS)."""
    bos = int(bool(getattr(tokenizer, "add_bos_token", False)))
    num_ids = len(tokenizer(text).input_ids) - bos
    num_prefix = len(tokenizer("<|im_start|>assistant\n").input_ids) - bos
    mask = [True] * num_ids
    mask[:num_prefix] = [False] * num_prefix
    mask[-1] = False
    return tuple(mask)


@pytest.mark.parametrize(
    ("which", "trained"),
    [
        # "\n" is one token: the answer and <|im_end|> train, the "\n" does not
        ("byte_level", ["Y", "o", "<|im_end|>"]),
        # "\n" is no token: the last token is <|im_end|>, so only the answer trains
        ("newline_dropping", ["Yo"]),
        # "<|im_end|>\n" is <|im_end|> U+2581 "\n": the stray U+2581 trains, as the reference
        ("dummy_prefix", ["<0x59>", "o", "<|im_end|>", "\u2581"]),
    ],
)
def test_internvl2_5_leaves_exactly_the_last_answer_token_untrained(
    tokenizer, dummy_prefix_tokenizer, which, trained
):
    tok = {
        "byte_level": tokenizer,
        "newline_dropping": newline_dropping_tokenizer(),
        "dummy_prefix": dummy_prefix_tokenizer,
    }[which]
    renderer = TemplateRenderer(TEMPLATES["internvl2_5"], tok)
    answer = renderer.render_segments((("human", "Hi"), ("gpt", "Yo")))[2]
    text = "<|im_start|>assistant\nYo<|im_end|>\n"
    assert answer.trainable == reference_answer_mask(tok, text)
    pieces = tok.convert_ids_to_tokens(list(answer.token_ids))
    assert [p for p, keep in zip(pieces, answer.trainable, strict=True) if keep] == [
        p.replace("\u0120", " ") for p in trained
    ]


def test_a_separator_of_other_than_one_token_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.templates"):
        TemplateRenderer(TEMPLATES["internvl2_5"], newline_dropping_tokenizer())
    assert "<|im_end|> is not trained either" in caplog.text


@pytest.mark.parametrize("style", ["internlm2-chat", "Hermes-2", "phi3-chat"])
def test_legacy_templates_drop_a_leading_gpt_turn(style):
    turns = (("gpt", "hello"), ("human", "q"), ("gpt", "a"))
    assert check_turn_order(TEMPLATES[style], turns) == (("human", "q"), ("gpt", "a"))


S, Q, Q2, A, A2 = ("system", "S"), ("human", "q"), ("human", "q2"), ("gpt", "a"), ("gpt", "a2")


@pytest.mark.parametrize(
    ("turns", "reason", "detail"),
    [
        ((S, Q, A), "unknown_role", "conversations[0] is a 'system' turn"),
        ((Q, Q2, A), "unknown_role", "conversations[1] is a 'human' turn where"),
        ((Q, A, A2), "unknown_role", "conversations[2] is a 'gpt' turn where"),
        ((A, A2, Q), "unknown_role", "conversations[1] is a 'gpt' turn where"),
        ((A, Q), "empty_conversation", "nothing to train on"),
    ],
)
def test_legacy_templates_refuse_what_the_reference_fails_on(turns, reason, detail):
    with pytest.raises(RecordError) as info:
        check_turn_order(TEMPLATES["internlm2-chat"], turns)
    assert info.value.reason == reason and detail in info.value.detail


def test_internvl2_5_takes_any_turn_order():
    turns = (("system", "S"), ("gpt", "a"), ("human", "q"), ("human", "q2"), ("gpt", "b"))
    assert check_turn_order(TEMPLATES["internvl2_5"], turns) == turns
