"""Load and validate the reference's meta JSON: which datasets to train on, and how.

    meta.json --load_meta--> [DatasetSpec]   (order of keys = dataset_index)

Every problem in the file is gathered and raised as ONE ValueError, each line naming the
dataset and the field, so a user fixes the whole file in one go (the reference crashes on the
first missing key, spec section 11 item 31). Unknown keys are logged, not rejected. A dataset
name (or a field) given twice is an error: JSON parsers keep the last one silently. An
annotation file without any record is an error here; a dataset whose repeat_time leaves no
record (int(N * r) == 0) is one in data.build.build_sources, which counts the lines.

Path rule: a relative `root` or `annotation` is taken relative to the current directory if it
exists there, otherwise relative to the directory of the meta file. Remote roots (s3://) are
not supported.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

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
    root: Path
    """Directory that relative media paths are joined to."""
    annotation: Path
    """The .jsonl annotation file."""
    repeat_time: float
    """Effective length = int(num_lines * repeat_time); see data.build.repeat_line_index."""
    data_augment: bool
    """Random JPEG re-compression of every tile."""
    max_dynamic_patch: int | None = None
    """Per-dataset override of SampleConfig.max_dynamic_patch."""


class _JSONObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys it held more than once."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        obj.duplicates = tuple(sorted({key for key in keys if keys.count(key) > 1}))
    return obj


def has_records(path: Path) -> bool:
    """True if `path` holds a non-whitespace byte (an annotation line that is not blank)."""
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip():
                return True
    return False


def problems_error(meta_path: Path, problems: list[str]) -> ValueError:
    """The one ValueError listing every problem of a meta file."""
    listing = "\n  - ".join(problems)
    return ValueError(f"meta file {meta_path} has {len(problems)} problem(s):\n  - {listing}")


def resolve_path(value: str, meta_dir: Path) -> Path:
    """Apply the path rule of the module docstring to one path from the meta file."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (meta_dir / path).resolve()


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_entry(name: str, entry: Any, meta_dir: Path, problems: list[str]) -> dict[str, Any]:
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
        elif "://" in root:
            problems.append(f"dataset {name!r}: field 'root' {root!r}: remote roots unsupported")
        else:
            parsed["root"] = resolve_path(root, meta_dir)
            if not parsed["root"].is_dir():
                problems.append(f"dataset {name!r}: field 'root': no directory {parsed['root']}")
    ann = entry.get("annotation")
    if "annotation" in entry:
        if not isinstance(ann, str):
            problems.append(f"dataset {name!r}: field 'annotation' must be a string, got {ann!r}")
        elif not ann.endswith(".jsonl"):
            problems.append(f"dataset {name!r}: field 'annotation' {ann!r} must be a .jsonl file")
        else:
            parsed["annotation"] = resolve_path(ann, meta_dir)
            if not parsed["annotation"].is_file():
                problems.append(
                    f"dataset {name!r}: field 'annotation': no file {parsed['annotation']}"
                )
            elif not has_records(parsed["annotation"]):
                problems.append(
                    f"dataset {name!r}: field 'annotation': {parsed['annotation']} has no "
                    "records (empty or blank lines only)"
                )
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


def load_meta(path: str | Path) -> list[DatasetSpec]:
    """Read and validate a meta JSON file.

    Raises:
        ValueError: listing every problem found (unreadable file, bad JSON, missing or
            mistyped fields, missing files, non-.jsonl annotation, repeat_time <= 0).
    """
    meta_path = Path(path)
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"), object_pairs_hook=_object_pairs)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"meta file {meta_path}: cannot read JSON: {err}") from err
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
