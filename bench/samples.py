"""Benchmark the sample pipeline and the annotation index (runs in well under 2 minutes).

    (a) samples/s of DatasetSource.load on generated images, one process (= one worker),
        against a floor measured in the same run: decode + tile + normalise only.
    (b) 1M-line annotation: index build time, peak memory (tracemalloc) and random-access
        reads, against reading all lines into a Python list (the reference's way).

Run: .venv/bin/python bench/samples.py
"""

from __future__ import annotations

import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.data import tiling
from vlpretrain.data.build import DatasetSource, SampleConfig
from vlpretrain.data.index import AnnotationIndex
from vlpretrain.data.media import load_image
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.demo.tokenizer import train_tiny_tokenizer
from vlpretrain.facts import RunFacts
from vlpretrain.tokens import add_internvl_tokens

TILE_SIZE = 448
SIZES = [(640, 480), (1280, 720), (448, 448), (896, 448), (300, 500)]
NUM_RECORDS = 40
NUM_LINES = 1_000_000
NUM_READS = 20_000


def make_image_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, size in enumerate(SIZES):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{k}.jpg", quality=90)
    turns = [{"from": "human", "value": "Describe the picture."},
             {"from": "gpt", "value": "a red circle and a blue square"}]  # fmt: skip
    ann = root / "images.jsonl"
    with open(ann, "w") as f:
        for i in range(NUM_RECORDS):
            record = {"image": f"img{i % len(SIZES)}.jpg", "conversations": turns}
            f.write(json.dumps(record) + "\n")
    return ann


def bench_pipeline(root: Path) -> None:
    tokenizer = train_tiny_tokenizer(root / "tok")
    add_internvl_tokens(tokenizer)
    ann = make_image_dataset(root)
    config = SampleConfig(cache_dir=str(root / "cache"), max_dynamic_patch=6)
    facts = RunFacts.from_tokenizer(
        tokenizer, tile_size=TILE_SIZE, num_image_token=256, template="internvl2_5"
    )
    print(f"(a) sample pipeline, 1 worker, {NUM_RECORDS} records, sizes {SIZES}, max 6 tiles")
    floor_rate = None
    for augment in (False, True):
        spec = DatasetSpec(name="img", dataset_index=0, root=root, annotation=ann,
                           repeat_time=1.0, data_augment=augment)  # fmt: skip
        source = DatasetSource(spec, config, facts, tokenizer)
        source.load(0, 0, 0)  # warm-up
        start = time.perf_counter()
        tiles = sum(source.load(i, 0, 0).num_tiles for i in range(NUM_RECORDS))
        rate = NUM_RECORDS / (time.perf_counter() - start)
        if floor_rate is None:
            floor_rate = _floor_rate(root, config)
            print(f"    floor (decode+tile+normalise only): {floor_rate:7.1f} samples/s")
        print(f"    data_augment={augment!s:5}: {rate:7.1f} samples/s, {tiles / NUM_RECORDS:.1f} "
              f"tiles/sample, ratio to floor {rate / floor_rate:.2f}")  # fmt: skip


def _floor_rate(root: Path, config: SampleConfig) -> float:
    start = time.perf_counter()
    for i in range(NUM_RECORDS):
        image = load_image(root / f"img{i % len(SIZES)}.jpg")
        tiles = tiling.dynamic_tiles(image, 1, 6, TILE_SIZE, True)
        tiling.normalize(tiles, "imagenet", TILE_SIZE)
    return NUM_RECORDS / (time.perf_counter() - start)


def write_big_annotation(path: Path) -> None:
    line = '{"id": %d, "image": "images/%08d.jpg", "conversations": [{"from": "human", "value": "<image>"}]}\n'  # noqa: E501
    with open(path, "w") as f:
        for start in range(0, NUM_LINES, 100_000):
            f.write("".join(line % (i, i) for i in range(start, start + 100_000)))


def measure(fn):  # noqa: ANN001, ANN201 - tiny local helper
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak


def bench_index(root: Path) -> None:
    path = root / "big.jsonl"
    write_big_annotation(path)
    size_mb = path.stat().st_size / 2**20
    print(f"(b) annotation of {NUM_LINES:,} lines ({size_mb:.0f} MiB)")
    index, t_build, m_build = measure(lambda: AnnotationIndex(path, root / "cache"))
    _, t_cached, _ = measure(lambda: AnnotationIndex(path, root / "cache"))
    lines, t_list, m_list = measure(lambda: open(path).readlines())
    picks = np.random.default_rng(0).integers(0, NUM_LINES, NUM_READS).tolist()
    start = time.perf_counter()
    for i in picks:
        json.loads(index.read(i))
    t_index_reads = time.perf_counter() - start
    start = time.perf_counter()
    for i in picks:
        json.loads(lines[i])
    t_list_reads = time.perf_counter() - start
    mib = 2**20
    print(f"    index build   : {t_build:6.2f} s, peak {m_build / mib:7.1f} MiB "
          f"(cached reload {t_cached * 1000:.1f} ms)")  # fmt: skip
    print(f"    list of lines : {t_list:6.2f} s, peak {m_list / mib:7.1f} MiB")
    print(f"    memory ratio list/index: {m_list / m_build:.1f} (peak of list / peak of index)")
    print(f"    build time ratio index/list: {t_build / t_list:.2f}")
    us = 1e6 / NUM_READS
    ratio = t_index_reads / t_list_reads
    print(f"    random access + json.loads: index {t_index_reads * us:.1f} us/record, "
          f"list {t_list_reads * us:.1f} us/record, ratio {ratio:.2f}")  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_pipeline(root)
        bench_index(root)


if __name__ == "__main__":
    main()
