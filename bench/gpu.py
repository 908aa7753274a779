"""GPU benchmark of the trainer's own path: the stage configs' model wrapping (FSDP2, bf16,
freeze policy, activation checkpointing) and `train_step`, on random weights of real shapes.

    gemm       bf16 GEMM (8192^3) -> achieved TFLOP/s (the practical ceiling)
    stage1     configs/internvl2_5_1b_stage1.toml's settings (ViT and LLM frozen, projector
    stage2     trains; stage2: everything trains, drop path 0.1), model InternViT-300M +
               Qwen2.5-1.5B shapes, random weights --prepare_built_model (the loop's freeze,
               checkpoint hooks, FSDP2 on one GPU)--> train_step on the stage's packed rows
               (16384 tokens, <= 48 tiles), once per train.grad_checkpoint choice (the ViT is
               always checkpointed, as in training) -> step time, tokens/s, tiles/s, MFU (ViT +
               LLM), peak CUDA memory; then one packed row's loss sum vs its samples run alone
               (same wrapped model, same varlen kernel)
    attention  one LLM attention layer with Qwen2.5-1.5B's heads (12 query, 2 key/value, dim
               128), fwd+bwd over a packed row: attention.varlen_call vs per-sample sdpa vs
               dense block-diagonal sdpa
    loader     the data loader on JPEGs (1920x1080, 4000x3000): tiles/s with 0, 4, 8 workers
    last line  MFU x.xx (target 0.45): the best stage-2 MFU

Each section is guarded: a failure prints `SECTION failed: ...` with its traceback's tail, the
other sections still run, and the exit code is 1. `--only stage2,attention` runs a subset.

Run on the GPU machine from the work tree (bench/gpu_device.sh installs the wheels of
`make gpu-wheels` first: the loader needs torchdata):
    PYTHONPATH=. python3 bench/gpu.py            (one H100 or H200, no network)
    PYTHONPATH=. python3 bench/gpu.py --smoke    (tiny shapes on CPU; run by the test suite)

Time on one H100 (estimated from the shapes, not yet measured): a stage-2 step is about 250
TFLOP of model work (ViT 300M params x 49k patches x 6 = 89 TFLOP, LLM 1.54B x 16k tokens x 6
= 152 TFLOP, attention ~10 TFLOP) plus recomputation (ViT +30, LLM +50 with checkpointing),
so ~0.7-1 s at 35-45% MFU; 7 steps x 4 runs ~30 s, building 1.8B random weights on the GPU
4 x ~15 s, the loss comparison ~10 s, GEMM 2 s, attention ~10 s, the loader 3 x 20 s plus
~60 s writing and first batches: about 4 minutes in all, under the 8-minute budget.
MFU counts model FLOPs (train/flops.py: no recompute) over the step time and the device's
dense bf16 peak (train/flops.py peak_tflops).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import (  # noqa: E402
    INTERNVIT_300M,
    QWEN2_5_1_5B,
    ModelShape,
    packed_batch,
    random_vlm,
    synthetic_rows,
)

from vlpretrain.config import RunConfig, load_run_config  # noqa: E402
from vlpretrain.data.build import build_sources  # noqa: E402
from vlpretrain.data.collate import PackedBatch  # noqa: E402
from vlpretrain.data.loader import build_dataloader  # noqa: E402
from vlpretrain.distributed.env import DistEnv, init_distributed, shutdown  # noqa: E402
from vlpretrain.facts import RunFacts  # noqa: E402
from vlpretrain.model import attention  # noqa: E402
from vlpretrain.model.vision import VisionConfig  # noqa: E402
from vlpretrain.model.vlm import InternVLModel  # noqa: E402
from vlpretrain.testing.tokenizer import train_tiny_tokenizer  # noqa: E402
from vlpretrain.tokens import add_internvl_tokens  # noqa: E402
from vlpretrain.train.flops import build_flops_counter, peak_tflops  # noqa: E402
from vlpretrain.train.loop import autocast, prepare_built_model, train_step  # noqa: E402
from vlpretrain.train.optim import build_optimizer  # noqa: E402

SECTIONS = ("gemm", "stage1", "stage2", "attention", "loader")
STAGE_FILES = {
    "stage1": HERE.parent / "configs" / "internvl2_5_1b_stage1.toml",
    "stage2": HERE.parent / "configs" / "internvl2_5_1b_stage2.toml",
}
"""The shipped stage configs whose freeze, precision, checkpointing, packing, optimizer and
FSDP2 settings the bench runs (their model paths are not read: the weights are random)."""
BENCH_OVERRIDES = ("train.report_to=none", "train.resume=never")


@dataclass(frozen=True)
class Size:
    shape: ModelShape
    overrides: tuple[str, ...]
    """--set assignments on top of the stage configs."""
    warmup_steps: int
    timed_steps: int
    gemm: int
    gemm_seconds: float
    attention_tokens: int
    loader_workers: tuple[int, ...]
    loader_seconds: float
    photo_sizes: tuple[tuple[int, int], ...]
    max_dynamic_patch: int = 12
    """Tiles per image in the loader benchmark (+ 1 thumbnail): must fit a row's tiles."""


