"""InternVL special tokens on Path B: reference order, mean-initialised rows, untied."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlpretrain.tokens import INTERNVL_TOKENS, add_internvl_tokens


def test_tokens_are_appended_in_reference_order(tiny_components, tiny_model):
    original = AutoTokenizer.from_pretrained(str(tiny_components.llm_path))
    old_size = len(original)  # 384: the tiny BPE vocabulary
    tokenizer = tiny_model.tokenizer

    assert INTERNVL_TOKENS == (
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
    )
    assert len(tokenizer) == old_size + 9
    assert tokenizer.convert_tokens_to_ids(list(INTERNVL_TOKENS)) == list(
        range(old_size, old_size + 9)
    )
    # <IMG_CONTEXT> is the third new token: old_size + 2 (92546 for InternLM2, 151667 Qwen2.5).
    assert tiny_model.model.image_context_token_id == old_size + 2
    # Each token encodes as itself, not as byte pieces.
    assert tokenizer.encode("<img><IMG_CONTEXT></img>", add_special_tokens=False) == [
        old_size,
        old_size + 2,
        old_size + 1,
    ]


def test_adding_tokens_twice_adds_nothing(tiny_model):
    assert add_internvl_tokens(tiny_model.tokenizer) == 0


def test_new_embedding_rows_equal_the_mean_of_old_rows(tiny_components, tiny_model):
    original = AutoModelForCausalLM.from_pretrained(str(tiny_components.llm_path))
    old = original.get_input_embeddings().weight.detach()
    old_size = old.shape[0]
    llm = tiny_model.model.language_model
    embed = llm.get_input_embeddings().weight.detach()
    head = llm.get_output_embeddings().weight.detach()
    mean = old.mean(dim=0)

    assert embed.shape == head.shape == (old_size + 9, 64)
    assert llm.config.vocab_size == old_size + 9
    for matrix in (embed, head):
        assert torch.equal(matrix[:old_size], old)
        for row in range(old_size, old_size + 9):
            assert torch.equal(matrix[row], mean)


def test_path_b_llm_is_untied(tiny_model):
    llm = tiny_model.model.language_model
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight

    assert embed is not head
    assert embed.data_ptr() != head.data_ptr()
    assert llm.config.tie_word_embeddings is False
    with torch.no_grad():
        embed[0, 0] += 1.0
    assert not torch.equal(embed, head)
