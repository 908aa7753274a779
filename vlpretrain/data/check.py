"""`vlpretrain data check` and `vlpretrain data show`: validate and inspect training data.

    meta.json --build_sources (worst case)--> [DatasetSource] --pool of workers--> per-line
    stats (+ the run's pack budget) --> counts, token/tile histograms, skips with file:line
    --> x repeat_time --> exit code of the run's skip policy over one epoch (data.skips)

`check` reads every distinct annotation line once with the run's settings (cli.py resolves
them from the run's TOML or flags, and refuses the config as `train` does), counts each line
as often as the first epoch reads it (repeat_time), refuses data that training would refuse
at start (a dataset with no record, a loader stream with none) and applies the run's skip
policy (data.skips.SkipPolicy, with its minimum number of records) to that epoch.
Randomness is taken at its worst: every video is checked with max_num_frame frames, so a
record whose random frame count can exceed max_seq_length is reported (image tiles do not
depend on randomness). `show` renders one sample: supervised spans in <<...>> quotes, image
spans collapsed to <img><IMG_CONTEXT>x256*5</img>. This is the only data module that prints;
its command line is in cli.py.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from vlpretrain.data import media, sharding, tiling
from vlpretrain.data.build import DatasetSource, SampleConfig, build_sources, record_byte_limit
from vlpretrain.data.loader import StreamConfig, exceeds_budget
from vlpretrain.data.mixing import DatasetMixer
from vlpretrain.data.packing import PackingConfig, PackItem, PieceRef, fit_to_budget
from vlpretrain.data.records import RecordError, parse_record
from vlpretrain.data.samples import IGNORE_INDEX, SkippedSample, TokenizedSample
from vlpretrain.data.skips import SkipPolicy, SkipTally
from vlpretrain.facts import RunFacts
from vlpretrain.tokens import IMG_CONTEXT, IMG_END, IMG_START, add_internvl_tokens

CHUNK_LINES = 256
LineStat = tuple[int, int, int] | SkippedSample
"""(dataset_index, num_tokens, num_tiles) of a good line, or the skip."""
IndexedStat = tuple[int, LineStat]
"""(line index in the annotation index, its LineStat)."""

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


def _check_chunk(task: tuple[int, int, int]) -> list[IndexedStat]:
    dataset_index, start, stop = task
    source = _WORKER_SOURCES[dataset_index]
    out: list[IndexedStat] = []
    for line in range(start, stop):
        sample = check_line(source, line, _WORKER_PACKING)
        if isinstance(sample, SkippedSample):
            out.append((line, sample))
        else:
            out.append((line, (dataset_index, sample.num_tokens, sample.num_tiles)))
    return out


def _tasks(sources: list[DatasetSource]) -> list[tuple[int, int, int]]:
    return [
        (i, start, min(start + CHUNK_LINES, src.num_lines))
        for i, src in enumerate(sources)
        for start in range(0, src.num_lines, CHUNK_LINES)
    ]


def _run_chunks(
    sources: list[DatasetSource], workers: int, packing: PackingConfig | None
) -> Iterator[list[IndexedStat]]:
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


def epoch_multiplicity(source: DatasetSource, seed: int) -> np.ndarray:
    """How often each line is read in the first epoch: int(repeat_time) full copies, plus one
    for the lines of the fractional subset (drawn with the run's stream.seed)."""
    repeat_time = source.spec.repeat_time
    counts = np.full(source.num_lines, int(repeat_time), dtype=np.int64)
    for record_index in range(int(repeat_time) * source.num_lines, len(source)):
        counts[source.line_of(record_index, epoch=0, seed=seed)] += 1
    return counts


def check_stream_shares(
    sources: list[DatasetSource], stream: StreamConfig, world_size: int
) -> None:
    """Raise the ValueError training raises when a loader stream would get no record.

    The records of an epoch are dealt over world_size x workers streams; the last stream gets
    the fewest, so building its mixer (as the loader does) finds the problem for all.
    """
    num_streams = sharding.stream_count(world_size, stream.num_workers)
    DatasetMixer(
        [len(s) for s in sources],
        [s.dataset_index for s in sources],
        seed=stream.seed,
        stream_id=num_streams - 1,
        num_streams=num_streams,
        use_data_resampling=stream.use_data_resampling,
        replacement=stream.replacement,
        num_epochs=stream.num_epochs,
    )


@dataclass
class CheckTally:
    """What the check saw: per-dataset token and tile counts of good lines, skipped lines."""

    counter: SkipTally
    skipped: list[SkippedSample] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    tiles: dict[int, list[int]] = field(default_factory=dict)
    skipped_lines: dict[int, list[int]] = field(default_factory=dict)

    def add(self, line: int, stat: LineStat, dataset_index: int) -> None:
        if isinstance(stat, SkippedSample):
            self.counter.seen[stat.source.dataset] += 1
            self.counter.add_skip(stat.source.dataset, stat.reason, str(stat), log=False)
            self.skipped.append(stat)
            self.skipped_lines.setdefault(dataset_index, []).append(line)
        else:
            self.counter.seen[self.counter.name(stat[0])] += 1
            self.tokens.setdefault(stat[0], []).append(stat[1])
            self.tiles.setdefault(stat[0], []).append(stat[2])


def _tally(sources: list[DatasetSource], workers: int, packing: PackingConfig | None) -> CheckTally:
    tally = CheckTally(SkipTally([s.name for s in sources]))
    by_name = {s.name: s.dataset_index for s in sources}
    with tqdm(total=sum(s.num_lines for s in sources), desc="checking", unit="rec",
              file=sys.stderr) as bar:  # fmt: skip
        for chunk in _run_chunks(sources, workers, packing):
            for line, stat in chunk:
                index = by_name[stat.source.dataset] if isinstance(stat, SkippedSample) else stat[0]
                tally.add(line, stat, index)
            bar.update(len(chunk))
    return tally


def epoch_skips(sources: list[DatasetSource], tally: CheckTally, seed: int) -> tuple[int, int]:
    """(skipped records, records) of the first epoch: each line counted as often as it is read."""
    num_skipped = 0
    for source in sources:
        lines = tally.skipped_lines.get(source.dataset_index, [])
        if lines:
            num_skipped += int(epoch_multiplicity(source, seed)[lines].sum())
    return num_skipped, sum(len(s) for s in sources)


def run_check(
    meta: str,
    tokenizer_dir: str,
    config: SampleConfig,
    facts: RunFacts | None = None,
    workers: int = 1,
    *,
    packing: PackingConfig | None = None,
    stream: StreamConfig | None = None,
    world_size: int = 1,
    list_all: bool = False,
) -> int:
    """Validate every record (worst case, pack budget of `packing` if given); print the report;
    return the process exit code: 2 when training would refuse the data at start, 1 when the
    run's skip policy fails the first epoch, else 0. `facts` None: image_facts() of the
    tokenizer (448-px tiles, 256 tokens per tile, internvl2_5). `stream`, `world_size`: how
    the run deals records (default StreamConfig(), one rank). `list_all`: every skipped
    record, not 3 per reason."""
    stream = stream or StreamConfig()
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        sources = build_sources(
            meta, worst_case(config), facts or image_facts(tokenizer), tokenizer
        )
        check_stream_shares(sources, stream, world_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tally = _tally(sources, workers, packing)
    print(f"checked in the worst case: videos with max_num_frame = {config.max_num_frame} "
          f"frames, max_seq_length {config.max_seq_length}"
          + (f", rows of {packing.max_packed_tokens} tokens / {packing.num_images_expected} "
             "tiles" if packing else ""))  # fmt: skip
    for s in sources:
        i, num_ok = s.dataset_index, len(tally.tokens.get(s.dataset_index, []))
        print(f"\n== {s.name}: {s.num_lines} lines, effective length {len(s)}, "
              f"{num_ok} ok, {tally.counter.seen[s.name] - num_ok} skipped")  # fmt: skip
        print(s.describe_tile_budget())
        print(text_histogram(tally.tokens.get(i, []), "tokens per sample"))
        print(text_histogram(tally.tiles.get(i, []), "tiles per sample"))
    print("\n" + tally.counter.summary())
    if list_all and tally.skipped:
        print(f"\nall {len(tally.skipped)} skipped records:")
        for sample in sorted(tally.skipped, key=lambda s: (s.source.path, s.source.line)):
            print(f"  {sample}")
    num_skipped, num_records = epoch_skips(sources, tally, stream.seed)
    print(f"epoch: {num_records} records after repeat_time, {num_skipped} of them skipped")
    # the run's own policy (data.skips), over the records of one epoch
    passes, verdict = SkipPolicy(config.max_skip_fraction).judge(
        num_skipped, num_records, f"an epoch of {num_records} records"
    )
    print(verdict)
    return 0 if passes else 1


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
        record = parse_record(line, source.root)
    except RecordError:
        return []
    cfg = source.config
    max_num = source.max_patches()
    if record.kind == "multi_image":
        max_num = tiling.image_tile_budget(max_num, len(record.images))
    lines = []
    for k, path in enumerate(record.images):
        try:
            width, height = media.image_size(path)
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