FULL = Size(
    shape=ModelShape(vision=INTERNVIT_300M, llm=QWEN2_5_1_5B, tile=448), overrides=(),
    warmup_steps=2, timed_steps=5, gemm=8192, gemm_seconds=2.0, attention_tokens=16384,
    loader_workers=(0, 4, 8), loader_seconds=20.0, photo_sizes=((1920, 1080), (4000, 3000)),
)  # fmt: skip
SMOKE = Size(
    shape=ModelShape(
        vision=VisionConfig(image_size=56, qkv_bias=True, hidden_size=64, num_attention_heads=4,
                            intermediate_size=128, qk_normalization=False, num_hidden_layers=2,
                            norm_type="layer_norm", initializer_factor=1.0),
        llm={**QWEN2_5_1_5B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        tile=56,
    ),
    # The CPU stand-in of the varlen kernel: the same wrapper and call path as torch_varlen.
    overrides=("packing.max_packed_tokens=256", "data.max_seq_length=256",
               "packing.num_images_expected=32",
               "model.attn_implementation=torch_varlen_reference"),
    warmup_steps=1, timed_steps=1, gemm=128, gemm_seconds=0.2, attention_tokens=512,
    loader_workers=(0, 1), loader_seconds=1.0, photo_sizes=((320, 240),), max_dynamic_patch=4,
)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_config(size: Size, stage: str, grad_checkpoint: bool) -> RunConfig:
    """The stage file's settings plus the bench's overrides and one grad_checkpoint choice."""
    checkpointing = f"train.grad_checkpoint={str(grad_checkpoint).lower()}"  # a TOML bool
    return load_run_config(STAGE_FILES[stage], (*BENCH_OVERRIDES, *size.overrides, checkpointing))


def kernel_of(config: RunConfig, device: torch.device) -> tuple[str, str]:
    """The LLM attention kernel training picks for this config on this device (build_model's)."""
    bf16 = config.train.precision == "bf16"
    return attention.select_attention(config.model.attn_implementation, device, bf16)


def gemm_section(size: Size, env: DistEnv) -> None:
    """Achieved matmul TFLOP/s of size^3 products (the ceiling MFU is compared against)."""
    device = env.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size.gemm, size.gemm, device=device, dtype=dtype)
    b = torch.randn(size.gemm, size.gemm, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < size.gemm_seconds:
        for _ in range(10):
            a @ b
        count += 10
        synchronize(device)
    achieved = 2.0 * size.gemm**3 * count / (time.perf_counter() - start) / 1e12
    print(f"GEMM {size.gemm}^3 {str(dtype)[6:]}: {achieved:.1f} TFLOP/s achieved, "
          f"peak {peak_tflops(device):.1f} TFLOP/s", flush=True)  # fmt: skip


def build_stage_model(
    size: Size, config: RunConfig, env: DistEnv
) -> tuple[torch.nn.Module, InternVLModel]:
    """A random-weight model of `size.shape`, wrapped as prepare_model wraps a built one."""
    kernel, _ = kernel_of(config, env.device)
    vision = replace(size.shape.vision, drop_path_rate=config.model.drop_path_rate)
    with torch.device(env.device):
        model = random_vlm(replace(size.shape, vision=vision), kernel, seed=config.train.seed)
    wrapped, _ = prepare_built_model(model, config, env)
    return wrapped, model


def stage_batches(model: InternVLModel, config: RunConfig, count: int) -> list[list[PackedBatch]]:
    """`count` steps of micro-batches shaped by the stage's packing settings."""
    packing = config.packing
    micro = config.train.gradient_accumulation_steps
    return [
        [packed_batch(model, packing.rows_per_batch, packing.max_packed_tokens,
                      packing.num_images_expected, seed=step * micro + index)
         for index in range(micro)]
        for step in range(count)
    ]  # fmt: skip


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from rss import reset_peak

        reset_peak()


def memory_gib(device: torch.device) -> tuple[float, float]:
    """Peak allocated and peak reserved memory since the last reset (CPU: the process's peak
    RSS twice, weights and the interpreter included)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**30,
                torch.cuda.max_memory_reserved(device) / 2**30)  # fmt: skip
    from rss import rss_mib

    peak = rss_mib("VmHWM") / 1024
    return peak, peak


def time_steps(
    wrapped: torch.nn.Module, model: InternVLModel, config: RunConfig, env: DistEnv, size: Size
) -> dict[str, Any]:
    """Timed train_steps; FLOPs, tokens and tiles of the timed ones."""
    optimizer = build_optimizer(wrapped, config.optim)
    count = size.warmup_steps + size.timed_steps
    steps = [[b.to(env.device) for b in micro] for micro in stage_batches(model, config, count)]
    flops = build_flops_counter(model)
    times, per_component, tokens, tiles = [], [], [], []
    for index, micro in enumerate(steps):
        synchronize(env.device)
        start = time.perf_counter()
        result = train_step(wrapped, optimizer, micro, config, env)
        synchronize(env.device)
        if index < size.warmup_steps:
            continue
        times.append(time.perf_counter() - start)
        segments = [int(n) for b in micro for n in torch.diff(b.cu_seqlens.cpu()).tolist()]
        num_tiles = sum(b.stats.num_tiles + b.stats.num_dummy_tiles for b in micro)
        per_component.append(flops.step_flops(num_tiles, segments, result.num_supervised))
        tokens.append(sum(b.stats.num_real_tokens for b in micro))
        tiles.append(sum(b.stats.num_tiles for b in micro))
    del optimizer
    return {"times": times, "flops": per_component, "tokens": tokens, "tiles": tiles}


def report_steps(label: str, timed: dict[str, Any], peak: float, device: torch.device) -> float:
    """Print one checkpointing choice's line; returns its MFU."""
    step = statistics.median(timed["times"])
    flops = {k: statistics.mean(f[k] for f in timed["flops"]) for k in timed["flops"][0]}
    scale = 1.0 / (step * peak * 1e12) if peak > 0 else 0.0
    mfu = sum(flops.values()) * scale
    tokens, tiles = statistics.mean(timed["tokens"]), statistics.mean(timed["tiles"])
    allocated, reserved = memory_gib(device)
    print(f"{label}: step {step:.3f} s (median, {min(timed['times']):.3f}-"
          f"{max(timed['times']):.3f}), {tokens / step:,.0f} tokens/s, {tiles / step:.1f} tiles/s, "
          f"MFU {mfu:.3f} (ViT {flops['vision'] * scale:.3f} + LLM "
          f"{(flops['llm'] + flops['head'] + flops['projector']) * scale:.3f}), peak memory "
          f"{allocated:.1f} GiB allocated, {reserved:.1f} GiB reserved "
          f"({tokens:.0f} tokens, {tiles:.0f} tiles/step)", flush=True)  # fmt: skip
    return mfu


def split_samples(batch: PackedBatch, model: InternVLModel) -> list[PackedBatch]:
    """Every sample of a 1-row packed batch as its own 1-row batch (padding dropped)."""
    per_tile = model.num_image_token
    bounds = batch.cu_seqlens.tolist()
    singles, tile_start = [], 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ids = batch.input_ids[:, start:end]
        num_tiles = int((ids == model.image_context_token_id).sum()) // per_tile
        if (batch.labels[:, start:end] != -100).sum() == 0:
            continue  # the padding segment
        tiles = slice(tile_start, tile_start + num_tiles)
        tile_start += num_tiles
        singles.append(replace(
            batch, input_ids=ids, labels=batch.labels[:, start:end],
            position_ids=batch.position_ids[:, start:end],
            cu_seqlens=torch.tensor([0, end - start], dtype=torch.int32),
            loss_weight=batch.loss_weight[:, start:end], pixel_values=batch.pixel_values[tiles],
            image_flags=batch.image_flags[tiles],
        ))  # fmt: skip
    return singles


@torch.no_grad()
def loss_sum(wrapped: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> float:
    """The training forward's loss sum (same autocast as train_step)."""
    with autocast(config.train.precision, batch.input_ids.device):
        out = wrapped(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      pixel_values=batch.pixel_values, image_flags=batch.image_flags,
                      labels=batch.labels, loss_weight=batch.loss_weight)  # fmt: skip
    return float(out.loss_sum)


def report_packed_equality(
    wrapped: torch.nn.Module, model: InternVLModel, config: RunConfig, env: DistEnv, stage: str
) -> None:
    """One packed row's loss sum against the sum over its samples run one at a time (eval mode:
    no drop path), through the wrapped model and the stage's kernel.

    Random weights attend almost uniformly and add little to the residual stream, so even a
    leak between samples moves the loss only slightly: a fixed tolerance could pass a leaking
    kernel. The row is therefore also run with positions that never restart (one segment: its
    samples attend to each other), and equality means a gap at least 10x below that leak's.
    """
    wrapped.eval()
    packing = config.packing
    batch = packed_batch(model, 1, packing.max_packed_tokens, packing.num_images_expected,
                         seed=99).to(env.device)  # fmt: skip
    packed = loss_sum(wrapped, batch, config)
    singles = split_samples(batch, model)
    alone = sum(loss_sum(wrapped, single, config) for single in singles)
    positions = torch.arange(batch.input_ids.shape[1], device=env.device).expand_as(batch.input_ids)
    leaking = loss_sum(wrapped, replace(batch, position_ids=positions), config)
    gap, leak = abs(packed - alone) / abs(alone), abs(leaking - alone) / abs(alone)
    verdict = "equal" if gap * 10 <= leak else "NOT shown equal"
    kernel, _ = kernel_of(config, env.device)
    print(f"{stage} packed vs per-sample loss sum ({kernel}, {config.train.precision}): "
          f"{packed:.4f} vs {alone:.4f} over {len(singles)} samples, relative difference "
          f"{gap:.2e}; samples leaking into each other: {leak:.2e} ({verdict}: the gap must be "
          f"10x below the leak's)", flush=True)  # fmt: skip
    if gap * 10 > leak:
        raise AssertionError(f"{stage}: packed vs per-sample gap {gap:.2e} is not 10x below the "
                             f"gap of a leaking row {leak:.2e}")  # fmt: skip


def run_choice(size: Size, stage: str, grad_checkpoint: bool, env: DistEnv, peak: float,
               compare: bool) -> float | None:  # fmt: skip
    """One checkpointing choice of a stage: timed steps, then (if `compare`) the loss equality.
    Returns the MFU, or None when the steps ran out of memory."""
    config = stage_config(size, stage, grad_checkpoint)
    label = f"{stage} checkpointing {'on ' if grad_checkpoint else 'off'}"
    gc.collect()
    reset_peak_memory(env.device)
    wrapped, model = build_stage_model(size, config, env)
    try:
        timed = time_steps(wrapped, model, config, env, size)
    except torch.OutOfMemoryError:
        allocated, _ = memory_gib(env.device)
        print(f"{label}: out of memory (peak {allocated:.1f} GiB allocated)", flush=True)
        return None
    mfu = report_steps(label, timed, peak, env.device)
    if compare:
        report_packed_equality(wrapped, model, config, env, stage)
    return mfu


def stage_section(size: Size, stage: str, env: DistEnv, results: dict[str, float]) -> None:
    """Both train.grad_checkpoint choices of one stage; the loss equality runs on the shipped
    choice (the stage file's grad_checkpoint)."""
    shipped = load_run_config(STAGE_FILES[stage]).train.grad_checkpoint
    config = stage_config(size, stage, shipped)
    kernel, reason = kernel_of(config, env.device)
    freeze, dist = config.freeze, config.dist
    print(f"{stage} ({STAGE_FILES[stage].name}): freeze backbone/llm/mlp "
          f"{freeze.freeze_backbone}/{freeze.freeze_llm}/{freeze.freeze_mlp}, "
          f"{config.train.precision}, {dist.strategy} (reshard_after_forward "
          f"{dist.reshard_after_forward}), drop path {config.model.drop_path_rate}, "
          f"attention {kernel} ({reason})", flush=True)  # fmt: skip
    peak = peak_tflops(env.device, config.train.peak_tflops)
    for grad_checkpoint in (False, True):
        mfu = run_choice(size, stage, grad_checkpoint, env, peak, grad_checkpoint == shipped)
        if mfu is not None:
            results[stage] = max(results.get(stage, 0.0), mfu)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int = 5) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def attention_section(size: Size, env: DistEnv) -> None:
    """Forward+backward of one LLM attention layer over a packed row, three ways."""
    device = env.device
    heads, kv_heads = QWEN2_5_1_5B["num_attention_heads"], QWEN2_5_1_5B["num_key_value_heads"]
    head_dim = QWEN2_5_1_5B["hidden_size"] // heads
    on_cuda = device.type == "cuda"
    function = attention.torch_varlen_function() if on_cuda else attention.reference_varlen_attn
    name = attention.TORCH_VARLEN if on_cuda else attention.TORCH_VARLEN_REFERENCE
    per_tile = (size.shape.tile // 14) ** 2 // 4
    row = synthetic_rows(per_tile, 1000, 28, 1, size.attention_tokens, 48, seed=5)
    cu = row.cu_seqlens.to(device)
    lengths = torch.diff(row.cu_seqlens).tolist()
    total = size.attention_tokens

    def tensor(num_heads: int) -> torch.Tensor:
        return torch.randn(total, num_heads, head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True)  # fmt: skip

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    bounds = cu.tolist()

    def varlen() -> None:
        attention.varlen_call(function, q, k, v, cu, max(lengths), None).sum().backward()

    def per_sample() -> None:
        outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                               is_causal=True, enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # fmt: skip
        torch.cat([o.transpose(0, 1) for o in outs]).sum().backward()

    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))  # fmt: skip
    position = torch.arange(total, device=device)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])

    def dense() -> None:
        # k/v repeated: a boolean mask with GQA would leave only the math kernel on CUDA.
        keys, values = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, keys, values)),
                                             attn_mask=mask)  # fmt: skip
        out.sum().backward()

    timings = {n: time_call(f, device) * 1e3 for n, f in
               (("varlen", varlen), ("per_sample", per_sample), ("dense", dense))}  # fmt: skip
    print(f"attention fwd+bwd, one layer ({heads} query / {kv_heads} key-value heads, dim "
          f"{head_dim}), {len(lengths)} segments in {total} tokens: {name} via varlen_call "
          f"{timings['varlen']:.2f} ms, per-sample sdpa {timings['per_sample']:.2f} ms, dense "
          f"block-diagonal sdpa {timings['dense']:.2f} ms (varlen/per-sample "
          f"{timings['varlen'] / timings['per_sample']:.2f})", flush=True)  # fmt: skip


NUM_LOADER_RECORDS = 200


def write_scene_dataset(root: Path, sizes: tuple[tuple[int, int], ...]) -> Path:
    """photos.write_photo_dataset's layout with synthetic scenes instead of scikit-image's
    photos (a bare GPU machine has no scikit-image): smooth gradients and blurred shapes,
    which JPEG compresses like a photo, unlike noise."""
    images = root / "images"
    images.mkdir(parents=True)
    names = []
    for index in range(6):
        rng = np.random.default_rng(index)
        for width, height in sizes:
            y, x = np.mgrid[0:height, 0:width] / max(width, height)
            base = np.stack([np.sin(6 * x + index), np.cos(5 * y - index), np.sin(4 * (x + y))], -1)
            image = Image.fromarray(((base + 1) * 110).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(12):
                x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
                radius = int(rng.integers(width // 20, width // 5))
                color = tuple(int(c) for c in rng.integers(0, 256, size=3))
                draw.ellipse((x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=color)
            name = f"scene{index}_{width}x{height}.jpg"
            image.filter(ImageFilter.GaussianBlur(2)).save(images / name, quality=90)
            names.append(name)
    annotation = root / "scenes.jsonl"
    with annotation.open("w") as handle:
        for index in range(NUM_LOADER_RECORDS):
            turns = [{"from": "human", "value": "<image>\nDescribe the scene."},
                     {"from": "gpt", "value": f"scene number {index} of a test set"}]  # fmt: skip
            record = {"id": index, "image": names[index % len(names)], "conversations": turns}
            handle.write(json.dumps(record) + "\n")
    meta = root / "meta.json"
    entry = {"root": str(images), "annotation": str(annotation), "repeat_time": 1,
             "data_augment": False}  # fmt: skip
    meta.write_text(json.dumps({"scenes": entry}))
    return meta


def write_loader_dataset(root: Path, sizes: tuple[tuple[int, int], ...]) -> tuple[Path, str]:
    """The loader's input and what it is: real photos where scikit-image is installed."""
    try:
        import skimage.data  # noqa: F401 - photos.py reads its sample photos
    except ImportError:
        return write_scene_dataset(root, sizes), "synthetic scene JPEGs (no scikit-image)"
    from photos import write_photo_dataset

    return write_photo_dataset(root, NUM_LOADER_RECORDS, sizes), "real JPEGs"


def loader_rate(size: Size, root: Path, meta: Path, workers: int) -> float:
    """Tiles/s the loader delivers (wall clock: workers run in parallel), with stage 2's
    sample and packing settings."""
    config = stage_config(size, "stage2", True)
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    add_internvl_tokens(tokenizer)
    tile = size.shape.tile
    facts = RunFacts.from_tokenizer(tokenizer, tile_size=tile,
                                    num_image_token=(tile // 14) ** 2 // 4,
                                    template="internvl2_5")  # fmt: skip
    sample = replace(config.data, max_dynamic_patch=size.max_dynamic_patch,
                     cache_dir=str(root / "cache"))  # fmt: skip
    stream = replace(config.stream, num_workers=workers, replacement=True)
    sources = build_sources(meta, sample, facts, tokenizer)
    iterator = iter(build_dataloader(sources, config.packing, facts, stream, 0, 1))
    next(iterator)  # workers started, first batch out
    tiles, start = 0, time.perf_counter()
    while time.perf_counter() - start < size.loader_seconds:
        tiles += next(iterator).stats.num_tiles
    return tiles / (time.perf_counter() - start)


def loader_section(size: Size, env: DistEnv) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        meta, source = write_loader_dataset(root, size.photo_sizes)
        rates = [f"{w} workers {loader_rate(size, root, meta, w):.1f}" for w in size.loader_workers]
        print(f"loader tiles/s on {source} {size.photo_sizes}: " + ", ".join(rates), flush=True)


def run_section(name: str, fn: Callable[[], None], fail: str | None) -> bool:
    """Run one section; a failure is printed with its traceback's tail and does not stop the
    others. Returns whether it succeeded."""
    start = time.perf_counter()
    try:
        if name == fail:
            raise RuntimeError(f"failure requested by --fail-section {name}")
        fn()
        print(f"{name} took {time.perf_counter() - start:.0f} s", flush=True)
        return True
    except Exception as error:  # noqa: BLE001 - a benchmark reports every section's failure
        tail = "".join(traceback.format_exception(error)).rstrip().splitlines()[-12:]
        print(f"{name} failed: {type(error).__name__}: {error}", flush=True)
        print("\n".join("    " + line for line in tail), flush=True)
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_sections(text: str | None) -> list[str]:
    if text is None:
        return list(SECTIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--only {text!r}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    return [n for n in SECTIONS if n in names]


def describe_device(env: DistEnv) -> None:
    device = env.device
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        memory = properties.total_memory / 2**30
        name = f"{properties.name}, {memory:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        name = "CPU"
    print(f"device {name}, torch {torch.__version__}, backend {env.backend}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (test suite)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--fail-section",
        choices=SECTIONS,
        help="raise inside this section on purpose (tests the failure report)",
    )
    args = parser.parse_args()
    sections = parse_sections(args.only)
    size = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: a second spinning thread only slows them
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on CPU (gloo) anywhere
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (use --smoke on CPU)")
    env = init_distributed()
    describe_device(env)
    results: dict[str, float] = {}
    work = {
        "gemm": lambda: gemm_section(size, env),
        "stage1": lambda: stage_section(size, "stage1", env, results),
        "stage2": lambda: stage_section(size, "stage2", env, results),
        "attention": lambda: attention_section(size, env),
        "loader": lambda: loader_section(size, env),
    }
    start = time.perf_counter()
    failed = [name for name in sections if not run_section(name, work[name], args.fail_section)]
    shutdown()
    print(f"total {time.perf_counter() - start:.0f} s for {', '.join(sections)}")
    if "stage2" in results:
        print(f"MFU {results['stage2']:.2f} (target 0.45)")
    if failed:
        print(f"sections failed: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
