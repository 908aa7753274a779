"""Chat templates as data: turns -> token segments -> input_ids + labels.

    turns --expand placeholders--> turns --render_segments--> [Segment(role, ids, trainable)]
    [Segment] --join (+BOS) --> input_ids, labels --truncate--> <= max_seq_length

Every segment string is `prefix[role] + value + end + after_end`, tokenised on its own (as the
reference's internvl2_5 path). In an assistant segment the tokens of the prefix are not
trained; the answer and `end` are, except that a template with `after_end` leaves exactly the
segment's last token untrained, as the reference does whatever `after_end` encodes to (see
TemplateRenderer). A system segment is always emitted (default message unless the first turn
is a system turn). Layout per template:

    internvl2_5     <|im_start|>system\\n{sys}<|im_end|>\\n <|im_start|>user\\n{q}<|im_end|>\\n
                    <|im_start|>assistant\\n{a}<|im_end|>\\n        (trained: a<|im_end|>)
    internlm2-chat  same without the \\n after <|im_end|>; values are stripped
    Hermes-2        same as internlm2-chat, values kept as they are
    phi3-chat       <|system|>\\n{sys}<|end|> <|user|>\\n{q}<|end|> <|assistant|>\\n{a}<|end|>

Image placeholders are expanded here and nowhere else (expand_image_placeholders).
Training turns of the legacy templates (internlm2-chat, Hermes-2, phi3-chat) must alternate
human, gpt, ... as the reference's preprocessing for them requires (check_turn_order).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlpretrain.data.records import RecordError
from vlpretrain.data.samples import IGNORE_INDEX
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START, token_id

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
RESERVED_STRINGS = (IMG_CONTEXT, IMG_START, IMG_END)
"""Strings that must not occur in data text (they would corrupt the image-token count)."""

Turns = tuple[tuple[str, str], ...]

_INTERNLM_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class ChatTemplate:
    """One template format; see the module docstring for the layouts."""

    name: str
    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    end: str
    """Closes every message; trained in assistant messages."""
    after_end: str
    """Text after `end` (never trained)."""
    default_system: str
    strip_values: bool = False
    alternating_turns: bool = False
    """Training turns are human, gpt, human, ...: a leading gpt turn is dropped, a system turn
    or two turns of one role in a row are refused (the reference's legacy preprocessing)."""


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="internvl2_5",
            system_prefix="<|im_start|>system\n",
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            end="<|im_end|>",
            after_end="\n",
            default_system=(
                "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                "联合开发的多模态大语言模型。"
            ),
        ),
        ChatTemplate(
            name="internlm2-chat",
            system_prefix="<|im_start|>system\n",
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            end="<|im_end|>",
            after_end="",
            default_system=_INTERNLM_SYSTEM,
            strip_values=True,
            alternating_turns=True,
        ),
        ChatTemplate(
            name="Hermes-2",
            system_prefix="<|im_start|>system\n",
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            end="<|im_end|>",
            after_end="",
            default_system=_INTERNLM_SYSTEM,
            alternating_turns=True,
        ),
        ChatTemplate(
            name="phi3-chat",
            system_prefix="<|system|>\n",
            user_prefix="<|user|>\n",
            assistant_prefix="<|assistant|>\n",
            end="<|end|>",
            after_end="",
            default_system=_INTERNLM_SYSTEM,
            alternating_turns=True,
        ),
    )
}


@dataclass(frozen=True)
class Segment:
    """One rendered message."""

    role: str
    token_ids: tuple[int, ...]
    trainable: tuple[bool, ...]


