"""Local paths stay fast beside object storage: CPU time per record, side by side.

    (1) AnnotationIndex.read (20k random records of a 20k-line file) and DatasetSource.load
        (40 JPEG records, up to 6 tiles) on local paths, with this tree's vlpretrain beside a
        checkout from before URLs existed (--baseline-tree), alternating fresh processes so
        that a neighbour's load hits both alike; median [min-max] over ROUNDS processes.
    (2) The same data served by moto's S3 server on 127.0.0.1 (s3fs as the client), for scale.
        moto runs in this process, so its server threads count in this CPU time.

Run: .venv/bin/python bench/remote_reads.py [--baseline-tree DIR]
     baseline: git worktree add /tmp/base REVISION (the version to compare against)
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from vlpretrain.data.build import DatasetSource, SampleConfig
from vlpretrain.data.index import AnnotationIndex
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.facts import RunFacts
from vlpretrain.testing.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import add_internvl_tokens

SIZES = [(640, 480), (1280, 720), (448, 448), (896, 448), (300, 500)]
NUM_RECORDS = 40
NUM_LINES = 20_000
ROUNDS = 5
"""Fresh processes per tree."""
Figure = tuple[float, float, float]
"""Median, min and max CPU microseconds per item."""


def write_data(folder: Path) -> list[str]:
    """JPEGs, their annotation (images.jsonl) and a NUM_LINES-line big.jsonl; the file names."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k, size in enumerate(SIZES):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k}.jpg", quality=90)
        names.append(f"img{k}.jpg")
    turns = [{"from": "human", "value": "Describe the picture."},
             {"from": "gpt", "value": "a red circle and a blue square"}]  # fmt: skip
    records = [{"image": f"img{i % len(SIZES)}.jpg", "conversations": turns}
               for i in range(NUM_RECORDS)]  # fmt: skip
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    line = '{"id": %d, "image": "images/%08d.jpg", "conversations": [{"from": "human", "value": "<image>"}]}\n'  # noqa: E501
    (folder / "big.jsonl").write_text("".join(line % (i, i) for i in range(NUM_LINES)))
    return [*names, "images.jsonl", "big.jsonl"]


def cpu_per_item(fn: Callable[[Any], object], items: Iterable[Any], repeats: int) -> Figure:
    """Median, min and max over `repeats` passes of CPU microseconds per item of fn(item)."""
    items = list(items)
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        runs.append((time.process_time() - start) * 1e6 / len(items))
    return float(np.median(runs)), min(runs), max(runs)


def measure(folder: Path, root: Any, annotation: Any, big: Any, reads: int) -> dict[str, Figure]:
    """CPU us per AnnotationIndex.read of `big` and per DatasetSource.load of `annotation`."""
    tokenizer = train_tiny_tokenizer(folder / "tok")
    add_internvl_tokens(tokenizer)
    facts = RunFacts.from_tokenizer(tokenizer, tile_size=448, num_image_token=256,
                                    template="internvl2_5")  # fmt: skip
    config = SampleConfig(cache_dir=str(folder / "cache"), max_dynamic_patch=6)
    spec = DatasetSpec(name="img", dataset_index=0, root=root, annotation=annotation,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    index = AnnotationIndex(big, folder / "cache")
    source = DatasetSource(spec, config, facts, tokenizer)
    source.load(0, 0, 0)  # warm-up
    picks = np.random.default_rng(1).integers(0, len(index), reads).tolist()
    return {
        "AnnotationIndex.read": cpu_per_item(lambda i: index.read(i, 1 << 20), picks, 5),
        "DatasetSource.load": cpu_per_item(lambda i: source.load(i, 0, 0), range(NUM_RECORDS), 3),
    }


def local_figures_in(folder: Path, tree: Path) -> dict[str, Figure]:
    """The local-path figures of the vlpretrain in `tree`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--local-figures", str(folder)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {key: tuple(value) for key, value in json.loads(out.splitlines()[-1]).items()}


@contextlib.contextmanager
def serve_directory(folder: Path, names: list[str]) -> Iterator[str]:
    """Upload folder/name for each of `names` to a moto S3 server on 127.0.0.1; yields the
    s3:// prefix. Clients find it as any s3fs user would: through AWS_* variables."""
    from moto.server import ThreadedMotoServer  # a dev dependency, as for the tests

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-tree", type=Path, help="a checkout from before URLs")
    parser.add_argument("--local-figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_figures:  # one fresh process of (1), with the vlpretrain of PYTHONPATH
        folder = args.local_figures
        figures = measure(folder, folder, folder / "images.jsonl", folder / "big.jsonl", NUM_LINES)
        print(json.dumps(figures))
        return
    from vlpretrain.data.location import Location  # not in the baseline tree

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        names = write_data(folder)
        trees = {"this tree": Path(__file__).resolve().parents[1]}
        if args.baseline_tree:
            trees["baseline"] = args.baseline_tree.resolve()
        rounds: dict[str, list[dict[str, Figure]]] = {name: [] for name in trees}
        for _ in range(ROUNDS):
            for name, tree in trees.items():
                rounds[name].append(local_figures_in(folder, tree))
        print(f"(1) local paths, CPU us per record, median [min-max] of {ROUNDS} processes:")
        medians: dict[str, dict[str, float]] = {name: {} for name in trees}
        for key in ("AnnotationIndex.read", "DatasetSource.load"):
            line = f"    {key:<21}"
            for name in trees:
                values = [figures[key][0] for figures in rounds[name]]
                medians[name][key] = float(np.median(values))
                line += f" {name} {medians[name][key]:9.1f} [{min(values):.1f}-{max(values):.1f}]"
            if args.baseline_tree:
                ratio = medians["this tree"][key] / medians["baseline"][key]
                line += f"  ratio {ratio:.3f} (this tree / baseline)"
            print(line)
        with serve_directory(folder, names) as url:
            root, annotation = Location.parse(url), Location.parse(f"{url}/images.jsonl")
            remote = measure(folder, root, annotation, f"{url}/big.jsonl", 200)
        print("(2) the same from s3:// (moto on 127.0.0.1, in this process):")
        for key, (median, low, high) in remote.items():
            local = medians["this tree"][key]
            print(
                f"    {key:<21} {median:9.1f} [{low:.1f}-{high:.1f}], {median / local:.1f}x local"
            )


if __name__ == "__main__":
    main()
