"""Benchmark: fill ratio of the best-fit packer vs the reference's first-fit packer.

    seeded (tokens, tiles) mix --> BestFitPacker (vlpretrain.data.packing)  --> fill, rows
                               --> reference_first_fit (below)             --> fill, rows

Fill ratio = real tokens / (emitted rows * max_packed_tokens). Both packers see the same
10,000 samples in the same order, budgets 16384 tokens / 48 tiles, buffer 20, and flush
their open rows at the end. Run: `.venv/bin/python bench/packing.py`.
"""

from __future__ import annotations

import argparse
import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vlpretrain.data.packing import BestFitPacker, PackingConfig, PackItem, PieceRef
from vlpretrain.data.samples import SampleSource, TokenizedSample
from vlpretrain.facts import RunFacts

TOKENS_PER_TILE = 256
IMAGE_OVERHEAD = 2  # <img> and </img>
TEMPLATE_TOKENS = 20  # system prompt, role markers
FACTS = RunFacts(
    tile_size=448,
    num_image_token=TOKENS_PER_TILE,
    template="internvl2_5",
    pad_token_id=0,
    img_start_token_id=1,
    img_end_token_id=2,
    img_context_token_id=3,
)
"""Image-span ids are only read when splitting, which this benchmark does not do."""


def sample_shapes(num_samples: int, seed: int) -> Iterator[tuple[int, int]]:
    """(tokens, tiles) of a pretraining-like mixture, one sample at a time."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=num_samples, p=[0.45, 0.15, 0.15, 0.25])
    for kind in kinds:
        if kind == 0:  # caption: one image of 1-13 tiles, 20-80 text tokens
            tiles = [int(rng.integers(1, 14))]
            text = int(rng.integers(20, 81))
        elif kind == 1:  # interleaved: 2-6 images of 1-4 tiles, 100-1500 text tokens
            tiles = [int(t) for t in rng.integers(1, 5, int(rng.integers(2, 7)))]
            text = int(rng.integers(100, 1501))
        elif kind == 2:  # long OCR: one document image of 1-6 tiles, 500-4000 text tokens
            tiles = [int(rng.integers(1, 7))]
            text = int(rng.integers(500, 4001))
        else:  # pure text, log-normal length capped at 8000
            tiles = []
            text = int(min(8000, max(30, rng.lognormal(6.5, 0.9))))
        tokens = TEMPLATE_TOKENS + text + sum(t * TOKENS_PER_TILE + IMAGE_OVERHEAD for t in tiles)
        yield tokens, sum(tiles)


@dataclass
class Result:
    name: str
    num_rows: int
    num_tokens: int
    max_tokens: int
    seconds: float

    @property
    def fill(self) -> float:
        return self.num_tokens / (self.num_rows * self.max_tokens)


def _fake_sample(index: int, tokens: int, tiles: int) -> TokenizedSample:
    ids = np.zeros(tokens, dtype=np.int64)
    return TokenizedSample(
        input_ids=ids,
        labels=ids,
        pixel_values=np.zeros((tiles, 3, 1, 1), dtype=np.uint8),
        num_tiles_per_image=(tiles,) if tiles else (),
        dataset_index=0,
        source=SampleSource("bench", "bench.jsonl", index + 1),
    )


def run_best_fit(shapes: list[tuple[int, int]], config: PackingConfig) -> Result:
    start = time.perf_counter()
    packer = BestFitPacker(config, FACTS)
    rows = []
    for index, (tokens, tiles) in enumerate(shapes):
        sample = _fake_sample(index, tokens, tiles)
        rows += packer.add(PackItem(PieceRef.whole(sample, index, 0), sample))
    rows += packer.flush()
    for row in rows:
        assert row.num_tokens <= config.max_packed_tokens
        assert row.num_tiles <= config.num_images_expected
    total = sum(row.num_tokens for row in rows)
    seconds = time.perf_counter() - start
    return Result("best-fit (ours)", len(rows), total, config.max_packed_tokens, seconds)


def reference_first_fit_rows(
    shapes: list[tuple[int, int]], max_tokens: int, max_tiles: int, max_buffer_size: int
) -> list[list[int]]:
    """The reference main loop on (tokens, tiles) only; no split, no overflow.

    Returns the emitted rows (flushed open rows last) as lists of indices into `shapes`.
    """
    # [tokens, tiles, indices], sorted by tiles descending, FIFO on ties
    buffers: list[tuple[int, int, list[int]]] = []
    emitted: list[list[int]] = []
    for index, (tokens, tiles) in enumerate(shapes):
        found = None
        for i, (buf_tokens, buf_tiles, _) in enumerate(buffers):
            if buf_tiles + tiles <= max_tiles and buf_tokens + tokens <= max_tokens:
                found = buffers.pop(i)
                break
        if found is None:
            buffer = (tokens, tiles, [index])
        else:
            buffer = (found[0] + tokens, found[1] + tiles, [*found[2], index])
        if buffer[0] >= max_tokens:
            emitted.append(buffer[2])
        else:
            # insert before the first buffer having fewer tiles
            keys = [-b[1] for b in buffers]
            buffers.insert(bisect.bisect_right(keys, -buffer[1]), buffer)
        while buffers and buffers[0][1] >= max_tiles:
            emitted.append(buffers.pop(0)[2])
        while len(buffers) > max_buffer_size:
            emitted.append(buffers.pop(0)[2])
    emitted.extend(b[2] for b in buffers)
    return emitted


def run_reference_first_fit(
    shapes: list[tuple[int, int]], max_tokens: int, max_tiles: int, max_buffer_size: int
) -> Result:
    start = time.perf_counter()
    rows = reference_first_fit_rows(shapes, max_tokens, max_tiles, max_buffer_size)
    total = sum(shapes[i][0] for row in rows for i in row)
    seconds = time.perf_counter() - start
    return Result("first-fit (reference)", len(rows), total, max_tokens, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = PackingConfig(max_packed_tokens=16384, num_images_expected=48, max_buffer_size=20)
    shapes = list(sample_shapes(args.samples, args.seed))
    ours = run_best_fit(shapes, config)
    reference = run_reference_first_fit(shapes, 16384, 48, 20)
    num_tokens = sum(t for t, _ in shapes)
    num_tiles = sum(t for _, t in shapes)
    print(
        f"{args.samples} samples, seed {args.seed}: {num_tokens} tokens, {num_tiles} tiles, "
        f"{num_tokens / num_tiles:.0f} tokens/tile (budget ratio {16384 / 48:.0f})"
    )
    for result in (ours, reference):
        per_10k = result.num_rows * 10_000 / args.samples
        print(
            f"{result.name:22s} fill {result.fill:.4f}  rows {result.num_rows:5d}"
            f"  rows/10k samples {per_10k:7.1f}  ({result.seconds:.2f} s)"
        )
    print(f"fill ratio ours / reference = {ours.fill / reference.fill:.4f}")


if __name__ == "__main__":
    main()