def get_template(name: str) -> ChatTemplate:
    """Template by name; ValueError listing the known names otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conv_style {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_turn_order(template: ChatTemplate, turns: Turns) -> Turns:
    """The training turns `template` accepts: for the legacy templates, human and gpt in turn.

    The reference's preprocessing for internlm2-chat, Hermes-2 and phi3-chat drops a leading
    gpt turn and fails on a system turn and on two turns of one role in a row (the record is
    then replaced by a random other one); here such a record is a counted skip. Templates
    without `alternating_turns` take every order.

    Raises:
        RecordError: unknown_role naming the turn at fault; empty_conversation when only the
            dropped leading gpt turn had an answer.
    """
    if not template.alternating_turns:
        return turns
    first = 0
    if turns and turns[0][0] == "gpt":
        first = 1  # the reference drops it: an answer to no question
    for position in range(first, len(turns)):
        role = turns[position][0]
        expected = ("human", "gpt")[(position - first) % 2]
        if role == "system":
            raise RecordError(
                "unknown_role",
                f"conversations[{position}] is a 'system' turn, which the {template.name} "
                "template does not take in training data (the reference fails on it); drop "
                "the turn or use the internvl2_5 template",
            )
        if role != expected:
            raise RecordError(
                "unknown_role",
                f"conversations[{position}] is a {role!r} turn where the {template.name} "
                f"template needs a {expected!r} one: turns must alternate human, gpt, ...",
            )
    kept = turns[first:]
    if not any(role == "gpt" for role, _ in kept):
        raise RecordError(
            "empty_conversation",
            "the only 'gpt' turn is the leading one, which the "
            f"{template.name} template drops: nothing to train on",
        )
    return kept


def check_reserved_strings(turns: Turns) -> None:
    """Reject turns whose text contains <img>, </img> or <IMG_CONTEXT> literally."""
    for position, (_, value) in enumerate(turns):
        for reserved in RESERVED_STRINGS:
            if reserved in value:
                raise RecordError(
                    "placeholder_mismatch",
                    f"conversations[{position}].value contains the reserved token {reserved!r}",
                )


def check_media_tags(kind: str, turns: Turns, num_images: int) -> None:
    """Reject a record whose <image>/<video> tags do not match its media (before any decoding).

    image: at most one <image> (none: one is inserted); multi_image: exactly one per image;
    video: at most one <video> and no <image>; text: no tag at all. Tags count in human turns
    only; a tag in a system or gpt turn is always an error. The reference leaves surplus tags
    as literal text instead (DIFFERENCES.md).

    Raises:
        RecordError: placeholder_mismatch naming both counts or the turn at fault.
    """
    for position, (role, value) in enumerate(turns):
        for tag in (IMAGE_TAG, VIDEO_TAG):
            if role != "human" and tag in value:
                raise RecordError(
                    "placeholder_mismatch",
                    f"conversations[{position}] ({role}) contains {tag}: "
                    "tags belong in human turns",
                )
    images = sum(value.count(IMAGE_TAG) for _, value in turns)
    videos = sum(value.count(VIDEO_TAG) for _, value in turns)
    expected_images, max_images, max_videos = {
        "text": (0, 0, 0),
        "image": (0, 1, 0),
        "multi_image": (num_images, num_images, 0),
        "video": (0, 0, 1),
    }[kind]
    media = f"{kind} record with {num_images} image(s)" if num_images else f"{kind} record"
    if not expected_images <= images <= max_images:
        want = str(max_images) if expected_images == max_images else f"at most {max_images}"
        raise RecordError(
            "placeholder_mismatch", f"{media} has {images} {IMAGE_TAG} tags, expected {want}"
        )
    if videos > max_videos:
        raise RecordError(
            "placeholder_mismatch",
            f"{media} has {videos} {VIDEO_TAG} tags, expected at most {max_videos}",
        )


def _first_human(turns: Turns) -> int:
    for position, (role, _) in enumerate(turns):
        if role == "human":
            return position
    raise RecordError("placeholder_mismatch", "media record without a 'human' turn")


def _replace_turn(turns: Turns, position: int, value: str) -> Turns:
    return turns[:position] + ((turns[position][0], value),) + turns[position + 1 :]


def insert_image_tag(turns: Turns) -> Turns:
    """Single image: prepend '<image>\\n' to the first human turn if no human turn has <image>.

    The reference inspects turn 0 even when it is the system turn.
    """
    if any(role == "human" and IMAGE_TAG in value for role, value in turns):
        return turns
    position = _first_human(turns)
    return _replace_turn(turns, position, IMAGE_TAG + "\n" + turns[position][1])


def expand_video_tag(turns: Turns, num_frames: int) -> Turns:
    """Replace <video> (prepended to the first human turn if absent) by Frame-i lines."""
    if any(IMAGE_TAG in value for role, value in turns if role == "human"):
        raise RecordError("placeholder_mismatch", "video record contains an <image> tag")
    count = sum(value.count(VIDEO_TAG) for role, value in turns if role == "human")
    if count > 1:
        raise RecordError("placeholder_mismatch", f"video record has {count} <video> tags")
    if count == 0:
        position = _first_human(turns)
        turns = _replace_turn(turns, position, VIDEO_TAG + "\n" + turns[position][1])
    frames = "".join(f"Frame-{i + 1}: {IMAGE_TAG}\n" for i in range(num_frames))
    return tuple(
        (role, re.sub(re.escape(VIDEO_TAG) + "\n?", lambda _: frames, value, count=1))
        if role == "human"
        else (role, value)
        for role, value in turns
    )


def expand_image_placeholders(turns: Turns, tokens_per_image: list[int]) -> Turns:
    """The k-th <image> of the human turns -> <img> + <IMG_CONTEXT> * tokens_k + </img>.

    Extra <image> tags stay literal text. Raises placeholder_mismatch if there are fewer
    tags than images.
    """
    pending = list(tokens_per_image)
    out = []
    for role, value in turns:
        if role == "human" and pending:
            pieces = value.split(IMAGE_TAG)
            value = pieces[0]
            for piece in pieces[1:]:
                if pending:
                    value += IMG_START + IMG_CONTEXT * pending.pop(0) + IMG_END + piece
                else:
                    value += IMAGE_TAG + piece
        out.append((role, value))
    if pending:
        found = len(tokens_per_image) - len(pending)
        raise RecordError(
            "placeholder_mismatch",
            f"{len(tokens_per_image)} images but {found} <image> tags in human turns",
        )
    return tuple(out)


class TemplateRenderer:
    """A template bound to a tokenizer: turns -> segments -> (input_ids, labels)."""

    def __init__(self, template: ChatTemplate, tokenizer: Any) -> None:
        self.template = template
        self.tokenizer = tokenizer
        probe = tokenizer("a", add_special_tokens=True).input_ids
        bos = tokenizer.bos_token_id
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None
        self._num_prefix = len(self._encode([template.assistant_prefix])[0])
        # The reference masks exactly one token after `end`, whatever the tokenizer makes of
        # `after_end`; we follow it so labels match, and say where that is not the separator.
        self._num_suffix = 1 if template.after_end else 0
        if template.after_end:
            self._warn_uneven_separator()
        self.img_start_id = token_id(tokenizer, IMG_START)
        self.img_end_id = token_id(tokenizer, IMG_END)

    def _warn_uneven_separator(self) -> None:
        """Warn when the token after each answer is not exactly the encoded `after_end`."""
        end, after_end = self.template.end, self.template.after_end
        ids = self._encode([end + after_end])[0]
        num_separator = len(ids) - len(self._encode([end])[0])
        if num_separator == 1:
            return
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        outcome = (
            f"so {end} is not trained either (the model is not taught to stop)"
            if num_separator == 0
            else f"so {tokens[-num_separator:-1]} after {end} are trained"
        )
        logger.warning(
            "%s template: this tokenizer encodes %r as %s; as in the reference only the last "
            "token of each answer is left untrained, %s (DIFFERENCES.md)",
            self.template.name, end + after_end, tokens, outcome,
        )  # fmt: skip

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False).input_ids

    def segment_texts(self, turns: Turns) -> list[tuple[str, str]]:
        """(role, text) of every segment, system segment first."""
        t = self.template
        system = t.default_system
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        prefixes = {"human": t.user_prefix, "gpt": t.assistant_prefix}
        texts = [("system", t.system_prefix + system + t.end + t.after_end)]
        for role, value in turns:
            value = value.strip() if t.strip_values else value
            texts.append((role, prefixes[role] + value + t.end + t.after_end))
        return texts

    def render_segments(self, turns: Turns) -> list[Segment]:
        """Tokenise every segment; only assistant answers + `end` are trainable."""
        texts = self.segment_texts(turns)
        segments = []
        for (role, _), ids in zip(texts, self._encode([text for _, text in texts]), strict=True):
            trainable = [role == "gpt"] * len(ids)
            if role == "gpt":
                trainable[: self._num_prefix] = [False] * min(self._num_prefix, len(ids))
                if self._num_suffix:
                    trainable[-self._num_suffix :] = [False] * self._num_suffix
            segments.append(Segment(role, tuple(ids), tuple(trainable)))
        return segments

    def join(self, segments: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate segments (one BOS at position 0 if the tokenizer adds BOS)."""
        ids = [tid for seg in segments for tid in seg.token_ids]
        mask = [flag for seg in segments for flag in seg.trainable]
        if self.bos_id is not None:
            ids, mask = [self.bos_id, *ids], [False, *mask]
        input_ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(mask, dtype=bool), input_ids, IGNORE_INDEX)
        return input_ids, labels

    def truncate(
        self, input_ids: np.ndarray, labels: np.ndarray, max_length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cut to `max_length` tokens; never inside or before an image span.

        Raises:
            RecordError: too_long if an image span would be cut or dropped, or if no
                supervised token remains.
        """
        if input_ids.shape[0] > max_length:
            kept_ends = int(np.count_nonzero(input_ids[:max_length] == self.img_end_id))
            all_ends = int(np.count_nonzero(input_ids == self.img_end_id))
            if kept_ends != all_ends:
                raise RecordError(
                    "too_long",
                    f"{input_ids.shape[0]} tokens > max_seq_length {max_length} and the cut "
                    f"would fall inside or before an image span",
                )
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if not np.any(labels != IGNORE_INDEX):
            raise RecordError(
                "too_long", f"no supervised token left within max_seq_length {max_length}"
            )
        return input_ids, labels

    # -- Inference -------------------------------------------------------------------------
    # Added for vlpretrain.chat; the training path above does not use it.

    def generation_prompt(self, turns: Turns) -> np.ndarray:
        """input_ids of `turns` (ending with a human turn) followed by the assistant prefix.

        Equal to the training input_ids of the same turns plus an answer, up to the first
        answer token (the inference layout is the training layout).
        """
        if not turns or turns[-1][0] != "human":
            raise ValueError(
                f"a generation prompt needs turns ending with a 'human' turn, got roles "
                f"{[role for role, _ in turns]}"
            )
        prefix_ids = tuple(self._encode([self.template.assistant_prefix])[0])
        prefix = Segment("gpt", prefix_ids, (False,) * len(prefix_ids))
        input_ids, _ = self.join([*self.render_segments(turns), prefix])
        return input_ids
