"""A sentencepiece tokenizer for InternLM2 directories that runs no code from the directory.

InternLM2 ships its tokenizer as remote code (`tokenization_internlm2.py`, selected through
`auto_map`) around a sentencepiece BPE `tokenizer.model`. The ids come from sentencepiece
alone: the text between added tokens is encoded by `SentencePieceProcessor.encode`, a BOS is
prepended when `add_bos_token` is set (the InternLM2 default), no EOS. This class gives the
same ids from transformers' own sentencepiece backend, so an InternLM2 directory loads
without `trust_remote_code` (tests/unit/test_internlm2.py compares the ids with the remote
tokenizer's, recorded in a golden file).

Decoding joins sentencepiece's decode of each run of ordinary pieces with the added tokens'
text; it does not reproduce the remote class's leading-space quirks.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

REMOTE_CLASS_NAMES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
"""`tokenizer_class` values of InternLM2 directories (the remote-code tokenizer)."""


class InternLM2SentencePieceTokenizer(SentencePieceBackend):
    """`tokenizer.model` + `tokenizer_config.json` of an InternLM2 directory, no remote code."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        # Set before the base __init__, which may encode while registering added tokens.
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            # legacy: encode each text span as sentencepiece does, dummy prefix included.
            legacy=True,
            **kwargs,
        )

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = [*token_ids_0, *(token_ids_1 or [])]
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * self.add_bos_token + body + [1] * self.add_eos_token

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return int(self.add_bos_token) + int(self.add_eos_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        added = set(self.added_tokens_encoder) | set(self.all_special_tokens)
        pieces: list[str] = []
        text: list[str] = []
        for token in tokens:
            if token in added:
                text.append(self.sp_model.decode(pieces))
                text.append(token)
                pieces = []
            else:
                pieces.append(token)
        text.append(self.sp_model.decode(pieces))
        return "".join(text)
