"""Benchmark the sample pipeline and the annotation index (runs in well under 2 minutes).

    (a) samples/s of DatasetSource.load on generated images, one process (= one worker),
        against a floor measured in the same run: decode + tile + normalise only.
    (b) 1M-line annotation: index build time, peak memory (tracemalloc) and random-access
        reads, against reading all lines into a Python list (the reference's way).
    (c) local paths are not slower for URLs: CPU time per AnnotationIndex.read and per
        DatasetSource.load of this tree beside a checkout from before URLs (--baseline-tree),
        alternating fresh processes; then the same data from moto's S3 server on 127.0.0.1
        (s3fs) for scale. Baseline: git archive ee2f6d2 | tar -x -C /tmp/base.

Run: .venv/bin/python bench/samples.py [--local-vs-remote (only c)] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
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
REMOTE_LINES = 20_000
"""Lines of (c)'s annotation."""
ROUNDS = 5
"""Fresh processes per tree in (c)."""
Figure = tuple[float, float, float]
"""Median, min and max CPU microseconds per item."""


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


def write_big_annotation(path: Path, num_lines: int = NUM_LINES) -> None:
    line = '{"id": %d, "image": "images/%08d.jpg", "conversations": [{"from": "human", "value": "<image>"}]}\n'  # noqa: E501
    with open(path, "w") as f:
        for start in range(0, num_lines, 100_000):
            stop = min(start + 100_000, num_lines)
            f.write("".join(line % (i, i) for i in range(start, stop)))


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


def _cpu_per_item(fn, items, repeats: int = 5) -> Figure:  # noqa: ANN001
    """Median, min and max over `repeats` runs of CPU microseconds per item of fn(item)."""
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        runs.append((time.process_time() - start) * 1e6 / len(items))
    return float(np.median(runs)), min(runs), max(runs)


@contextlib.contextmanager
def serve_directory(folder: Path, names: list[str]) -> Iterator[str]:
    """Upload folder/name for each of `names` to a moto S3 server on 127.0.0.1; yields the
    s3:// prefix. Clients find it as any s3fs user would: AWS_* variables."""
    from moto.server import ThreadedMotoServer  # dev dependency, as in the tests

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)  # fmt: skip
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bench")
        for name in names:
            fs.pipe_file(f"bench/{name}", (folder / name).read_bytes())
        yield "s3://bench"
    finally:
        server.stop()


def make_local_vs_remote_data(folder: Path) -> None:
    """The data of (c): the images dataset of (a) and a 20k-line annotation."""
    folder.mkdir(exist_ok=True)
    make_image_dataset(folder)
    write_big_annotation(folder / "big.jsonl", num_lines=REMOTE_LINES)


def _sources(folder: Path, root: object, annotation: object, big: object) -> tuple[Any, Any]:
    """(AnnotationIndex of `big`, DatasetSource of the images dataset) for (c)."""
    tokenizer = train_tiny_tokenizer(folder / "tok")
    add_internvl_tokens(tokenizer)
    facts = RunFacts.from_tokenizer(tokenizer, tile_size=TILE_SIZE, num_image_token=256,
                                    template="internvl2_5")  # fmt: skip
    config = SampleConfig(cache_dir=str(folder / "cache"), max_dynamic_patch=6)
    spec = DatasetSpec(name="img", dataset_index=0, root=root, annotation=annotation,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    return AnnotationIndex(big, folder / "cache"), DatasetSource(spec, config, facts, tokenizer)


def measure_reads(index: Any, source: Any, num_reads: int, repeats: int) -> dict[str, Figure]:
    """CPU us per AnnotationIndex.read and per DatasetSource.load."""
    picks = np.random.default_rng(1).integers(0, len(index), num_reads).tolist()
    return {
        "AnnotationIndex.read": _cpu_per_item(lambda i: index.read(i, 1 << 20), picks, repeats),
        "DatasetSource.load": _cpu_per_item(lambda i: source.load(i, 0, 0), range(NUM_RECORDS), 3),
    }


def local_figures(folder: Path) -> dict[str, Figure]:
    """(c)'s local-path figures with whatever vlpretrain is importable (any version)."""
    index, source = _sources(folder, folder, folder / "images.jsonl", folder / "big.jsonl")
    return measure_reads(index, source, REMOTE_LINES, 5)


def _local_in_tree(folder: Path, tree: Path) -> dict[str, Figure]:
    """local_figures of the vlpretrain in `tree`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--local-figures", str(folder)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {key: tuple(value) for key, value in json.loads(out.splitlines()[-1]).items()}


def bench_local_vs_remote(root: Path, baseline: Path | None) -> None:
    """(c); `baseline`: a checkout of vlpretrain before URLs (e.g. `git archive ee2f6d2`)."""
    from vlpretrain.data.remote import URL  # not in the baseline: imported here only

    folder = root / "remote_bench"
    make_local_vs_remote_data(folder)
    ours = Path(__file__).resolve().parents[1]
    trees = {"this tree": ours, **({"baseline": baseline} if baseline else {})}
    rounds: dict[str, list[dict[str, Figure]]] = {name: [] for name in trees}
    for _ in range(ROUNDS):  # alternate the trees, so that a neighbour's load hits both alike
        for name, tree in trees.items():
            rounds[name].append(_local_in_tree(folder, tree))
    print(f"(c) local paths, CPU us per record: median of {ROUNDS} fresh processes [min-max]"
          + (f", this tree / baseline {baseline}" if baseline else ""))  # fmt: skip
    for key in ("AnnotationIndex.read", "DatasetSource.load"):
        line = f"    {key:<22}"
        medians = {}
        for name in trees:
            values = [figures[key][0] for figures in rounds[name]]
            medians[name] = float(np.median(values))
            line += f" {name}: {medians[name]:9.1f} [{min(values):.1f}-{max(values):.1f}]"
        if baseline:
            line += f"  ratio {medians['this tree'] / medians['baseline']:.3f}"
        print(line)
    names = ["big.jsonl", "images.jsonl", *(f"img{k}.jpg" for k in range(len(SIZES)))]
    with serve_directory(folder, names) as url:
        index, source = _sources(folder, URL(url), URL(f"{url}/images.jsonl"), f"{url}/big.jsonl")
        remote = measure_reads(index, source, 200, 3)
    local = rounds["this tree"][0]
    print("    the same from s3:// (moto on 127.0.0.1; its server threads count in this CPU time):")
    for key, figure in remote.items():
        print(f"    {key:<22} {figure[0]:9.1f} [{figure[1]:.1f}-{figure[2]:.1f}], "
              f"{figure[0] / local[key][0]:.1f}x the local path")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local-vs-remote", action="store_true", help="run only (c)")
    parser.add_argument("--baseline-tree", type=Path, help="(c): vlpretrain before URLs")
    parser.add_argument("--local-figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_figures:  # one process of (c), possibly with another vlpretrain
        print(json.dumps(local_figures(args.local_figures)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.local_vs_remote:
            bench_pipeline(root)
            bench_index(root)
        bench_local_vs_remote(root, args.baseline_tree)


if __name__ == "__main__":
    main()
