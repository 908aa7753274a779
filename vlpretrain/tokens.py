"""The InternVL special tokens and the one function that adds them to a tokenizer.

Shared by data (placeholder expansion needs their ids) and model (embedding resize), so it
lives at the top of the package and imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"

INTERNVL_TOKENS: tuple[str, ...] = (
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    QUAD_START,
    QUAD_END,
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
)
"""Added in exactly this order, so ids match checkpoints made by the reference."""


def add_internvl_tokens(tokenizer: Any) -> int:
    """Add the InternVL tokens (special, in the reference's order); returns how many were new."""
    return int(tokenizer.add_tokens(list(INTERNVL_TOKENS), special_tokens=True))


def token_id(tokenizer: Any, token: str) -> int:
    """Id of a single added token; raises if the tokenizer does not know it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no token {token!r}; was add_internvl_tokens() called?")
    return int(ids[0])
