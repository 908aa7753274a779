"""Benchmark: training tokens/s and peak RSS of our packed step vs a plain padded-batch step.

    shapes QA + captions mixture (seeded) --> the same N TokenizedSamples in the same order
      --> packed: BestFitPacker rows of <= max_packed_tokens --collate_rows--> train_step
          (document-aware attention, chunked weighted loss, no full logits)
      --> padded: groups of B samples padded to the longest, attention_mask, full logits
          (B, L, V), mean cross-entropy: what a plain HF-style loop does

Both use the same tiny model (InternViT 2 x 64 on 56-px tiles, Qwen2 4 x 128), everything
trainable, fp32, AdamW with the same settings, and the same activation checkpointing (the ViT
only). Packed variants `TOKENSxROWS` put ROWS rows of at most TOKENS tokens in one step, so
"512x4" has about as many token slots per step as the padded batch of 8. Throughput counts
real (non-padding) tokens per CPU second over the timed steps; the first steps (warm-up) are
not timed. Each
variant runs in its own subprocess so its peak RSS (getrusage ru_maxrss) is its own.
Run: `.venv/bin/python bench/step.py` (about 40 s on 2 cores).

Reading the numbers: on CPU the packed step runs SDPA with a dense block-diagonal mask, so a
row of L tokens costs L^2 attention whatever its samples are (a GPU varlen flash kernel skips
the cross-sample blocks). The shapes samples are of similar length, so the padded baseline
wastes only ~10% of its slots; packing cannot win that back here, and long rows lose to the
quadratic mask. The matmul time of the two paths is the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpretrain.config import build_run_config
from vlpretrain.data import tiling
from vlpretrain.data.build import SampleConfig, build_sources
from vlpretrain.data.collate import PackedBatch, collate_rows
from vlpretrain.data.packing import BestFitPacker, PackingConfig, PackItem, PieceRef
from vlpretrain.data.samples import IGNORE_INDEX, TokenizedSample
from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.build import run_facts
from vlpretrain.testing.components import TINY_VISION, build_tiny_components
from vlpretrain.testing.shapes import caption_corpus
from vlpretrain.testing.synthetic import make_shapes_dataset
from vlpretrain.train.loop import prepare_model, train_step
from vlpretrain.train.optim import build_optimizer

TILE = 56
LLM_HIDDEN, LLM_LAYERS = 128, 4
MAX_SEQ_LENGTH = 2048
WARMUP_STEPS = 2


def prepare_assets(root: Path, seed: int) -> None:
    build_tiny_components(
        root / "components",
        seed=seed,
        corpus=caption_corpus(seed),
        vision_config=replace(TINY_VISION, image_size=TILE),
        llm_hidden_size=LLM_HIDDEN,
        llm_layers=LLM_LAYERS,
    )
    make_shapes_dataset(
        root / "data", seed=seed, num_caption=200, num_qa=200, num_eval=0, image_size=TILE
    )


def build(root: Path, num_samples: int, max_packed_tokens: int):
    """Model (prepared as the loop does), optimizer, and the first `num_samples` samples."""
    raw = {
        "model": {
            "vision_path": str(root / "components" / "vit"),
            "llm_path": str(root / "components" / "llm"),
            "force_image_size": TILE,
        },
        "data": {"max_seq_length": MAX_SEQ_LENGTH, "cache_dir": str(root / "cache")},
        "packing": {"max_packed_tokens": MAX_SEQ_LENGTH, "loss_reduction": "token"},
        "optim": {"learning_rate": 1e-4},
        "train": {"meta_path": str(root / "data" / "meta_finetune.json"), "seed": 0,
                  "grad_checkpoint": False},
    }  # fmt: skip
    config = build_run_config(raw)
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model, plain, tokenizer, _ = prepare_model(config, env)
    optimizer = build_optimizer(model, config.optim)
    sample_config = SampleConfig(
        max_seq_length=MAX_SEQ_LENGTH, max_dynamic_patch=6, cache_dir=str(root / "cache")
    )
    facts = run_facts(plain, tokenizer)
    sources = build_sources(config.train.meta_path, sample_config, facts, tokenizer)
    samples: list[TokenizedSample] = []
    for index in range(max(len(s) for s in sources)):  # interleave the datasets
        for source in sources:
            if index < len(source) and len(samples) < num_samples:
                sample = source.load(index, epoch=0, seed=0)
                if isinstance(sample, TokenizedSample):
                    samples.append(sample)
    packing = PackingConfig(
        max_packed_tokens=max_packed_tokens,
        num_images_expected=64,
        loss_reduction="token",
    )
    return config, env, model, plain, optimizer, samples, packing, facts, len(sources)


def packed_batches(samples, packing, facts, num_datasets, rows_per_batch: int) -> list[PackedBatch]:
    packer, rows = BestFitPacker(packing, facts), []
    for index, sample in enumerate(samples):
        rows += packer.add(PackItem(PieceRef.whole(sample, index, 0), sample))
    rows += packer.flush()
    return [
        collate_rows(rows[i : i + rows_per_batch], packing, facts, num_datasets=num_datasets)
        for i in range(0, len(rows), rows_per_batch)
    ]


def padded_batches(samples, batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        longest = max(s.num_tokens for s in group)
        ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(group), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, : s.num_tokens] = torch.from_numpy(s.input_ids)
            labels[b, : s.num_tokens] = torch.from_numpy(s.labels)
            mask[b, : s.num_tokens] = 1
        tiles = [s.pixel_values for s in group if s.num_tiles]
        pixels = np.concatenate(tiles) if tiles else np.zeros((1, 3, TILE, TILE), np.uint8)
        flags = torch.ones(len(pixels), dtype=torch.long) if tiles else torch.zeros(1, torch.long)
        batches.append(
            {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "pixel_values": tiling.model_pixels(torch.from_numpy(pixels), "imagenet"),
             "image_flags": flags,
             "num_tokens": sum(s.num_tokens for s in group)}
        )  # fmt: skip
    return batches


def padded_step(model, plain, optimizer, batch, max_grad_norm: float) -> float:
    """The baseline: full (B, L, V) logits and mean cross-entropy over supervised tokens."""
    embeds = plain.embed(batch["input_ids"], batch["pixel_values"], batch["image_flags"])
    hidden = plain.language_model.get_decoder()(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    logits = plain.language_model.get_output_embeddings()(hidden)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   max_grad_norm)  # fmt: skip
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_variant(root: Path, variant: str, num_samples: int, batch_size: int) -> dict:
    """One variant: 'padded' or 'packed-NxR' (R rows of at most N tokens per step)."""
    row_tokens, num_rows = MAX_SEQ_LENGTH, 1
    if variant.startswith("packed"):
        row_tokens, num_rows = (int(v) for v in variant.split("-")[1].split("x"))
    config, env, model, plain, optimizer, samples, packing, facts, num_datasets = build(
        root, num_samples, row_tokens
    )
    if variant.startswith("packed"):
        batches = packed_batches(samples, packing, facts, num_datasets, num_rows)
        tokens = [b.stats.num_real_tokens for b in batches]
        slots = [b.input_ids.numel() for b in batches]

        def step(batch):
            return train_step(model, optimizer, [batch], config, env).loss
    else:
        batches = padded_batches(samples, batch_size, facts.pad_token_id)
        tokens = [b["num_tokens"] for b in batches]
        slots = [b["input_ids"].numel() for b in batches]

        def step(batch):
            return padded_step(model, plain, optimizer, batch, config.optim.max_grad_norm)

    for batch in batches[:WARMUP_STEPS]:
        step(batch)
    # CPU time of this process (one torch thread by default): wall time on a shared machine
    # measures the neighbours, and flipped the ratios under load.
    start = time.process_time()
    for batch in batches[WARMUP_STEPS:]:
        step(batch)
    seconds = time.process_time() - start
    timed_tokens = sum(tokens[WARMUP_STEPS:])
    return {
        "variant": variant,
        "samples": len(samples),
        "steps": len(batches),
        "tokens_per_second": timed_tokens / seconds,
        "seconds": seconds,
        "padding_fraction": 1 - sum(tokens) / sum(slots),
        "mean_slots_per_step": float(np.mean(slots)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96, help="samples every variant trains on")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    parser.add_argument(
        "--packed",
        nargs="+",
        default=["512x4", "2048x1"],
        help="packed variants TOKENSxROWS: rows of <= TOKENS tokens, ROWS rows per step",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:  # child process: one variant, JSON on the last line
        result = run_variant(args.root, args.variant, args.samples, args.batch_size)
        print(json.dumps(result))
        return
    variants = ["padded", *(f"packed-{v}" for v in args.packed)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_assets(root, args.seed)
        for variant in variants:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--root", str(root),
                 "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                 "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    padded = results["padded"]
    print(
        f"{padded['samples']} samples of the shapes QA + captions mixture, ViT 2x64 on "
        f"{TILE}-px tiles + Qwen2 {LLM_LAYERS}x{LLM_HIDDEN}, fp32, {args.threads} thread(s)"
    )
    for variant, r in results.items():
        name = (
            f"padded, {args.batch_size} samples/batch"
            if variant == "padded"
            else "packed, {1} rows of <= {0} tokens".format(*variant.split("-")[1].split("x"))
        )
        ratio = r["tokens_per_second"] / padded["tokens_per_second"]
        print(
            f"{name:33s} {r['tokens_per_second']:7.0f} tokens/CPU-s ({ratio:4.2f}x)  "
            f"steps {r['steps']:3d}  slots/step {r['mean_slots_per_step']:6.0f}  "
            f"padding {r['padding_fraction']:5.1%}  peak RSS {r['peak_rss_mib']:5.0f} MiB"
        )


if __name__ == "__main__":
    main()
