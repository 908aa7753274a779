"""Load and validate the reference's meta JSON: which datasets to train on, and how.

    meta.json --load_meta--> [DatasetSpec]   (order of keys = dataset_index)

Every problem in the file is gathered and raised as ONE ValueError, each line naming the
dataset and the field, so a user fixes the whole file in one go (the reference crashes on the
first missing key). Unknown keys are logged, not rejected. A dataset
name (or a field) given twice is an error: JSON parsers keep the last one silently. An
annotation file without any record is an error here; a dataset whose repeat_time leaves no
record (int(N * r) == 0) is one in data.build.build_sources, which counts the lines.

Path rule: a relative `root` or `annotation` is taken relative to the current directory if it
exists there, otherwise relative to the directory of the meta file (a meta file given by URL:
relative to its URL prefix, never the current directory). The meta file, `root` and
`annotation` may be URLs of any installed fsspec protocol (s3://, gs://, https://; see
data.location): the protocol must be installed and an annotation object must exist and hold a
record; a URL root is not checked (object stores have no directories: a missing image is a
counted skip). Location.parse (current_directory_first) applies the rule.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, TypeGuard

from vlpretrain.data import remote
from vlpretrain.data.location import Location, PathLike, RemoteReadError
from vlpretrain.data.remote import RemoteSettings
from vlpretrain.errors import RefusedError

logger = logging.getLogger(__name__)

KNOWN_KEYS = frozenset(
    {"root", "annotation", "repeat_time", "data_augment", "max_dynamic_patch", "length"}
)
REQUIRED_KEYS = ("root", "annotation", "repeat_time", "data_augment")


@dataclass(frozen=True)
class DatasetSpec:
    """One validated entry of the meta file."""

    name: str
    """Dataset name (the key in the meta file)."""
    dataset_index: int
    """0-based position of the key in the meta file."""
    root: Location
    """Directory (or URL prefix) that relative media paths are joined to."""
    annotation: Location
    """The .jsonl annotation file (or object URL)."""
    repeat_time: float
    """Effective length = int(num_lines * repeat_time); see data.build.repeat_line_index."""
    data_augment: bool
    """Random JPEG re-compression of every tile."""
    max_dynamic_patch: int | None = None
    """Per-dataset override of SampleConfig.max_dynamic_patch."""

    def __post_init__(self) -> None:
        # a spec written by hand (tests, benchmarks, chat) may name its files by str or Path
        object.__setattr__(self, "root", Location.parse(self.root))
        object.__setattr__(self, "annotation", Location.parse(self.annotation))


class _JSONObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys it held more than once."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        obj.duplicates = tuple(sorted({key for key in keys if keys.count(key) > 1}))
    return obj


HAS_RECORDS_BLOCK = 1 << 16
"""has_records reads this much at a time and stops at the first non-blank block."""


def has_records(path: PathLike) -> bool:
    """True if `path` holds a non-whitespace byte (an annotation line that is not blank)."""
    with Location.parse(path).open() as stream:
        while block := stream.read(HAS_RECORDS_BLOCK):
            if block.strip():
                return True
    return False


class MetaFileError(RefusedError, ValueError):
    """Every problem of a meta file (or of the datasets it names), reported at once."""


def problems_error(meta_path: PathLike, problems: list[str]) -> MetaFileError:
    """The one MetaFileError listing every problem of a meta file."""
    listing = "\n  - ".join(problems)
    return MetaFileError(f"meta file {meta_path} has {len(problems)} problem(s):\n  - {listing}")


def resolve_path(value: str, meta_dir: Location) -> Location:
    """Apply the path rule of the module docstring to one path from the meta file."""
    return Location.parse(value, meta_dir, current_directory_first=True)


def _check_annotation(location: Location) -> str | None:
    """Why the annotation file or object cannot be used, or None."""
    problem = location.protocol_problem()
    if problem:
        return problem
    try:
        if location.info().is_dir:
            return f"{location} is a {location.folder_noun}, not an annotation {location.noun}"
        if not has_records(location):
            return f"{location} has no records (empty or blank lines only)"
    except FileNotFoundError:
        return f"no {location.noun} {location}"
    except RemoteReadError as err:
        return str(err)
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_entry(name: str, entry: Any, meta_dir: Location, problems: list[str]) -> dict[str, Any]:
    """Validate one dataset entry, appending problems; returns the parsed fields."""
    if not isinstance(entry, dict):
        problems.append(f"dataset {name!r}: must be a JSON object, got {type(entry).__name__}")
        return {}
    for key in getattr(entry, "duplicates", ()):
        problems.append(f"dataset {name!r}: field {key!r} is given more than once")
    for key in REQUIRED_KEYS:
        if key not in entry:
            problems.append(f"dataset {name!r}: missing required field {key!r}")
    for key in sorted(set(entry) - KNOWN_KEYS):
        logger.warning("meta: dataset %r: unknown field %r ignored", name, key)
    parsed: dict[str, Any] = {}
    root = entry.get("root")
    if "root" in entry:
        if not isinstance(root, str):
            problems.append(f"dataset {name!r}: field 'root' must be a string, got {root!r}")
        else:
            parsed["root"] = resolve_path(root, meta_dir)
            problem = parsed["root"].protocol_problem()
            if problem:
                problems.append(f"dataset {name!r}: field 'root' {root!r}: {problem}")
            elif not parsed["root"].may_be_folder():
                problems.append(f"dataset {name!r}: field 'root': no directory {parsed['root']}")
    ann = entry.get("annotation")
    if "annotation" in entry:
        if not isinstance(ann, str):
            problems.append(f"dataset {name!r}: field 'annotation' must be a string, got {ann!r}")
        elif not ann.endswith(".jsonl"):
            problems.append(f"dataset {name!r}: field 'annotation' {ann!r} must be a .jsonl file")
        else:
            parsed["annotation"] = resolve_path(ann, meta_dir)
            problem = _check_annotation(parsed["annotation"])
            if problem:
                problems.append(f"dataset {name!r}: field 'annotation': {problem}")
    rep = entry.get("repeat_time")
    if "repeat_time" in entry:
        if not _is_number(rep) or not math.isfinite(rep) or rep <= 0:
            problems.append(
                f"dataset {name!r}: field 'repeat_time' must be a number > 0, got {rep!r}"
            )
        else:
            parsed["repeat_time"] = float(rep)
    aug = entry.get("data_augment")
    if "data_augment" in entry:
        if not isinstance(aug, bool):
            problems.append(f"dataset {name!r}: field 'data_augment' must be a bool, got {aug!r}")
        else:
            parsed["data_augment"] = aug
    mdp = entry.get("max_dynamic_patch")
    if mdp is not None:
        if not isinstance(mdp, int) or isinstance(mdp, bool) or mdp < 1:
            problems.append(
                f"dataset {name!r}: field 'max_dynamic_patch' must be an integer >= 1, got {mdp!r}"
            )
        else:
            parsed["max_dynamic_patch"] = mdp
    return parsed


def _read_meta_text(meta_path: Location) -> str:
    problem = meta_path.protocol_problem()
    if problem:
        raise ValueError(f"meta file {meta_path}: {problem}")
    return meta_path.read_all().decode("utf-8")


NESTING_REPORTED = 3
"""Depth a meta file needs ({dataset: {field: [value]}}); the error names where it is passed."""


def nesting_position(text: str, depth: int) -> str:
    """'depth D passed at line L, column C': where `text` opens its (depth + 1)-th nested
    bracket outside strings ('' if it never does)."""
    level, in_string, escaped, line, column = 0, False, False, 1, 0
    for char in text:
        column += 1
        if char == "\n":
            line, column = line + 1, 0
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            if level > depth:
                return f"depth {depth} passed at line {line}, column {column}"
        elif char in "]}":
            level -= 1
    return ""


def load_meta(
    path: PathLike, settings: RemoteSettings = remote.DEFAULT_SETTINGS
) -> list[DatasetSpec]:
    """Read and validate a meta JSON file (a local path or a URL; remote reads use `settings`).

    Raises:
        ValueError: listing every problem found (unreadable file, bad JSON, missing or
            mistyped fields, missing files or objects, non-.jsonl annotation, repeat_time <= 0).
    """
    meta_path = Location.parse(path, settings=settings)
    try:
        text = _read_meta_text(meta_path)
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"meta file {meta_path}: cannot read JSON: {err}") from err
    except RecursionError as err:
        where = nesting_position(text, NESTING_REPORTED)
        raise ValueError(
            f"meta file {meta_path}: cannot read JSON: nested deeper than the JSON parser allows "
            f"(about {sys.getrecursionlimit()} levels; a meta file needs {NESTING_REPORTED})"
            + (f", {where}" if where else "")
        ) from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"meta file {meta_path}: must be a non-empty JSON object of datasets")
    problems = [
        f"dataset {name!r} is defined more than once (JSON would keep only the last one)"
        for name in getattr(data, "duplicates", ())
    ]
    parsed = [_check_entry(name, entry, meta_path.parent, problems) for name, entry in data.items()]
    if problems:
        raise problems_error(meta_path, problems)
    return [
        DatasetSpec(name=name, dataset_index=index, **fields)
        for index, (name, fields) in enumerate(zip(data, parsed, strict=True))
    ]
