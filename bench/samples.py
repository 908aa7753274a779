"""Benchmark the sample pipeline and the annotation index, in CPU time, side by side.

    (a) Real photos (scikit-image's samples upscaled to 1920x1080 and 4000x3000, JPEG), max 12
        tiles + thumbnail as the recipes run: CPU time per image of the reference's per-tile
        path (re-implemented below from its behaviour: Image.open().convert('RGB') ->
        dynamic_preprocess -> per tile Resize / ToTensor / Normalize -> torch.stack) against
        ours (data/media.load_image -> data/tiling.dynamic_tiles -> one normalize into an
        array), and our whole DatasetSource.load (tokenising included) per sample.
    (b) 1M-line annotation: index build time, peak memory (tracemalloc) and random-access
        reads, against reading all lines into a Python list (the reference's way).

Run: .venv/bin/python bench/samples.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import write_photo_dataset  # noqa: E402

from vlpretrain.data import tiling  # noqa: E402
from vlpretrain.data.build import DatasetSource, SampleConfig  # noqa: E402
from vlpretrain.data.index import AnnotationIndex  # noqa: E402
from vlpretrain.data.media import load_image  # noqa: E402
from vlpretrain.data.meta import load_meta  # noqa: E402
from vlpretrain.facts import RunFacts  # noqa: E402
from vlpretrain.testing.tokenizer import train_tiny_tokenizer  # noqa: E402
from vlpretrain.tokens import add_internvl_tokens  # noqa: E402

TILE_SIZE = 448
MAX_TILES = 12
NUM_LINES = 1_000_000
NUM_READS = 20_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- the reference's per-tile path


def reference_grid(width: int, height: int, max_num: int, size: int) -> tuple[int, int]:
    """The reference's find_closest_aspect_ratio over its candidate order (min_num 1)."""
    ratios = {(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
              for j in range(1, n + 1) if 1 <= i * j <= max_num}  # fmt: skip
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def reference_pixel_values(path: Path) -> torch.Tensor:
    """(T, 3, 448, 448) float32 the way the reference's dataset builds them (data_augment off)."""
    image = Image.open(path).convert("RGB")
    cols, rows = reference_grid(*image.size, MAX_TILES, TILE_SIZE)
    resized = image.resize((TILE_SIZE * cols, TILE_SIZE * rows))
    tiles = [resized.crop(((k % cols) * TILE_SIZE, (k // cols) * TILE_SIZE,
                           (k % cols + 1) * TILE_SIZE, (k // cols + 1) * TILE_SIZE))
             for k in range(cols * rows)]  # fmt: skip
    if len(tiles) > 1:
        tiles.append(image.resize((TILE_SIZE, TILE_SIZE)))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for tile in tiles:  # T.Compose([RGB, Resize, ToTensor, Normalize]) per tile
        tile = tile.convert("RGB") if tile.mode != "RGB" else tile
        tile = tile.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
        array = torch.from_numpy(np.array(tile, np.uint8, copy=True))
        tensor = array.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        out.append(tensor.sub_(mean).div_(std))
    return torch.stack(out)


def our_pixel_values(path: Path) -> np.ndarray:
    image = load_image(path)
    tiles = tiling.dynamic_tiles(image, 1, MAX_TILES, TILE_SIZE, True)
    return tiling.normalize(tiles, "imagenet", TILE_SIZE)


def cpu_seconds(fn, *args) -> float:  # noqa: ANN001 - tiny local helper
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def bench_pipeline(root: Path, repeats: int) -> None:
    meta = write_photo_dataset(root / "photos", num_records=12)
    spec = load_meta(meta)[0]
    images = sorted((root / "photos" / "images").glob("*.jpg"))
    print(f"(a) {len(images)} real photos (1920x1080, 4000x3000), max {MAX_TILES} tiles + "
          f"thumbnail, median [min, max] of {repeats} passes, CPU ms per image")  # fmt: skip
    for path in images[:2]:  # same pixels both ways (ours normalises in float32 numpy)
        gap = np.abs(reference_pixel_values(path).numpy() - our_pixel_values(path)).max()
        print(f"    {path.name}: max |reference - ours| pixel value {gap:.2e}")
    tokenizer = train_tiny_tokenizer(root / "tok")
    add_internvl_tokens(tokenizer)
    facts = RunFacts.from_tokenizer(
        tokenizer, tile_size=TILE_SIZE, num_image_token=256, template="internvl2_5"
    )
    config = SampleConfig(cache_dir=str(root / "cache"), max_dynamic_patch=MAX_TILES)
    source = DatasetSource(spec, config, facts, tokenizer)
    source.load(0, 0, 0)  # warm-up (tokenizer, index)
    times: dict[str, list[float]] = {"reference": [], "ours": [], "ours, whole sample": []}
    for _ in range(repeats):  # interleaved passes: neighbours slow all three alike
        times["reference"].append(sum(cpu_seconds(reference_pixel_values, p) for p in images))
        times["ours"].append(sum(cpu_seconds(our_pixel_values, p) for p in images))
        whole = sum(cpu_seconds(source.load, i, 0, 0) for i in range(len(images)))
        times["ours, whole sample"].append(whole)
    per_image = {k: [1000 * t / len(images) for t in v] for k, v in times.items()}
    for name, values in per_image.items():
        print(f"    {name:19}: {statistics.median(values):7.1f} ms "
              f"[{min(values):.1f}, {max(values):.1f}]")  # fmt: skip
    ratios = [r / o for r, o in zip(times["reference"], times["ours"], strict=True)]
    print(f"    CPU-time ratio reference/ours (pixels): {statistics.median(ratios):.2f} "
          f"[{min(ratios):.2f}, {max(ratios):.2f}] (> 1: ours faster)")  # fmt: skip


def write_big_annotation(path: Path) -> None:
    line = '{"id": %d, "image": "images/%08d.jpg", "conversations": [{"from": "human", "value": "<image>"}]}\n'  # noqa: E501
    with open(path, "w") as f:
        for start in range(0, NUM_LINES, 100_000):
            f.write("".join(line % (i, i) for i in range(start, start + 100_000)))


def measure(fn):  # noqa: ANN001, ANN201 - tiny local helper
    # CPU time, not wall time: on a shared machine wall time measures the neighbours. Timing
    # runs without tracemalloc (its per-allocation hook slows the list of lines most, which once
    # made the index look faster to build); memory is a second run under tracemalloc.
    start = time.process_time()
    result = fn()
    elapsed = time.process_time() - start
    del result
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak


def bench_index(root: Path) -> None:
    path = root / "big.jsonl"
    write_big_annotation(path)
    size_mb = path.stat().st_size / 2**20
    print(f"(b) annotation of {NUM_LINES:,} lines ({size_mb:.0f} MiB)")
    fresh = iter(range(100))  # a new cache folder per build: each call really builds
    index, t_build, m_build = measure(lambda: AnnotationIndex(path, root / f"c{next(fresh)}"))
    _, t_cached, _ = measure(lambda: AnnotationIndex(path, root / "c0"))
    lines, t_list, m_list = measure(lambda: open(path).readlines())
    picks = np.random.default_rng(0).integers(0, NUM_LINES, NUM_READS).tolist()
    start = time.process_time()
    for i in picks:
        json.loads(index.read(i))
    t_index_reads = time.process_time() - start
    start = time.process_time()
    for i in picks:
        json.loads(lines[i])
    t_list_reads = time.process_time() - start
    mib = 2**20
    print(f"    index build   : {t_build:6.2f} s CPU, peak {m_build / mib:7.1f} MiB "
          f"(cached reload {t_cached * 1000:.1f} ms)")  # fmt: skip
    print(f"    list of lines : {t_list:6.2f} s CPU, peak {m_list / mib:7.1f} MiB")
    print(f"    memory ratio list/index: {m_list / m_build:.1f} (peak of list / peak of index)")
    print(f"    build CPU-time ratio index/list: {t_build / t_list:.2f} (> 1: index slower)")
    us = 1e6 / NUM_READS
    ratio = t_index_reads / t_list_reads
    print(f"    random access + json.loads: index {t_index_reads * us:.1f} us/record, "
          f"list {t_list_reads * us:.1f} us/record, ratio {ratio:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved passes over photos")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_pipeline(root, args.repeats)
        bench_index(root)


if __name__ == "__main__":
    main()
