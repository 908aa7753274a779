"""Demo component pretraining: the LLM's answer-only labels, isolated packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlpretrain.demo.pretrain import (
    CELL_TOKENS,
    IGNORE,
    answer_labels,
    pack_texts,
)
from vlpretrain.demo.shapes import caption_corpus, chat_text
from vlpretrain.demo.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import IMG_END, IMG_START


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    directory: Path = tmp_path_factory.mktemp("tokenizer")
    return train_tiny_tokenizer(
        directory, caption_corpus(0), 640, (IMG_START, IMG_END, *CELL_TOKENS)
    )


def test_answer_labels_keep_only_the_answers_and_their_end(tokenizer) -> None:
    text = chat_text([("What colour is the circle?", "red"), ("Is there a square?", "no")])
    ids = tokenizer(text)["input_ids"]
    start = tokenizer("<|im_start|>assistant\n")["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = answer_labels(ids, start, end)
    kept = [token for token in labels if token != IGNORE]
    assert tokenizer.decode(kept) == "red<|im_end|>no<|im_end|>"
    # Every kept label is the input token at that position.
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids, strict=True))


def test_pack_texts_restarts_positions_and_never_splits_a_text() -> None:
    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], list(range(20))]
    labels = [[IGNORE, 2, 3], [IGNORE, 5], [IGNORE, 7, 8, 9], list(range(20))]
    ids, targets, positions = pack_texts(texts, labels, row_tokens=6, pad_id=0)
    # The 20-token text does not fit a row and is dropped; the others pack greedily.
    assert ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert targets.tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE],
                                [IGNORE, 7, 8, 9, IGNORE, IGNORE]]  # fmt: skip
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


def test_tiny_llm_init_std_sets_the_initial_weight_scale() -> None:
    from transformers import Qwen2ForCausalLM

    from vlpretrain.demo.components import tiny_llm_config

    def weight_std(init_std: float) -> float:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_llm_config(100, init_std=init_std))
        return float(model.model.layers[0].self_attn.q_proj.weight.std())

    assert weight_std(0.02) == pytest.approx(0.02, rel=0.1)
    assert weight_std(0.1) == pytest.approx(0.1, rel=0.1)
