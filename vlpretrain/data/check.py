"""`vlpretrain data check` and `vlpretrain data show`: validate and inspect training data.

    meta.json --build_sources (worst case)--> [DatasetSource] --pool of workers--> per-line
    stats (+ the run's pack budget) --> counts, token/tile histograms, skips with file:line
    --> exit code of the run's skip policy (data.skips.SkipPolicy, every record seen)

`check` reads every distinct annotation line once (repeat_time is not applied) with the run's
settings (cli.py resolves them from the run's TOML or flags) and exits non-zero when the
skipped fraction exceeds max_skip_fraction. Randomness is taken at its worst: every video is
checked with max_num_frame frames, so a record whose random frame count can exceed
max_seq_length is reported (image tiles do not depend on randomness). `show` renders one
sample: supervised spans in <<...>> quotes, image spans collapsed to
<img><IMG_CONTEXT>x256*5</img>. This is the only data module that prints; its command line is
in cli.py.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from vlpretrain.data import media, tiling
from vlpretrain.data.build import DatasetSource, SampleConfig, build_sources, record_byte_limit
from vlpretrain.data.loader import exceeds_budget
from vlpretrain.data.packing import PackingConfig, PackItem, PieceRef, fit_to_budget
from vlpretrain.data.records import RecordError, parse_record
from vlpretrain.data.samples import IGNORE_INDEX, SkippedSample, TokenizedSample
from vlpretrain.data.skips import SkipPolicy, SkipTally
from vlpretrain.facts import RunFacts
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START, add_internvl_tokens

CHUNK_LINES = 256
LineStat = tuple[int, int, int] | SkippedSample
"""(dataset_index, num_tokens, num_tiles) of a good line, or the skip."""

_WORKER_SOURCES: list[DatasetSource] = []
_WORKER_PACKING: PackingConfig | None = None


def load_tokenizer(path: str) -> Any:
    """HF tokenizer from a local directory, with the InternVL tokens added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    add_internvl_tokens(tokenizer)
    return tokenizer


def _init_worker(sources: list[DatasetSource], packing: PackingConfig | None) -> None:
    global _WORKER_SOURCES, _WORKER_PACKING
    _WORKER_SOURCES, _WORKER_PACKING = sources, packing


def check_line(
    source: DatasetSource, line: int, packing: PackingConfig | None
) -> TokenizedSample | SkippedSample:
    """The sample of one line as training builds it, skipped as training would skip it."""
    sample = source.load_line(line, np.random.default_rng((0, 0, source.dataset_index, line)))
    if packing is None or isinstance(sample, SkippedSample):
        return sample
    item = PackItem(PieceRef.whole(sample, line, 0), sample)
    if fit_to_budget(item, packing, source.facts) is None:
        return exceeds_budget(sample, packing)
    return sample


def _check_chunk(task: tuple[int, int, int]) -> list[LineStat]:
    dataset_index, start, stop = task
    source = _WORKER_SOURCES[dataset_index]
    out: list[LineStat] = []
    for line in range(start, stop):
        sample = check_line(source, line, _WORKER_PACKING)
        if isinstance(sample, SkippedSample):
            out.append(sample)
        else:
            out.append((dataset_index, sample.num_tokens, sample.num_tiles))
    return out


def _tasks(sources: list[DatasetSource]) -> list[tuple[int, int, int]]:
    return [
        (i, start, min(start + CHUNK_LINES, src.num_lines))
        for i, src in enumerate(sources)
        for start in range(0, src.num_lines, CHUNK_LINES)
    ]


def _run_chunks(
    sources: list[DatasetSource], workers: int, packing: PackingConfig | None
) -> Iterator[list[LineStat]]:
    tasks = _tasks(sources)
    if workers <= 1:
        _init_worker(sources, packing)
        yield from map(_check_chunk, tasks)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(sources, packing)) as pool:
        yield from pool.imap_unordered(_check_chunk, tasks)


