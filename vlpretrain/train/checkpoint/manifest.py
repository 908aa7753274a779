"""The checkpoint manifest: size and content hash of every file, written last, checked on resume.

    save:   every rank hashes its share of the files --gather--> rank 0 writes manifest.json
    resume: every rank checks its share against manifest.json --gather--> one verdict

The hash is xxh3-128 (several GB/s per core), split over the ranks, so verifying a checkpoint
costs about as much as reading it once. A directory without a manifest is a save that never
finished; a file whose size or hash differs was truncated or corrupted after the save, and a
manifest naming a file outside its directory is refused. Also holds how checkpoint files are
read back: JSON helpers that name the file in every error, and a DCP reader whose `.metadata`
unpickler builds only DCP's own metadata classes and that refuses non-tensor entries and data
outside the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from vlpretrain.distributed.env import all_gather_objects, rank_and_world
from vlpretrain.errors import RefusedError

MANIFEST = "manifest.json"
HASH = "xxh3_128"
_CHUNK = 8 << 20


class CheckpointError(RefusedError, RuntimeError):
    """A checkpoint cannot be written, verified or read; the message names path and reason."""


def file_hash(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _share(names: list[str], rank: int, world_size: int) -> list[str]:
    return sorted(names)[rank::world_size]


def hash_files(directory: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """{relative name: {size, hash}} of this rank's share of the files under `directory`."""
    names = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    names = [n for n in names if n != MANIFEST]
    return {
        name: {"size": (directory / name).stat().st_size, HASH: file_hash(directory / name)}
        for name in _share(names, rank, world_size)
    }


def _check_share(directory: Path, files: dict[str, Any], rank: int, world_size: int) -> list[str]:
    problems = []
    for name in _share(list(files), rank, world_size):
        path, expected = directory / name, files[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(
                f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
            )
        elif file_hash(path) != expected[HASH]:
            problems.append(f"{name} content differs from the manifest ({HASH} mismatch)")
    return problems


def _read_manifest(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = directory / MANIFEST
    if not path.is_file():
        if not any(directory.iterdir()):
            return None, "empty directory (the save did not finish)"
        return None, f"no {MANIFEST} (the save did not finish, or it predates manifests)"
    try:
        manifest = read_json_file(path)
    except CheckpointError as error:
        return None, str(error)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"{path} lists no files"
    outside = sorted(name for name in files if not is_inside(directory, name))
    if outside:
        return None, f"{path} names files outside the checkpoint directory: {outside}"
    return files, None


def is_inside(directory: Path, name: str) -> bool:
    """Whether `name` is a relative path to a place inside `directory`, symlinks resolved.

    A manifest or DCP's metadata could otherwise make resume read any file the user can
    (an absolute path, '../..', a symlink out of the directory).
    """
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        return False
    root = directory.resolve()
    return (root / relative).resolve().is_relative_to(root)


def verify_checkpoint(directory: Path) -> str | None:
    """None if `directory` matches its manifest, else the reason (same on every rank).

    A collective: every rank checks its share of the files.
    """
    rank, world_size = rank_and_world()
    files, problem = _read_manifest(directory) if directory.is_dir() else (None, "not a directory")
    problems = [problem] if problem else _check_share(directory, files or {}, rank, world_size)
    found = sorted({p for part in all_gather_objects(problems) for p in part})
    return "; ".join(found) if found else None


def write_json_file(path: Path, value: Any) -> None:
    """JSON text, flushed to disk before returning (a checkpoint file must survive a crash)."""
    text = json.dumps(value, indent=1)
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file, line and column otherwise."""
    try:
        text = path.read_text()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
"""What DCP's .metadata pickle may build (plus torch dtypes): nothing that runs code."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_CLASSES.get(module, set())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(
                f"checkpoint .metadata refers to {module}.{name}, which a DCP metadata file "
                "never holds; refusing to load it (it could run code)"
            )
        return super().find_class(module, name)


class MetadataSafeReader(FileSystemReader):
    """DCP's file reader, reading `.metadata` with an allow-list unpickler and refusing
    metadata that names an entry that is not a tensor (DCP would unpickle it with torch.load,
    unrestricted) or data outside the checkpoint directory."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
            raise CheckpointError(f"{path}: not a valid DCP metadata file: {error}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        _check_tensors_only(path, metadata)
        _check_storage_inside(path, metadata)
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def _check_tensors_only(path: Path, metadata: Metadata) -> None:
    pickled = sorted(
        key
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, BytesStorageMetadata)
    )
    if pickled:
        raise CheckpointError(
            f"{path}: entries {pickled} are not tensors (DCP would unpickle them); refusing to "
            "load them (they could run code). The DCP files of this vlpretrain's checkpoints "
            "hold tensors only."
        )


def _check_storage_inside(path: Path, metadata: Metadata) -> None:
    directory = path.parent
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or not is_inside(directory, relative):
            raise CheckpointError(
                f"{path}: names data in {relative!r}, outside the checkpoint directory"
            )
