"""Train a tiny byte-level BPE tokenizer in milliseconds and save it as an HF directory.

Stands in for a real LLM tokenizer (Qwen2-style chatml special tokens) in tests and the demo,
where nothing can be downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a red circle, a blue square and a green "
    "triangle. how many shapes are in the image? there are three shapes. what colour is the "
    "circle? the circle is red. describe the picture. system user assistant image left right "
    "top bottom small large yes no one two three four five six seven eight nine ten."
)


def train_tiny_tokenizer(
    output_dir: str | Path,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    vocab_size: int = 384,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`, save it to `output_dir`, and return it.

    `extra_special_tokens` are kept whole (never split or merged), after the chatml ones.
    """
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*CHATML_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1 << 20,
    )
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer
