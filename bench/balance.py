"""Benchmark: straggler ratio of a 512-rank job for four ways of filling the ranks' rows.

    per rank: its own stream of the packing benchmark's mixture (bench/packing.py)
      --> reference first-fit (one blank tile per pure-text sample)
      --> best-fit on tokens (vlpretrain.data.packing, balance_flops off)
      --> best-fit on tokens and FLOPs (balance_flops on, balance_queue_rows 0)
      --> the same rows released in the rank-synchronised cost order (balance_queue_rows 8
          or --queue-rows; data.balance.SyncedRelease.next_row, the training stream's loop)
    per step: each rank runs its next GA rows; cost = train.flops.FlopsCounter.step_flops of
    each row (ViT + projector + LLM with attention per packed sample + head, forward and the
    backward the stage's freeze policy implies), the same count the training loop logs.

Every rank waits for the slowest at the gradient reduction, so a step lasts as long as its
costliest rank. The figure is the job's straggler ratio, sum over the measured steps of the
max over ranks / sum of the mean over ranks of the step's FLOPs: wall time over useful work,
so (ratio - 1) / ratio of the job's compute idles. (The median over steps of each step's
max / mean is printed too; it flatters the synchronised order, whose cheap steps are cheap
for every rank.) The FLOPs counters are built from the published architecture sizes
(InternViT-300M + internlm2_5-7b for 8B, + Qwen2.5-0.5B for 1B) without building a model.
Steps are measured after `--warmup-rows` rows per rank (buffers filled, the FLOPs budget's
running mean settled); `--steps` 18 covers whole cycles of the release order (9 rows). The
first step of the streams is printed too. Each seed is a new set of rank streams; figures
are median [min, max] over seeds. Run: `.venv/bin/python bench/balance.py --jobs 3`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import (  # noqa: E402  (sibling benchmark module)
    FACTS,
    IMAGE_OVERHEAD,
    TEMPLATE_TOKENS,
    TOKENS_PER_TILE,
    reference_first_fit_rows,
    sample_shapes,
)

from vlpretrain.data.balance import (  # noqa: E402
    RowBalance,
    SyncedRelease,
    job_straggler_ratio,
    straggler_ratio,
)
from vlpretrain.data.packing import (  # noqa: E402
    BestFitPacker,
    PackingConfig,
    PackItem,
    PackRow,
    PieceRef,
)
from vlpretrain.data.samples import IGNORE_INDEX, SampleSource, TokenizedSample  # noqa: E402
from vlpretrain.train.flops import ComponentShape, FlopsCounter  # noqa: E402

MAX_TOKENS, MAX_TILES, MAX_BUFFER = 16384, 48, 20


@dataclass(frozen=True)
class Transformer:
    """Published sizes of a decoder or ViT (matmul weights only; embeddings excluded)."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    mlp_matrices: int
    """2 for a GELU MLP (fc1, fc2), 3 for a gated SiLU MLP (gate, up, down)."""

    @property
    def matmul_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return self.layers * (attention + self.mlp_matrices * self.hidden * self.intermediate)


INTERN_VIT_300M = Transformer(
    layers=24, hidden=1024, intermediate=4096, kv_dim=1024, mlp_matrices=2
)
LLMS = {
    "8B": (Transformer(32, 4096, 14336, 1024, 3), 92553),  # internlm2_5-7b-chat, GQA 8 kv heads
    "1B": (Transformer(24, 896, 4864, 128, 3), 151674),  # Qwen2.5-0.5B-Instruct, 2 kv heads
}
"""LLM sizes and the vocabulary of InternVL 2.5's LLM config (with the added image tokens)."""

STAGES = {"1": (False, False), "1.5": (True, False), "2": (True, True)}
"""Stage -> (ViT trains, LLM trains); the projector trains in every stage."""

ALL_SCENARIOS = (("8B", "1", 1), ("8B", "1.5", 2), ("8B", "2", 1), ("1B", "1", 1), ("1B", "2", 1))
"""(model, stage, gradient accumulation) of the reference's InternVL 2.5 stage scripts."""
SCENARIOS = (("8B", "1.5", 2), ("8B", "2", 1), ("1B", "2", 1))
"""The default subset (--all-stages runs every one)."""


