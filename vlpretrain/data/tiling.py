"""Dynamic-resolution tiling and normalisation of images (pure functions).

    PIL image --closest_grid--> (cols, rows) --dynamic_tiles--> [tile] (+ thumbnail)
    [tile] --(jpeg_augment)--> --normalize--> (T, 3, S, S) float32

Grid choice follows the reference exactly: candidates sorted by tile count, nearest aspect
ratio wins, exact ties go to the later grid iff the image area exceeds half the grid's area.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image

NormalizeType = Literal["imagenet", "clip", "siglip"]

NORMALIZE_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""(mean, std) per channel for each normalize_type."""

JPEG_QUALITY_RANGE = (75, 100)
"""Inclusive range of the random JPEG quality used by data augmentation."""


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, sorted by tile count.

    Among equal tile counts the order is CPython's iteration order of a set of int tuples
    (deterministic), which reproduces the reference's list; it only matters for min_num >= 2.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(
    width: int, height: int, grids: list[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """Grid whose aspect ratio is nearest to width/height (the reference's tie-break)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image, min_num: int, max_num: int, tile_size: int, use_thumbnail: bool
) -> list[Image.Image]:
    """Resize `image` to its grid and cut it into tiles, row-major; thumbnail last if >1 tile."""
    cols, rows = closest_grid(*image.size, candidate_grids(min_num, max_num), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def image_tile_budget(max_dynamic_patch: int, num_images: int) -> int:
    """Max tiles per image of a multi-image sample: max(1, max_dynamic_patch // num_images)."""
    return max(1, max_dynamic_patch // max(1, num_images))


def pad_to_square(image: Image.Image, normalize_type: NormalizeType) -> Image.Image:
    """Centre `image` on a square canvas of side max(W, H) filled with the mean colour."""
    width, height = image.size
    if width == height:
        return image
    fill = tuple(int(m * 255) for m in NORMALIZE_STATS[normalize_type][0])
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def jpeg_augment(tile: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Round-trip `tile` through an in-memory JPEG of random quality in JPEG_QUALITY_RANGE."""
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    buffer = io.BytesIO()
    tile.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return reopened.convert("RGB")


def tile_pixels(tiles: list[Image.Image], tile_size: int | None = None) -> np.ndarray:
    """Stack tiles into (T, 3, S, S) uint8 RGB, resized to S if needed: a quarter of the
    bytes of normalised float32 tiles through the loader, its workers and the host-to-device
    copy; `normalize_pixels` turns them into model input where they are used."""
    size = tile_size or (tiles[0].size[0] if tiles else 0)
    out = np.empty((len(tiles), 3, size, size), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.Resampling.BICUBIC)
        out[k] = np.asarray(tile.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return out


def normalize_pixels(pixels_T3SS: torch.Tensor, normalize_type: NormalizeType) -> torch.Tensor:
    """uint8 tiles -> float32 model input on their own device: x / 255, then (x - mean) / std,
    computed as x * (1 / (255 std)) - mean / std in float32."""
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in NORMALIZE_STATS[normalize_type])
    scale = (1.0 / (255.0 * std)).reshape(3, 1, 1).to(pixels_T3SS.device)
    shift = (mean / std).reshape(3, 1, 1).to(pixels_T3SS.device)
    return pixels_T3SS.to(torch.float32) * scale - shift


def model_pixels(pixels_T3SS: torch.Tensor, normalize_type: NormalizeType) -> torch.Tensor:
    """The model's input from a batch's tiles: uint8 tiles (as the loader ships them) are
    normalised here, on whatever device they are; float tiles are taken as normalised."""
    if pixels_T3SS.dtype == torch.uint8:
        return normalize_pixels(pixels_T3SS, normalize_type)
    return pixels_T3SS


def normalize(
    tiles: list[Image.Image], normalize_type: NormalizeType, tile_size: int | None = None
) -> np.ndarray:
    """Stack tiles into (T, 3, S, S) float32 model input: resize to S if needed, /255,
    (x - mean) / std (`tile_pixels`, then `normalize_pixels`)."""
    pixels = torch.from_numpy(tile_pixels(tiles, tile_size))
    return normalize_pixels(pixels, normalize_type).numpy()


def make_tiles(
    image: Image.Image,
    *,
    dynamic: bool,
    min_num: int,
    max_num: int,
    tile_size: int,
    use_thumbnail: bool,
    pad2square: bool,
    normalize_type: NormalizeType,
    augment_rng: np.random.Generator | None,
) -> list[Image.Image]:
    """Tiles of one image as the reference builds them (before normalisation).

    Dynamic: grid tiles (+ thumbnail). Otherwise one squashed tile, padded to a square first
    when `pad2square` and not augmenting (the reference ignores pad2square when augmenting).
    `augment_rng` given -> every tile is JPEG re-compressed with its own random quality.
    """
    if dynamic:
        tiles = dynamic_tiles(image, min_num, max_num, tile_size, use_thumbnail)
    else:
        if pad2square and augment_rng is None:
            image = pad_to_square(image, normalize_type)
        tiles = [image]
    if augment_rng is not None:
        tiles = [jpeg_augment(tile, augment_rng) for tile in tiles]
    square = (tile_size, tile_size)
    return [t if t.size == square else t.resize(square, Image.Resampling.BICUBIC) for t in tiles]