def text_histogram(values: list[int], title: str, width: int = 40) -> str:
    """Power-of-two buckets with a bar per bucket."""
    if not values:
        return f"{title}: (none)"
    buckets = Counter(0 if v <= 0 else int(v).bit_length() for v in values)
    peak = max(buckets.values())
    lines = [f"{title}: min {min(values)}, mean {np.mean(values):.1f}, max {max(values)}"]
    for b in sorted(buckets):
        low, high = (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)
        bar = "#" * max(1, round(width * buckets[b] / peak))
        lines.append(f"  {low:>7}-{high:<7} {buckets[b]:>8} {bar}")
    return "\n".join(lines)


def image_facts(
    tokenizer: Any, tile_size: int = 448, num_image_token: int = 256, template: str = "internvl2_5"
) -> RunFacts:
    """RunFacts for checking data without a model: the image layout given, ids from `tokenizer`
    (with a model, `model.build.read_run_facts` gives the model's own)."""
    return RunFacts.from_tokenizer(
        tokenizer, tile_size=tile_size, num_image_token=num_image_token, template=template
    )


def worst_case(config: SampleConfig) -> SampleConfig:
    """`config` with every random choice at its largest: max_num_frame frames per video."""
    return replace(config, min_num_frame=config.max_num_frame)


def run_check(
    meta: str,
    tokenizer_dir: str,
    config: SampleConfig,
    facts: RunFacts | None = None,
    workers: int = 1,
    *,
    packing: PackingConfig | None = None,
    list_all: bool = False,
) -> int:
    """Validate every record (worst case, pack budget of `packing` if given); print the report;
    return the process exit code. `facts` None: image_facts() of the tokenizer (448-px tiles,
    256 tokens per tile, internvl2_5). `list_all`: every skipped record, not 3 per reason."""
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        sources = build_sources(
            meta, worst_case(config), facts or image_facts(tokenizer), tokenizer
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counter = SkipTally([s.name for s in sources])
    skipped: list[SkippedSample] = []
    tokens: dict[int, list[int]] = {s.dataset_index: [] for s in sources}
    tiles: dict[int, list[int]] = {s.dataset_index: [] for s in sources}
    total = sum(s.num_lines for s in sources)
    with tqdm(total=total, desc="checking", unit="rec", file=sys.stderr) as bar:
        for chunk in _run_chunks(sources, workers, packing):
            for stat in chunk:
                if isinstance(stat, SkippedSample):
                    counter.seen[stat.source.dataset] += 1
                    counter.add_skip(stat.source.dataset, stat.reason, str(stat), log=False)
                    skipped.append(stat)
                else:
                    counter.seen[counter.name(stat[0])] += 1
                    tokens[stat[0]].append(stat[1])
                    tiles[stat[0]].append(stat[2])
            bar.update(len(chunk))
    print(f"checked in the worst case: videos with max_num_frame = {config.max_num_frame} "
          f"frames, max_seq_length {config.max_seq_length}"
          + (f", rows of {packing.max_packed_tokens} tokens / {packing.num_images_expected} "
             "tiles" if packing else ""))  # fmt: skip
    for s in sources:
        i = s.dataset_index
        print(f"\n== {s.name}: {s.num_lines} lines, effective length {len(s)}, "
              f"{len(tokens[i])} ok, {counter.seen[s.name] - len(tokens[i])} skipped")  # fmt: skip
        print(text_histogram(tokens[i], "tokens per sample"))
        print(text_histogram(tiles[i], "tiles per sample"))
    print("\n" + counter.summary())
    if list_all and skipped:
        print(f"\nall {len(skipped)} skipped records:")
        for sample in sorted(skipped, key=lambda s: (s.source.path, s.source.line)):
            print(f"  {sample}")
    # the run's policy, with every record seen (no minimum number of records)
    policy = SkipPolicy(config.max_skip_fraction, min_records=0)
    ok = not policy.exceeded(counter.num_skipped, counter.num_seen)
    fraction = counter.num_skipped / counter.num_seen if counter.num_seen else 0.0
    verdict = "OK" if ok else "FAIL"
    print(f"{verdict}: skip fraction {fraction:.2%} (max {config.max_skip_fraction:.2%})")
    return 0 if ok else 1


def render_sample(sample: TokenizedSample, tokenizer: Any, num_image_token: int) -> str:
    """Decoded text; supervised spans in <<...>> (as guillemets), image spans collapsed."""
    ids, trained = sample.input_ids.tolist(), (sample.labels != IGNORE_INDEX).tolist()
    start, ctx, end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_CONTEXT, IMG_END])
    out, k = [], 0
    while k < len(ids):
        if ids[k] == start:
            stop = ids.index(end, k) if end in ids[k:] else len(ids) - 1
            n = sum(1 for t in ids[k:stop] if t == ctx)
            per_tile = n % num_image_token == 0
            count = f"{num_image_token}\u00b7{n // num_image_token}" if per_tile else str(n)
            out.append(f"{IMG_START}{IMG_CONTEXT}\u00d7{count}{IMG_END}")
            k = stop + 1
            continue
        j = k
        while j < len(ids) and trained[j] == trained[k] and ids[j] != start:
            j += 1
        text = tokenizer.decode(ids[k:j])
        out.append(f"\u00ab{text}\u00bb" if trained[k] else text)
        k = j
    return "".join(out)


