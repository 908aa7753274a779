"""GPU benchmark: bf16 ceiling, step time, throughput, MFU (ViT / LLM), peak memory per stage with
and without activation checkpointing, packed-vs-per-sample loss on the varlen path, loader rate.

    bf16 GEMM (8192^3)                                    -> achieved TFLOP/s (practical ceiling)
    random InternViT-300M + Qwen2.5-1.5B shape, fp32 master weights, bf16 autocast
      x {stage1, stage2} x {checkpointing off, on}: train_step on packed rows of 16384 tokens,
        <= 48 tiles -> step time, tokens/s, tiles/s, MFU (total, ViT, LLM), peak CUDA memory
    one packed row: loss sum (varlen kernel) vs the sum over its samples run one at a time
    attention alone on that row: varlen kernel vs per-sample sdpa vs dense block-diagonal sdpa
    loader on real JPEGs (1920x1080, 4000x3000): tiles/s with 0, 4 and 8 workers
    last line: MFU x.xx (target 0.45)

Run on the GPU machine from the work tree with its own python (no install, no network):
    PYTHONPATH=. python3 bench/gpu.py            (< 8 minutes on one H200)
    PYTHONPATH=. python3 bench/gpu.py --smoke    (tiny shapes on CPU; run by the test suite)
MFU counts model FLOPs (train/flops.py: no recompute) over the step time and the device's
dense bf16 peak (989 TFLOP/s for H100/H200).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import write_photo_dataset  # noqa: E402
from workload import (  # noqa: E402
    INTERNVIT_300M,
    QWEN2_5_1_5B,
    ModelShape,
    packed_batch,
    prepare,
    random_vlm,
    run_config,
    synthetic_rows,
)

from vlpretrain.data.build import SampleConfig, build_sources  # noqa: E402
from vlpretrain.data.collate import PackedBatch  # noqa: E402
from vlpretrain.data.loader import StreamConfig, build_dataloader  # noqa: E402
from vlpretrain.data.packing import PackingConfig  # noqa: E402
from vlpretrain.demo.tokenizer import train_tiny_tokenizer  # noqa: E402
from vlpretrain.distributed.env import DistEnv  # noqa: E402
from vlpretrain.facts import RunFacts  # noqa: E402
from vlpretrain.model import attention  # noqa: E402
from vlpretrain.model.vision import VisionConfig  # noqa: E402
from vlpretrain.model.vlm import InternVLModel  # noqa: E402
from vlpretrain.tokens import add_internvl_tokens  # noqa: E402
from vlpretrain.train.flops import build_flops_counter, peak_tflops  # noqa: E402
from vlpretrain.train.loop import train_step  # noqa: E402
from vlpretrain.train.optim import build_optimizer  # noqa: E402


@dataclass(frozen=True)
class Size:
    shape: ModelShape
    row_tokens: int
    row_tiles: int
    warmup_steps: int
    timed_steps: int
    gemm: int
    loader_workers: tuple[int, ...]
    loader_seconds: float
    photo_sizes: tuple[tuple[int, int], ...]
    precision: str
    max_dynamic_patch: int = 12
    """Tiles per image in the loader benchmark (+ 1 thumbnail): must fit row_tiles."""


FULL = Size(
    shape=ModelShape(vision=INTERNVIT_300M, llm=QWEN2_5_1_5B, tile=448),
    row_tokens=16384, row_tiles=48, warmup_steps=2, timed_steps=5, gemm=8192,
    loader_workers=(0, 4, 8), loader_seconds=20.0, photo_sizes=((1920, 1080), (4000, 3000)),
    precision="bf16",
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
    row_tokens=256, row_tiles=32, warmup_steps=1, timed_steps=1, gemm=128,
    loader_workers=(0, 1), loader_seconds=1.0, photo_sizes=((320, 240),), precision="fp32",
    max_dynamic_patch=4,
)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device: torch.device, size: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Achieved matmul TFLOP/s of size^3 products (the ceiling MFU is compared against)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        count += 10
        synchronize(device)
    return 2.0 * size**3 * count / (time.perf_counter() - start) / 1e12


def build(size: Size, stage: str, checkpointing: bool, device: torch.device) -> InternVLModel:
    kernel, reason = attention.select_attention("auto", device)
    with torch.device(device):
        model = random_vlm(size.shape, kernel, seed=0)
    prepare(model, stage, checkpointing, device)
    return model


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    from rss import rss_mib

    return rss_mib("VmHWM") / 1024


def run_stage(size: Size, stage: str, checkpointing: bool, device: torch.device,
              peak: float) -> dict:  # fmt: skip
    """Timed train_steps of one configuration; an out-of-memory run is reported as such."""
    env = DistEnv(0, 0, 1, device, "nccl" if device.type == "cuda" else "gloo")
    config = run_config(size.precision)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        model = build(size, stage, checkpointing, device)
        optimizer = build_optimizer(model, config.optim)
        batches = [packed_batch(model, 1, size.row_tokens, size.row_tiles, seed=s).to(device)
                   for s in range(size.warmup_steps + size.timed_steps)]  # fmt: skip
        times = []
        for index, batch in enumerate(batches):
            synchronize(device)
            start = time.perf_counter()
            train_step(model, optimizer, [batch], config, env)
            synchronize(device)
            if index >= size.warmup_steps:
                times.append(time.perf_counter() - start)
        flops = build_flops_counter(model)
        step = statistics.median(times)
        shares = [flops.step_flops(b.stats.num_tiles, torch.diff(b.cu_seqlens.cpu()).tolist(),
                                   int((b.labels[:, 1:] != -100).sum()))
                  for b in batches[size.warmup_steps:]]  # fmt: skip
        per = {k: statistics.mean(s[k] for s in shares) for k in shares[0]}
        timed = batches[size.warmup_steps :]
        tokens = statistics.mean(b.stats.num_real_tokens for b in timed)
        tiles = statistics.mean(b.stats.num_tiles for b in timed)
        scale = 1.0 / (step * peak * 1e12) if peak > 0 else 0.0
        return {
            "step": step, "step_min": min(times), "step_max": max(times),
            "tokens_per_second": tokens / step, "tiles_per_second": tiles / step,
            "mfu": sum(per.values()) * scale, "mfu_vit": per["vision"] * scale,
            "mfu_llm": (per["llm"] + per["head"] + per["projector"]) * scale,
            "peak_gib": peak_memory_gib(device), "tokens": tokens, "tiles": tiles,
        }  # fmt: skip
    except torch.OutOfMemoryError:
        return {"oom": True, "peak_gib": peak_memory_gib(device)}
    finally:
        del model, optimizer
        gc.collect()


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
def loss_sum(model: InternVLModel, batch: PackedBatch, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = batch.input_ids.device
    with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                    pixel_values=batch.pixel_values, image_flags=batch.image_flags,
                    labels=batch.labels, loss_weight=batch.loss_weight)  # fmt: skip
    return float(out.loss_sum)


def packed_equals_per_sample(size: Size, device: torch.device) -> tuple[float, float, int]:
    """Loss sum of one packed row, and the sum over its samples run alone (same kernel)."""
    model = build(size, "stage2", checkpointing=False, device=device).eval()
    batch = packed_batch(model, 1, size.row_tokens, size.row_tiles, seed=99).to(device)
    packed = loss_sum(model, batch, size.precision)
    singles = split_samples(batch, model)
    alone = sum(loss_sum(model, single, size.precision) for single in singles)
    del model
    gc.collect()
    return packed, alone, len(singles)


def time_call(fn, device: torch.device, repeats: int = 5) -> float:  # noqa: ANN001
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def attention_timing(size: Size, kernel: str, device: torch.device) -> dict[str, float] | None:
    """Forward+backward of one attention layer over a packed row, three ways (CUDA, varlen)."""
    if device.type != "cuda" or kernel != attention.TORCH_VARLEN:
        return None
    heads, head_dim = 12, 128
    batch = synthetic_rows(256, 1000, 28, 1, size.row_tokens, size.row_tiles, seed=5)
    cu = batch.cu_seqlens.to(device)
    lengths = torch.diff(batch.cu_seqlens).tolist()
    total = size.row_tokens
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))  # fmt: skip

    def varlen() -> None:
        function = attention.torch_varlen_function()
        attention.varlen_call(function, q, k, v, cu, max(lengths), None).sum().backward()

    def per_sample() -> None:
        outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)),
                                               is_causal=True)
                for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True)]  # fmt: skip
        torch.cat([o[0].transpose(0, 1) for o in outs]).sum().backward()

    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))  # fmt: skip
    position = torch.arange(total, device=device)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])

    def dense() -> None:
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                             attn_mask=mask)  # fmt: skip
        out.sum().backward()

    return {"varlen": time_call(varlen, device), "per_sample": time_call(per_sample, device),
            "dense": time_call(dense, device), "samples": len(lengths)}  # fmt: skip


def loader_rate(size: Size, root: Path, workers: int) -> float:
    """Tiles/s the loader delivers from real JPEGs (wall clock: workers run in parallel)."""
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    add_internvl_tokens(tokenizer)
    meta = root / "meta.json"
    tile = size.shape.tile
    per_tile = (tile // 14) ** 2 // 4
    facts = RunFacts.from_tokenizer(tokenizer, tile_size=tile, num_image_token=per_tile,
                                    template="internvl2_5")  # fmt: skip
    sample = SampleConfig(max_seq_length=size.row_tokens, max_dynamic_patch=size.max_dynamic_patch,
                          cache_dir=str(root / "cache"))  # fmt: skip
    packing = PackingConfig(max_packed_tokens=size.row_tokens, num_images_expected=size.row_tiles)
    stream = StreamConfig(num_workers=workers, replacement=True)
    loader = build_dataloader(build_sources(meta, sample, facts, tokenizer), packing, facts, stream,
                              0, 1)  # fmt: skip
    iterator = iter(loader)
    next(iterator)  # workers started, first batch out
    tiles, start = 0, time.perf_counter()
    while time.perf_counter() - start < size.loader_seconds:
        tiles += next(iterator).stats.num_tiles
    return tiles / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (test suite)")
    args = parser.parse_args()
    size = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: a second spinning thread only slows them
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("bench/gpu.py needs a CUDA device (use --smoke on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernel, reason = attention.select_attention("auto", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, attention {kernel} ({reason})", flush=True)
    ceiling = gemm_tflops(device, size.gemm, dtype)
    peak = peak_tflops(device)
    print(f"GEMM {size.gemm}^3 {str(dtype)[6:]}: {ceiling:.0f} TFLOP/s achieved, "
          f"peak {peak:.0f} TFLOP/s", flush=True)  # fmt: skip

    results = {}
    for stage in ("stage1", "stage2"):
        for checkpointing in (False, True):
            r = run_stage(size, stage, checkpointing, device, peak)
            results[(stage, checkpointing)] = r
            label = f"{stage} checkpointing {'on ' if checkpointing else 'off'}"
            if r.get("oom"):
                print(f"{label}: out of memory (peak {r['peak_gib']:.1f} GiB)", flush=True)
                continue
            print(
                f"{label}: step {r['step']:.3f} s (median, {r['step_min']:.3f}-"
                f"{r['step_max']:.3f}), {r['tokens_per_second']:,.0f} tokens/s, "
                f"{r['tiles_per_second']:.1f} tiles/s, MFU {r['mfu']:.3f} "
                f"(ViT {r['mfu_vit']:.3f} + LLM {r['mfu_llm']:.3f}), "
                f"peak memory {r['peak_gib']:.1f} GiB "
                f"({r['tokens']:.0f} tokens, {r['tiles']:.0f} tiles/row)",
                flush=True,
            )

    packed, alone, count = packed_equals_per_sample(size, device)
    relative = abs(packed - alone) / abs(alone)
    tolerance = 1e-2 if size.precision == "bf16" else 1e-5
    print(f"packed vs per-sample loss sum ({kernel}, {size.precision}): {packed:.4f} vs "
          f"{alone:.4f} over {count} samples, relative difference {relative:.2e} "
          f"({'equal' if relative < tolerance else 'DIFFERENT'} within {tolerance:g})",
          flush=True)  # fmt: skip

    timing = attention_timing(size, kernel, device)
    if timing is not None:
        print(f"attention fwd+bwd, one layer, {timing['samples']} segments in "
              f"{size.row_tokens} tokens: varlen {timing['varlen'] * 1e3:.2f} ms, per-sample sdpa "
              f"{timing['per_sample'] * 1e3:.2f} ms, dense block-diagonal sdpa "
              f"{timing['dense'] * 1e3:.2f} ms (varlen/per-sample "
              f"{timing['varlen'] / timing['per_sample']:.2f})", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photo_dataset(root, num_records=200, sizes=size.photo_sizes)
        rates = [f"{w} workers {loader_rate(size, root, w):.1f}" for w in size.loader_workers]
        print(f"loader tiles/s on real JPEGs {size.photo_sizes}: " + ", ".join(rates), flush=True)

    done = [r for (stage, _), r in results.items() if stage == "stage2" and not r.get("oom")]
    best = max((r["mfu"] for r in done), default=0.0)
    print(f"MFU {best:.2f} (target 0.45)")


if __name__ == "__main__":
    main()
