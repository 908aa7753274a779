"""Typed records that cross the boundary between sample building and the data stream.

    annotation line --(data.records / data.build)--> TokenizedSample | SkippedSample
    TokenizedSample --(data.packing)--> PackedBatch

A `TokenizedSample` is one annotation record, tokenized with its template and with its
images already tiled and normalised. Pure-text samples carry zero tiles: the dummy tile that
keeps every rank running the vision tower is added once per packed row (see data.packing),
not once per text sample as the reference does.

Shapes: L = tokens of the sample, T = tiles of the sample, S = tile side in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
"""Label value of a token that is not trained."""


@dataclass(frozen=True)
class SampleSource:
    """Where a sample came from: enough to find it again by hand."""

    dataset: str
    """Dataset name as in the meta file."""
    path: str
    """Annotation file."""
    line: int
    """1-based line number in the annotation file."""

    def __str__(self) -> str:
        return f"{self.path}:{self.line} (dataset {self.dataset!r})"


@dataclass
class TokenizedSample:
    """One training sample, ready to be packed."""

    input_ids: np.ndarray
    """(L,) int64 token ids."""
    labels: np.ndarray
    """(L,) int64; IGNORE_INDEX where the token is not trained."""
    pixel_values: np.ndarray
    """(T, 3, S, S) uint8 RGB tiles (data.tiling.tile_pixels), T may be 0."""
    num_tiles_per_image: tuple[int, ...]
    """Tiles of each image (or video frame) in order; sums to T."""
    dataset_index: int
    """Index of the dataset in the meta file (order of its keys)."""
    source: SampleSource
    """File and line the sample was read from."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class SkippedSample:
    """A record that could not become a sample; counted and reported, never hidden."""

    dataset_index: int
    source: SampleSource
    reason: str
    """Short machine-friendly category, e.g. 'missing_image', 'malformed_json'."""
    detail: str = field(default="")
    """Human-readable explanation naming the field at fault."""

    def __str__(self) -> str:
        return f"{self.source}: skipped ({self.reason}) {self.detail}"
