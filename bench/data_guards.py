"""Benchmark the data guards: CPU time and peak memory to dispose of two hostile records.

    (a) a 10 MB single-line record: the reference's way (json.loads + tokenise everything,
        then truncate to max_seq_length) against DatasetSource.load (refused by the byte cap
        before parsing);
    (b) a 12000x12000 PNG of about 140 KB: the reference's way (decode, convert to RGB, tile
        with max_dynamic_patch 12 at 448 px) against DatasetSource.load (refused from the PNG
        header by the pixel cap).

Each case runs REPEATS times, each in a fresh process (so that peak RSS is the case's own);
medians with [min, max] ranges of CPU seconds (user + sys) of the work itself (tokenizer and
index set-up excluded) and of the process's peak RSS (set-up included) are printed side by
side. The tokenizer is the tiny byte-level BPE of the demo (a real 151k-vocabulary tokenizer
is slower still).

Run: .venv/bin/python bench/data_guards.py
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from vlpretrain.data import tiling
from vlpretrain.data.build import DatasetSource, SampleConfig
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.facts import RunFacts
from vlpretrain.testing.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import add_internvl_tokens

REPEATS = 3
LINE_BYTES = 10_000_000
SIDE = 12_000
MAX_SEQ_LENGTH = 8192


def make_assets(root: Path) -> None:
    train_tiny_tokenizer(root / "tok")
    words = "a red circle next to a blue square on a white background ".split()
    text = " ".join(words[i % len(words)] for i in range(LINE_BYTES // 5))[:LINE_BYTES]
    turns = [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]
    (root / "long.jsonl").write_text(json.dumps({"conversations": turns}) + "\n")
    Image.new("L", (SIDE, SIDE), 0).save(root / "huge.png", optimize=True)
    image_turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    (root / "huge.jsonl").write_text(
        json.dumps({"image": "huge.png", "conversations": image_turns})
    )


def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tok"))
    add_internvl_tokens(tokenizer)
    return tokenizer


def _source(root: Path, annotation: str) -> DatasetSource:
    spec = DatasetSpec(name=annotation, dataset_index=0, root=root, annotation=root / annotation,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    config = SampleConfig(max_seq_length=MAX_SEQ_LENGTH, cache_dir=str(root / "cache"))
    tokenizer = _tokenizer(root)
    facts = RunFacts.from_tokenizer(tokenizer, tile_size=448, num_image_token=256,
                                    template="internvl2_5")  # fmt: skip
    return DatasetSource(spec, config, facts, tokenizer)


def reference_long_line(root: Path) -> Callable[[], str]:
    line = (root / "long.jsonl").read_text()
    tokenizer = _tokenizer(root)

    def work() -> str:
        turns = json.loads(line)["conversations"]
        ids = tokenizer([t["value"] for t in turns], add_special_tokens=False).input_ids
        kept = [token for part in ids for token in part][:MAX_SEQ_LENGTH]
        return f"{len(kept)} tokens kept"

    return work


def guarded_long_line(root: Path) -> Callable[[], str]:
    source = _source(root, "long.jsonl")
    return lambda: f"{getattr(source.load(0, 0, 0), 'reason', 'built')}"


def reference_huge_png(root: Path) -> Callable[[], str]:
    def work() -> str:
        with Image.open(root / "huge.png") as image:
            image.load()
            rgb = image.convert("RGB")
        tiles = tiling.make_tiles(
            rgb,
            dynamic=True,
            min_num=1,
            max_num=12,
            tile_size=448,
            use_thumbnail=True,
            pad2square=False,
            normalize_type="imagenet",
            augment_rng=None,
        )
        return f"{len(tiles)} tiles"

    return work


def guarded_huge_png(root: Path) -> Callable[[], str]:
    source = _source(root, "huge.jsonl")
    return lambda: f"{getattr(source.load(0, 0, 0), 'reason', 'built')}"


def _run_case(name: str, root: str, queue: Any) -> None:
    work = CASES[name](Path(root))  # set-up (tokenizer, index) is not measured
    before = resource.getrusage(resource.RUSAGE_SELF)
    outcome = work()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    queue.put((cpu, after.ru_maxrss / 1024, outcome))


CASES = {
    "reference_long_line": reference_long_line,
    "guarded_long_line": guarded_long_line,
    "reference_huge_png": reference_huge_png,
    "guarded_huge_png": guarded_huge_png,
}


def measure(name: str, root: Path) -> tuple[list[float], list[float], str]:
    context = multiprocessing.get_context("spawn")
    cpus, peaks, outcome = [], [], ""
    for _ in range(REPEATS):
        queue = context.Queue()
        process = context.Process(target=_run_case, args=(name, str(root), queue))
        process.start()
        cpu, peak, outcome = queue.get()
        process.join()
        cpus.append(cpu)
        peaks.append(peak)
    return cpus, peaks, outcome


def _median_range(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):8.2f} {unit} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root)
        print(f"{REPEATS} fresh processes per case; CPU s = user + sys of the case (model-free)")
        print(f"{'case':<22} {'CPU s (median [range])':<28} {'peak RSS MiB':<28} outcome")
        for name in CASES:
            cpus, peaks, outcome = measure(name, root)
            print(f"{name:<22} {_median_range(cpus, 's'):<28} "
                  f"{_median_range(peaks, 'MiB'):<28} {outcome}")  # fmt: skip


if __name__ == "__main__":
    main()
