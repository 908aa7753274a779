"""Benchmark: memory per training stage of the InternVL 2.5 recipes, counted and measured.

    counted   real shapes on the meta device (nothing allocated): InternViT-300M + Qwen2.5-0.5B
              (1B recipe), InternViT-300M + internlm2_5-7b-chat (8B recipe)
              --each stage file's freeze policy--> total and trainable parameters
              --> model-state bytes per rank under FSDP2 over 1 and 8 ranks: fp32 weights of
                  every parameter + fp32 gradients and AdamW's two fp32 moments of the trainable
                  ones, all sharded (divided by the world size)
    measured  1B shapes, each stage in a fresh subprocess: random weights
              --prepare_built_model (the stage file's freeze, checkpointing, bf16, FSDP2 on one
              CPU rank)--> --steps train_steps (build_optimizer's AdamW) on packed rows of
              --tokens tokens and --tiles tiles
              -> peak RSS (VmHWM) after the build and after the steps, and the step peak minus
                 the counted model states (what activations and temporaries cost at that row)

A stage whose counted states would not fit in MemAvailable is skipped with a note rather than
left to the OOM killer. Prints Markdown tables (docs/memory.md holds a measured copy).
Run: `PYTHONPATH=. python bench/stage_memory.py` (a few minutes on 2 cores);
`--smoke` runs tiny shapes for the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rss import rss_mib  # noqa: E402
from workload import (  # noqa: E402
    INTERNLM2_5_7B,
    INTERNVIT_300M,
    QWEN2_5_0_5B,
    ModelShape,
    packed_batch,
    random_vlm,
)

from vlpretrain.config import RunConfig, load_run_config  # noqa: E402
from vlpretrain.distributed.env import init_distributed, shutdown  # noqa: E402
from vlpretrain.model import attention  # noqa: E402
from vlpretrain.model.vision import VisionConfig  # noqa: E402
from vlpretrain.model.vlm import InternVLModel  # noqa: E402
from vlpretrain.train.freeze import apply_freeze_policy  # noqa: E402
from vlpretrain.train.loop import prepare_built_model, train_step  # noqa: E402
from vlpretrain.train.optim import build_optimizer  # noqa: E402

CONFIGS = HERE.parent / "configs"
STAGES = ("stage1", "stage1_5", "stage2")
WHAT_TRAINS = {"stage1": "projector", "stage1_5": "ViT + projector", "stage2": "everything"}
RECIPES = {
    "1B": ModelShape(vision=INTERNVIT_300M, llm=QWEN2_5_0_5B),
    "8B": ModelShape(vision=INTERNVIT_300M, llm=INTERNLM2_5_7B),
}
WORLD_SIZES = (1, 8)
BYTES_PER_TRAINABLE = 4 + 4 + 8
"""fp32 gradient + AdamW's exp_avg and exp_avg_sq (fp32) per trainable parameter; every
parameter also has its fp32 master weight (4 bytes)."""
BENCH_OVERRIDES = ("train.report_to=none", "train.resume=never")
GIB = 2**30
SMOKE_SHAPE = ModelShape(
    vision=VisionConfig(image_size=56, qkv_bias=True, hidden_size=64, num_attention_heads=4,
                        intermediate_size=128, qk_normalization=False, num_hidden_layers=2,
                        norm_type="layer_norm", initializer_factor=1.0),
    llm={**QWEN2_5_0_5B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    tile=56,
)  # fmt: skip


def stage_file(recipe: str, stage: str) -> Path:
    return CONFIGS / f"internvl2_5_{recipe.lower()}_{stage}.toml"


@dataclass(frozen=True)
class Counts:
    total: int
    trainable: int

    def model_state_bytes(self, world_size: int) -> float:
        """fp32 weights + fp32 grads + AdamW moments held per rank, FSDP2 over `world_size`."""
        return (4 * self.total + BYTES_PER_TRAINABLE * self.trainable) / world_size


def count_parameters(model: InternVLModel) -> Counts:
    parameters = list(model.parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return Counts(total=sum(p.numel() for p in parameters), trainable=trainable)


def counted_stage(shape: ModelShape, path: Path) -> Counts:
    """Parameters of `shape` under the freeze policy of the stage file at `path` (meta device)."""
    with torch.device("meta"):
        model = random_vlm(shape, "sdpa")
    apply_freeze_policy(model, load_run_config(path).freeze)
    return count_parameters(model)


def counted_table() -> list[str]:
    header = ["recipe", "stage", "trains", "parameters", "trainable"]
    header += [f"model states, {w} rank{'s' if w > 1 else ''}" for w in WORLD_SIZES]
    lines = [table_row(header), table_row(["---"] * len(header))]
    for recipe, shape in RECIPES.items():
        for stage in STAGES:
            counts = counted_stage(shape, stage_file(recipe, stage))
            states = [f"{counts.model_state_bytes(w) / GIB:.1f} GiB" for w in WORLD_SIZES]
            lines.append(table_row([recipe, stage, WHAT_TRAINS[stage], millions(counts.total),
                                    millions(counts.trainable), *states]))  # fmt: skip
    return lines


def millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M"


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def measured_config(stage: str, tokens: int, tiles: int) -> RunConfig:
    """The 1B stage file plus a row of `tokens` tokens and `tiles` tiles."""
    sizes = (f"packing.max_packed_tokens={tokens}", f"data.max_seq_length={tokens}",
             f"packing.num_images_expected={tiles}")  # fmt: skip
    return load_run_config(stage_file("1B", stage), (*BENCH_OVERRIDES, *sizes))


def measured_shape(args: argparse.Namespace) -> ModelShape:
    """The 1B shapes (tiny ones for --smoke), with --llm-layers decoder layers if given."""
    shape = SMOKE_SHAPE if args.smoke else RECIPES["1B"]
    if args.llm_layers is None:
        return shape
    return replace(shape, llm={**shape.llm, "num_hidden_layers": args.llm_layers})


def measure_stage(stage: str, args: argparse.Namespace) -> dict:
    """Run in the child: build, prepare and step the 1B model of one stage; RSS figures (MiB)."""
    env = init_distributed()
    tokens, tiles = args.tokens, args.tiles
    config = measured_config(stage, tokens, tiles)
    shape = measured_shape(args)
    kernel, _ = attention.select_attention(
        config.model.attn_implementation, env.device, config.train.precision == "bf16"
    )
    vision = replace(shape.vision, drop_path_rate=config.model.drop_path_rate)
    before = rss_mib("VmRSS")
    model = random_vlm(replace(shape, vision=vision), kernel, seed=config.train.seed)
    wrapped, _ = prepare_built_model(model, config, env)
    built_peak = rss_mib("VmHWM")
    counts = count_parameters(model)
    optimizer = build_optimizer(wrapped, config.optim)
    packing = config.packing
    start = time.perf_counter()
    for step in range(args.steps):
        batch = packed_batch(model, packing.rows_per_batch, tokens, tiles, seed=step)
        train_step(wrapped, optimizer, [batch], config, env)
    seconds = (time.perf_counter() - start) / args.steps
    result = {"before": before, "built_peak": built_peak, "step_peak": rss_mib("VmHWM"),
              "model_states": counts.model_state_bytes(1) / 2**20, "seconds": seconds,
              "kernel": kernel, "precision": config.train.precision,
              "llm_checkpointing": config.train.llm_checkpoint_mode,
              "vision_checkpointing": config.train.vision_checkpointing}  # fmt: skip
    shutdown()
    return result


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def estimated_peak_mib(counts: Counts) -> float:
    """What one CPU rank needs at least: the fp32 model states (all resident when the last
    backward ends) plus 1 GiB for the interpreter, activations and temporaries; more runs into
    the OOM killer, which the child's report names."""
    return counts.model_state_bytes(1) / 2**20 + 1024


