"""Raw annotation line -> validated `Record`; nothing is loaded or tokenized.

    bytes of one .jsonl line --parse_record--> Record | raises RecordError(reason, detail)

Dispatch as the reference: a non-empty `image` (list -> multi_image, even of one; string ->
image), else a non-empty `video`, else text; but `"image": ""` or `"video": ""` is rejected
(the reference treats it as a text record, so its `<image>` tag stays literal text). Turns
are `{"from": role, "value": text}` with roles human/gpt, and system only as the first turn.
The docs' `text` key is rejected with a message naming it (the reference fails on it silently).

Hostile lines are refused here with a reason, never by an exception from deeper down: JSON
nested deeper than the parser's recursion allows is malformed_json, as is a string holding a
lone UTF-16 surrogate (valid JSON, "\\ud800", but not text a tokenizer or a file system
takes); a clip bound too large for a float is missing_field.

Media paths are joined to the dataset root by `Location.join` (data.location): `root / value`
for a local root, `root + "/" + value` for a URL root (s3://...; the reference concatenates
root + value for s3:// roots, so a root without its trailing slash glues names together); a
value that is itself a URL stands for itself.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

from vlpretrain.data.location import Location, PathLike

RecordKind = Literal["text", "image", "multi_image", "video"]
ROLES = ("system", "human", "gpt")

SKIP_REASONS = (
    "malformed_json",
    "empty_conversation",
    "unknown_role",
    "missing_field",
    "placeholder_mismatch",
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "video_error",
    "too_long",
    "read_error",
    "media_outside_root",
    "media_changed",
    "unexpected_error",
)
"""Every `SkippedSample.reason` the sample builder can produce. `unexpected_error` is the
builder's catch-all (data.build): an exception no check foresaw, its type in the detail.
`media_outside_root` only with data.media_under_root; `media_changed` only on resume, for a
record of the saved packer buffer that no longer loads as it did (data.on_changed_media)."""


class RecordError(Exception):
    """A record that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """One validated annotation record."""

    kind: RecordKind
    conversations: tuple[tuple[str, str], ...]
    """(role, value) pairs; role in ROLES, system only first."""
    images: tuple[Location, ...] = ()
    """Image paths resolved against the dataset root (kinds image / multi_image)."""
    video: Location | None = None
    """Video file or frame folder (kind video)."""
    clip: tuple[float, float] | None = None
    """Optional [start_sec, end_sec] of the video."""


def _check_text(value: str, field: str) -> str:
    """`value` itself, if it is Unicode text (no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start : err.start + 1]
        raise RecordError(
            "malformed_json",
            f"{field} holds a lone surrogate {bad!r} at character {err.start}, not Unicode text",
        ) from err
    return value


def _parse_turn(position: int, turn: Any) -> tuple[str, str]:
    where = f"conversations[{position}]"
    if not isinstance(turn, dict):
        raise RecordError("missing_field", f"{where} must be an object, got {turn!r:.60}")
    if "from" not in turn:
        raise RecordError("missing_field", f"{where} has no 'from'")
    if "value" not in turn:
        hint = " ('text' is not accepted: rename it to 'value')" if "text" in turn else ""
        raise RecordError("missing_field", f"{where} has no 'value'{hint}")
    role, value = turn["from"], turn["value"]
    if role not in ROLES:
        raise RecordError("unknown_role", f"{where}.from = {role!r}; expected human, gpt, system")
    if role == "system" and position != 0:
        raise RecordError("unknown_role", f"{where}: 'system' is only allowed as the first turn")
    if not isinstance(value, str):
        raise RecordError("missing_field", f"{where}.value must be a string, got {value!r:.60}")
    return role, _check_text(value, f"{where}.value")


def _parse_conversations(obj: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if "conversations" not in obj:
        raise RecordError("missing_field", "no 'conversations' field")
    raw = obj["conversations"]
    if not isinstance(raw, list):
        raise RecordError("missing_field", "'conversations' must be a list of turns")
    if not raw:
        raise RecordError("empty_conversation", "'conversations' is empty")
    turns = tuple(_parse_turn(i, turn) for i, turn in enumerate(raw))
    if not any(role == "gpt" for role, _ in turns):
        raise RecordError("empty_conversation", "no 'gpt' turn: nothing to train on")
    return turns


def _join(root: Location, value: Any, field: str) -> Location:
    """`value` below `root`; a URL value (s3://...) stands for itself."""
    if not isinstance(value, str) or not value:
        raise RecordError("missing_field", f"{field} must be a non-empty path string")
    _check_text(value, field)
    return root.join(value)


def _seconds(value: Any) -> float | None:
    """`value` as a finite float, None if it is not a number or too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)  # an int of 400 digits overflows here
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _parse_clip(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        start, end = _seconds(value[0]), _seconds(value[1])
        if start is not None and end is not None and 0 <= start < end:
            return start, end
    raise RecordError("missing_field", f"'clip' must be [start_sec, end_sec], got {value!r:.80}")


def parse_record(line: str | bytes, root: PathLike) -> Record:
    """Validate one annotation line; media paths are joined to `root` (not opened).

    Raises:
        RecordError: with one of SKIP_REASONS and a detail naming the field at fault.
    """
    try:
        obj = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError("malformed_json", str(err)) from err
    except RecursionError as err:
        raise RecordError(
            "malformed_json",
            f"JSON nested deeper than the parser allows (about {sys.getrecursionlimit()} levels)",
        ) from err
    if not isinstance(obj, dict):
        raise RecordError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    turns = _parse_conversations(obj)
    base = Location.parse(root)
    image = obj.get("image")
    for key in ("image", "video"):
        if obj.get(key) == "":
            raise RecordError(
                "missing_field",
                f"'{key}' is an empty string: name the file, or drop the key for a text record",
            )
    if isinstance(image, list) and image:
        paths = tuple(_join(base, v, f"image[{i}]") for i, v in enumerate(image))
        return Record("multi_image", turns, images=paths)
    if image:
        return Record("image", turns, images=(_join(base, image, "image"),))
    video = obj.get("video")
    if video:
        return Record(
            "video", turns, video=_join(base, video, "video"), clip=_parse_clip(obj.get("clip"))
        )
    return Record("text", turns)
