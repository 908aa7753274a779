"""Dynamic tiling: grid choice (the reference's grid table and tie-breaks), tiles, normalisation."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.data import tiling

REFERENCE_ORDER_12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6),
    (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3),
    (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3),
    (1, 12), (6, 2), (2, 6),
]  # fmt: skip


def test_candidate_grids_match_reference_order():
    assert tiling.candidate_grids(1, 12) == REFERENCE_ORDER_12


@pytest.mark.parametrize(
    ("size", "grid", "num_tiles"),
    [
        ((448, 448), (1, 1), 1),
        ((224, 224), (1, 1), 1),
        ((300, 300), (1, 1), 1),
        ((896, 448), (2, 1), 3),
        ((100, 50), (2, 1), 3),
        ((1344, 448), (3, 1), 4),
        ((900, 900), (2, 2), 5),
        ((1920, 1080), (4, 2), 9),
        ((1280, 720), (4, 2), 9),
        ((1344, 1344), (3, 3), 10),
        ((640, 480), (4, 3), 13),
        ((800, 600), (4, 3), 13),
        ((500, 400), (4, 3), 13),
        ((560, 448), (4, 3), 13),
        ((10, 1000), (1, 12), 13),
        ((5000, 100), (12, 1), 13),
    ],
)
def test_grid_table_of_spec(size, grid, num_tiles):
    assert tiling.closest_grid(*size, tiling.candidate_grids(1, 12), 448) == grid
    tiles = tiling.dynamic_tiles(Image.new("RGB", size), 1, 12, 448, use_thumbnail=True)
    assert len(tiles) == num_tiles
    assert all(t.size == (448, 448) for t in tiles)


def test_candidate_order_is_irrelevant_with_min_one():
    grids = tiling.candidate_grids(1, 12)
    shuffled = sorted(grids, key=lambda g: g[0] * g[1])
    random.Random(0).shuffle(shuffled)
    shuffled.sort(key=lambda g: g[0] * g[1])  # any order among equal products
    for w, h in [(640, 480), (1920, 1080), (900, 900), (333, 777), (1344, 1344)]:
        assert tiling.closest_grid(w, h, shuffled, 448) == tiling.closest_grid(w, h, grids, 448)


def test_square_tie_break_by_area():
    # (1,1), (2,2), (3,3) tie exactly; the later one wins iff W*H > 0.5 * 448^2 * i * j
    grids = tiling.candidate_grids(1, 12)
    assert tiling.closest_grid(448, 448, grids, 448) == (1, 1)  # 200704 > 401408? no
    assert tiling.closest_grid(900, 900, grids, 448) == (2, 2)  # 810000 > 401408, < 903168
    assert tiling.closest_grid(1344, 1344, grids, 448) == (3, 3)


def test_tiles_are_row_major_with_thumbnail_last():
    image = Image.new("RGB", (896, 448), (255, 0, 0))
    image.paste((0, 0, 255), (448, 0, 896, 448))  # right half blue
    tiles = tiling.dynamic_tiles(image, 1, 12, 448, use_thumbnail=True)
    assert np.asarray(tiles[0])[200, 200].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[200, 200].tolist() == [0, 0, 255]
    assert tiles[2].size == (448, 448)  # thumbnail of the whole image


def test_multi_image_budget():
    assert tiling.image_tile_budget(12, 2) == 6
    assert tiling.image_tile_budget(12, 5) == 2
    assert tiling.image_tile_budget(12, 13) == 1


def test_normalize_values_and_shape():
    tile = Image.new("RGB", (8, 8), (255, 0, 128))
    out = tiling.normalize([tile], "siglip")
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    # siglip: (x/255 - 0.5) / 0.5
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)
    out = tiling.normalize([tile], "imagenet")
    np.testing.assert_allclose(out[0, 0, 0, 0], (1.0 - 0.485) / 0.229, rtol=1e-6)


def test_pad_to_square_uses_mean_colour():
    padded = tiling.pad_to_square(Image.new("RGB", (4, 2), (0, 0, 0)), "imagenet")
    assert padded.size == (4, 4)
    assert padded.getpixel((0, 0)) == (123, 116, 103)  # int(mean * 255)
    assert padded.getpixel((0, 1)) == (0, 0, 0)


def test_jpeg_augment_is_deterministic_given_rng():
    tile = Image.effect_noise((32, 32), 40).convert("RGB")
    a = tiling.jpeg_augment(tile, np.random.default_rng(3))
    b = tiling.jpeg_augment(tile, np.random.default_rng(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(tile))


@pytest.mark.parametrize("normalize_type", ["imagenet", "clip", "siglip"])
def test_uint8_tiles_normalised_later_equal_the_float_tiles_bit_for_bit(normalize_type):
    """The loader ships uint8 tiles (a quarter of the bytes) and the step normalises them
    where they are used: the model sees exactly the float32 input of normalising on the host
    as x * (1 / (255 std)) - mean / std, on a real photo's tiles."""
    from skimage import data as photos

    image = Image.fromarray(photos.astronaut()).resize((200, 120))
    tiles = tiling.make_tiles(image, dynamic=True, min_num=1, max_num=6, tile_size=56,
                              use_thumbnail=True, pad2square=False,
                              normalize_type=normalize_type, augment_rng=None)  # fmt: skip
    pixels = tiling.tile_pixels(tiles, 56)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(tiles), 3, 56, 56)
    mean, std = (np.asarray(v, dtype=np.float32) for v in tiling.NORMALIZE_STATS[normalize_type])
    on_host = pixels.astype(np.float32) * (1.0 / (255.0 * std)).reshape(3, 1, 1)
    on_host -= (mean / std).reshape(3, 1, 1)
    later = tiling.model_pixels(torch.from_numpy(pixels), normalize_type)
    assert later.dtype == torch.float32 and np.array_equal(later.numpy(), on_host)
    normalised = torch.from_numpy(on_host)
    assert tiling.model_pixels(normalised, normalize_type) is normalised  # float: as given