def describe_media(source: DatasetSource, line_index: int) -> list[str]:
    """One line per image: path, size and the tile grid the builder chooses."""
    try:
        line = source.index.read(line_index, record_byte_limit(source.config))
        record = parse_record(line, source.spec.root)
    except RecordError:
        return []
    cfg = source.config
    max_num = source.spec.max_dynamic_patch or cfg.max_dynamic_patch
    if record.kind == "multi_image":
        max_num = tiling.image_tile_budget(max_num, len(record.images))
    lines = []
    for k, path in enumerate(record.images):
        try:
            width, height = media.image_size(path, source.remote)
        except (OSError, RecordError):
            lines.append(f"image {k + 1}: {path} (unreadable)")
            continue
        grids = tiling.candidate_grids(min(cfg.min_dynamic_patch, max_num), max_num)
        cols, rows = tiling.closest_grid(width, height, grids, source.facts.tile_size)
        thumb = " + thumbnail" if cfg.use_thumbnail and cols * rows > 1 else ""
        grid = f"grid {cols}x{rows}{thumb}" if cfg.dynamic_image_size else "1 tile"
        lines.append(f"image {k + 1}: {path} {width}x{height} -> {grid}")
    if record.video is not None:
        lines.append(f"video: {record.video} clip={record.clip}")
    return lines


def run_show(
    meta: str, tokenizer_dir: str, config: SampleConfig, index: int, dataset: str | None,
    seed: int = 0, facts: RunFacts | None = None,
) -> int:  # fmt: skip
    """Print one rendered sample; returns the exit code (`facts` as in run_check)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    facts = facts or image_facts(tokenizer)
    sources = build_sources(meta, config, facts, tokenizer)
    names = [s.name for s in sources]
    if dataset is not None and dataset not in names:
        print(f"error: no dataset {dataset!r}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    source = sources[names.index(dataset)] if dataset else sources[0]
    if not 0 <= index < len(source):
        print(f"error: --index {index} out of range [0, {len(source)})", file=sys.stderr)
        return 2
    line = source.line_of(index, epoch=0, seed=seed)
    sample = source.load(index, epoch=0, seed=seed)
    print(f"{source.source_of(line)}")
    for text in describe_media(source, line):
        print("  " + text)
    if isinstance(sample, SkippedSample):
        print(f"SKIPPED ({sample.reason}): {sample.detail}")
        return 1
    print(f"tokens {sample.num_tokens}, supervised {sample.num_supervised}, "
          f"tiles {sample.num_tiles} {list(sample.num_tiles_per_image)}")  # fmt: skip
    print(render_sample(sample, tokenizer, facts.num_image_token))
    return 0