def run_child(stage: str, args: argparse.Namespace) -> dict | str:
    """One stage's figures from a fresh process, or why there are none."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        stage,
        "--tokens",
        str(args.tokens),
        "--tiles",
        str(args.tiles),
        "--steps",
        str(args.steps),
    ]
    if args.smoke:
        command.append("--smoke")
    if args.llm_layers is not None:
        command += ["--llm-layers", str(args.llm_layers)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode < 0:  # the OOM killer's SIGKILL, among others
        return f"{stage}: killed by signal {-done.returncode} (out of memory?)"
    if done.returncode != 0:
        raise RuntimeError(f"{stage} exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_table(args: argparse.Namespace) -> list[str]:
    header = ["stage", "trains", "model states (counted)", "peak RSS after build",
              "peak RSS after steps", "steps minus model states", "s/step"]  # fmt: skip
    lines = [table_row(header), table_row(["---"] * len(header))]
    notes = []
    for stage in args.stages:
        counts = counted_stage(measured_shape(args), stage_file("1B", stage))
        states = counts.model_state_bytes(1) / 2**20
        needed = estimated_peak_mib(counts)
        if needed > available_mib():
            notes.append(f"{stage} skipped: needs at least {needed / 1024:.1f} GiB (model "
                         f"states + 1 GiB), MemAvailable is "
                         f"{available_mib() / 1024:.1f} GiB")  # fmt: skip
            continue
        outcomes = [run_child(stage, args) for _ in range(args.repeats)]
        runs = [r for r in outcomes if isinstance(r, dict)]
        notes += [r for r in outcomes if isinstance(r, str)]
        if not runs:
            continue
        peak = statistics.median(r["step_peak"] - r["before"] for r in runs)
        built = statistics.median(r["built_peak"] - r["before"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        lines.append(
            table_row(
                [
                    stage,
                    WHAT_TRAINS[stage],
                    f"{states / 1024:.2f} GiB",
                    f"{built / 1024:.2f} GiB",
                    f"{peak / 1024:.2f} GiB",
                    f"{(peak - states) / 1024:.2f} GiB",
                    f"{seconds:.0f}",
                ]
            )
        )
        first = runs[0]
        notes.append(
            f"{stage}: {first['precision']}, attention {first['kernel']}, checkpointing "
            f"ViT {first['vision_checkpointing']} / LLM {first['llm_checkpointing']}, "
            f"interpreter and imports {first['before'] / 1024:.2f} GiB (subtracted)"
        )
    return lines + [""] + notes


def parse_stages(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown stage(s) {unknown}; known: {STAGES}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--tiles", type=int, default=4, help="448 px tiles per packed row")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    parser.add_argument("--repeats", type=int, default=1, help="runs per stage (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (test suite)")
    parser.add_argument(
        "--llm-layers",
        type=int,
        help="LLM decoder layers of the measured model (default: the real 24)",
    )
    parser.add_argument(
        "--stages",
        type=parse_stages,
        default=STAGES,
        help=f"comma-separated stages to measure (default {','.join(STAGES)})",
    )
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_stage(args.child, args)))
        return
    print("Counted (real shapes, meta device): parameters and model states per rank, FSDP2\n")
    print("\n".join(counted_table()))
    shape = "tiny shapes" if args.smoke else "1B shapes"
    if args.llm_layers is not None:
        shape += f", {args.llm_layers} LLM layers"
    print(
        f"\nMeasured on CPU ({shape}, {args.steps} steps, rows of {args.tokens} tokens and "
        f"{args.tiles} tiles, median of {args.repeats}): RSS above the interpreter's\n"
    )
    print("\n".join(measured_table(args)))


if __name__ == "__main__":
    main()