def flops_counter(model: str, stage: str) -> FlopsCounter:
    llm, vocab = LLMS[model]
    vit_trains, llm_trains = STAGES[stage]
    vit = INTERN_VIT_300M
    shuffled = 4 * vit.hidden  # pixel shuffle 0.5 concatenates 4 patches
    return FlopsCounter(
        vision=ComponentShape(
            vit.matmul_params, float(vit_trains), vit_trains, vit.layers, vit.hidden
        ),
        projector=ComponentShape(shuffled * llm.hidden + llm.hidden * llm.hidden, 1.0, True),
        llm=ComponentShape(
            llm.matmul_params, float(llm_trains), llm_trains, llm.layers, llm.hidden
        ),
        head=ComponentShape(vocab * llm.hidden, float(llm_trains), llm_trains),
        vision_tokens_per_tile=(448 // 14) ** 2 + 1,
        image_tokens_per_tile=TOKENS_PER_TILE,
    )


@dataclass(frozen=True)
class Shape:
    tokens: int
    tiles: int
    supervised: int

    @property
    def text_only(self) -> bool:
        return self.tiles == 0


def _stream_seed(seed: int, rank: int, chunk: int) -> int:
    return int(np.random.SeedSequence((seed, rank, chunk)).generate_state(1)[0])


def rank_stream(seed: int, rank: int) -> Iterator[Shape]:
    """One rank's endless share: i.i.d. draws of the mixture (supervised = the text tokens;
    `<img>`/`</img>` are counted as image tokens, roughly one per tile)."""
    chunk = 0
    while True:
        for tokens, tiles in sample_shapes(256, _stream_seed(seed, rank, chunk)):
            image_tokens = tiles * (TOKENS_PER_TILE + IMAGE_OVERHEAD)
            yield Shape(tokens, tiles, max(1, tokens - TEMPLATE_TOKENS - image_tokens))
        chunk += 1


def fake_sample(index: int, shape: Shape) -> TokenizedSample:
    ids = np.zeros(shape.tokens, dtype=np.int64)
    labels = np.full(shape.tokens, IGNORE_INDEX, dtype=np.int64)
    labels[shape.tokens - shape.supervised :] = 0
    return TokenizedSample(
        input_ids=ids,
        labels=labels,
        pixel_values=np.zeros((shape.tiles, 3, 1, 1), dtype=np.uint8),
        num_tiles_per_image=(shape.tiles,) if shape.tiles else (),
        dataset_index=0,
        source=SampleSource("bench", "bench.jsonl", index + 1),
    )


Row = list[Shape]


def best_fit_rows(
    stream: Iterator[Shape], count: int, balance: RowBalance | None, holds: tuple[int, ...] = (0,)
) -> list[list[Row]]:
    """`count` rows of the stream as released with each of `holds` (balance_queue_rows; one
    packing run: the release order only reorders the packer's rows)."""
    config = PackingConfig(
        max_packed_tokens=MAX_TOKENS,
        num_images_expected=MAX_TILES,
        max_buffer_size=MAX_BUFFER,
        balance_flops=balance is not None,
    )
    packer = BestFitPacker(config, FACTS, balance)
    shapes: list[Shape] = []
    finished: list[list[PackRow]] = []  # rows finished by each sample, in packing order
    while sum(len(rows) for rows in finished) < count + max(holds) + 1:
        shape = next(stream)
        sample = fake_sample(len(shapes), shape)
        shapes.append(shape)
        finished.append(packer.add(PackItem(PieceRef.whole(sample, len(shapes) - 1, 0), sample)))
    released = []
    for hold in holds:
        order: SyncedRelease[PackRow] = SyncedRelease(hold)
        produce = iter(finished).__next__
        rows = [order.next_row(produce) for _ in range(count)]
        released.append(
            [[shapes[item.ref.record_index] for item in row.items] for row in rows if row]
        )
    return released


def reference_rows(stream: Iterator[Shape], count: int) -> list[Row]:
    """The reference packer; pure-text samples carry their blank 448 px tile."""
    shapes: list[Shape] = []
    while True:
        shapes += [next(stream) for _ in range(256)]
        as_reference = [(s.tokens, max(1, s.tiles)) for s in shapes]
        rows = reference_first_fit_rows(as_reference, MAX_TOKENS, MAX_TILES, MAX_BUFFER)
        # The open buffers at the end are flushed by the helper; only rows emitted by the main
        # loop count, so keep sampling until enough rows were emitted before the flush.
        if len(rows) - MAX_BUFFER >= count:
            return [[shapes[i] for i in row] for row in rows[:count]]


def settled_balance(counter: FlopsCounter, history: list[Shape]) -> RowBalance:
    """A RowBalance whose running mean has seen `history` (the stream's earlier samples)."""
    balance = RowBalance(counter.step_flops, MAX_TOKENS, slack_tokens=32)
    tiles = sum(s.tiles for s in history)
    supervised = sum(s.supervised for s in history)
    # step_flops is linear in tiles and supervised tokens and sums attention per segment, so
    # one call over all segments equals the sum of the per-sample prices.
    flops = sum(counter.step_flops(tiles, [s.tokens for s in history], supervised).values())
    balance.observe(sum(s.tokens for s in history), flops)
    return balance


def row_flops(counter: FlopsCounter, row: Row, reference: bool) -> float:
    """FLOPs of a row as train.loop.step_metrics counts them (ours: one dummy tile in a row
    without tiles; the reference: one blank tile per pure-text sample)."""
    tiles = sum(max(1, s.tiles) if reference else s.tiles for s in row)
    if not reference:
        tiles = max(1, tiles)
    segments = [s.tokens for s in row]
    return sum(counter.step_flops(tiles, segments, sum(s.supervised for s in row)).values())


def step_costs(
    per_rank_rows: list[list[float]], accumulation: int, first: int
) -> list[list[float]]:
    """Per-rank FLOPs of every full step from row `first` on: [step][rank]."""
    num_steps = (len(per_rank_rows[0]) - first) // accumulation
    steps = []
    for step in range(num_steps):
        start = first + step * accumulation
        steps.append([sum(costs[start : start + accumulation]) for costs in per_rank_rows])
    return steps


METHODS = (
    "reference first-fit",
    "best-fit (tokens)",
    "balanced (tokens+FLOPs)",
    "balanced + synced release",
)


@dataclass(frozen=True)
class Settings:
    ranks: int
    steps: int
    warmup_rows: int
    settled_samples: int
    scenarios: tuple[tuple[str, str, int], ...]
    queue_rows: int


@dataclass(frozen=True)
class Figure:
    job: float
    """The job's straggler ratio over the measured steps (job_straggler_ratio)."""
    median_step: float
    """Median over the measured steps of the step's max / mean."""
    first_step: float
    token_fill: float


def one_seed(settings: Settings, seed: int) -> dict[tuple[str, tuple[str, str, int]], Figure]:
    """Every method and scenario on one set of rank streams."""
    ranks = range(settings.ranks)
    max_accumulation = max(ga for _, _, ga in settings.scenarios)
    rows_needed = settings.warmup_rows + settings.steps * max_accumulation
    shared = {
        METHODS[0]: [reference_rows(rank_stream(seed, r), rows_needed) for r in ranks],
        METHODS[1]: [best_fit_rows(rank_stream(seed, r), rows_needed, None)[0] for r in ranks],
    }
    histories = [
        [next(stream) for _ in range(settings.settled_samples)]
        for stream in (rank_stream(seed + 1_000_000, r) for r in ranks)
    ]
    holds = (0, settings.queue_rows)
    figures = {}
    for scenario in settings.scenarios:
        model, stage, accumulation = scenario
        counter = flops_counter(model, stage)
        rows_of = dict(shared)
        balanced = [
            best_fit_rows(
                rank_stream(seed, r), rows_needed, settled_balance(counter, history), holds
            )
            for r, history in enumerate(histories)
        ]
        cold = [
            best_fit_rows(
                rank_stream(seed, r),
                max_accumulation,
                RowBalance(counter.step_flops, MAX_TOKENS, slack_tokens=32),
                holds,
            )
            for r in ranks
        ]
        for k, method in enumerate(METHODS[2:]):
            rows_of[method] = [per_hold[k] for per_hold in balanced]
        for method, per_rank in rows_of.items():
            reference = method == METHODS[0]
            costs = [[row_flops(counter, row, reference) for row in rows] for rows in per_rank]
            steps = step_costs(costs, accumulation, settings.warmup_rows)[: settings.steps]
            if method in METHODS[2:]:
                first = [per_hold[METHODS.index(method) - 2] for per_hold in cold]
            else:
                first = per_rank
            first_costs = [[row_flops(counter, row, reference) for row in rows] for rows in first]
            measured = [row for rows in per_rank for row in rows[settings.warmup_rows :]]
            tokens = sum(s.tokens for row in measured for s in row)
            figures[(method, scenario)] = Figure(
                job=job_straggler_ratio(steps),
                median_step=statistics.median(straggler_ratio(ranks) for ranks in steps),
                first_step=straggler_ratio(step_costs(first_costs, accumulation, 0)[0]),
                token_fill=tokens / (len(measured) * MAX_TOKENS),
            )
    return figures


def _scenarios(all_stages: bool, only: list[str] | None) -> tuple[tuple[str, str, int], ...]:
    if only is None:
        return ALL_SCENARIOS if all_stages else SCENARIOS
    chosen = tuple(s for s in ALL_SCENARIOS if f"{s[0]}:{s[1]}" in only)
    known = {f"{s[0]}:{s[1]}" for s in ALL_SCENARIOS}
    if unknown := sorted(set(only) - known):
        raise SystemExit(f"--only: unknown scenario(s) {unknown}; known: {sorted(known)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=512)
    parser.add_argument("--steps", type=int, default=18, help="measured steps per seed")
    parser.add_argument("--warmup-rows", type=int, default=16)
    parser.add_argument("--all-stages", action="store_true", help="stages 1, 1.5 and 2 of both")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="MODEL:STAGE",
        help="run only these scenarios, e.g. 1B:2 (default: the subset above)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds simulated in parallel")
    parser.add_argument(
        "--settled-samples",
        type=int,
        default=2000,
        help="samples the balanced packer's running mean has seen before the measured rows "
        "(about a stream's 250th step); the first-step figure is a cold start",
    )
    parser.add_argument(
        "--queue-rows",
        type=int,
        default=PackingConfig().balance_queue_rows,
        help="packing.balance_queue_rows of the synced release (default: the config's)",
    )
    args = parser.parse_args()
    settings = Settings(
        ranks=args.ranks,
        steps=args.steps,
        warmup_rows=args.warmup_rows,
        settled_samples=args.settled_samples,
        scenarios=_scenarios(args.all_stages, args.only),
        queue_rows=args.queue_rows,
    )
    clock = time.process_time()
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            per_seed = pool.starmap(one_seed, [(settings, seed) for seed in args.seeds])
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = children.ru_utime + children.ru_stime + time.process_time() - clock
    else:
        per_seed = [one_seed(settings, seed) for seed in args.seeds]
        cpu = time.process_time() - clock

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    print(
        f"{args.ranks} ranks, {args.steps} steps after {args.warmup_rows} rows per rank, "
        f"seeds {args.seeds}; rows {MAX_TOKENS} tokens / {MAX_TILES} tiles, buffer {MAX_BUFFER}"
    )
    print(
        f"balanced: FLOPs budget's running mean after {args.settled_samples} samples per "
        f"stream; synced release holds {args.queue_rows} rows per stream; 'first step' is "
        "each method's first step from an empty stream"
    )
    print(
        "job ratio = sum over steps of max / sum of mean per-rank step FLOPs; median step = "
        "median over steps of max/mean; median [min, max] over seeds"
    )
    for scenario in settings.scenarios:
        model, stage, accumulation = scenario
        print(f"\nInternVL2.5-{model} stage {stage}, GA {accumulation}")
        medians = {}
        for method in METHODS:
            entries = [figures[(method, scenario)] for figures in per_seed]
            job = [e.job for e in entries]
            medians[method] = statistics.median(job)
            print(
                f"  {method:34s} job ratio {spread(job)}  median step "
                f"{spread([e.median_step for e in entries])}  first step "
                f"{spread([e.first_step for e in entries])}  token fill "
                f"{statistics.median(e.token_fill for e in entries):.3f}"
            )
        idle = ", ".join(f"{m} {1 - 1 / medians[m]:.1%}" for m in (METHODS[0], METHODS[-1]))
        print(f"  idle compute: {idle}")
    print(f"\n{cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
