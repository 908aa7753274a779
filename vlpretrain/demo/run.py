"""`vlpretrain demo`: the whole three-stage recipe on a generated dataset, on CPU, in minutes.

    make_shapes_dataset --> data/ (captions, QA, held-out eval, meta files, planted bad records)
    assets/vit, assets/llm (shipped, pretrained) --copy--> components/ (Path B inputs)
    assets/recipe.toml (placeholders filled) --> stage1 -> stage1_5 -> stage2
    after each stage (and before the first): captions and answers on held-out images
        --> caption accuracy per attribute, QA accuracy per question type
    stage 2 again with blank images (ablation); majority answer per type (image-blind)
    --> tables, loss_curves.png, accuracy.png, samples.html, summary.json

Each stage is judged on its own job: stages 1 and 1.5 train on captions, stage 2 on
questions. Rerunning skips finished stages. The components are package data made once by
tools/make_demo_components.py (the same files on every machine), and so is the recipe, so the
demo runs from an installed wheel. bench/demo_figures.py repeats the demo for several seeds and
reports medians with ranges.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib
import torch

from vlpretrain.config import ConfigError
from vlpretrain.data.check import run_check
from vlpretrain.demo.evaluate import EvalItem, StageEval, eval_items, evaluate_model, read_jsonl
from vlpretrain.demo.report import StageResult, format_tables, plot_accuracy, write_samples_html
from vlpretrain.distributed.env import DistEnv, barrier
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import build_model, read_run_facts
from vlpretrain.packages import require
from vlpretrain.pipeline import Stage, build_stages, check_stages, run_pipeline
from vlpretrain.plots import PLOTS_EXTRA, plot_metrics
from vlpretrain.testing.shapes import SQUARE, majority_by_type
from vlpretrain.testing.synthetic import ShapesDataset, make_shapes_dataset

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

ASSETS = resources.files("vlpretrain.demo") / "assets"
"""Package data: recipe.toml and the pretrained components (vit/, llm/, components.json)."""
UNTRAINED = "untrained"
ABLATION = "stage2, blank image"
BLIND = "image-blind (majority per type)"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo's data and components; the stages' settings live in the recipe."""

    seed: int = 0
    num_caption: int = 2000
    num_qa: int = 3000
    num_eval: int = 300
    """Held-out images; each gets one question (50 per type) and one caption request."""
    image_size: int = 48
    """Square images, one tile each: 6x6 patches of 8 px, a 3x3 grid of LLM tokens."""
    held_out_fraction: float = 0.1
    """As the shipped components were pretrained: no component saw an evaluated layout."""
    max_steps: int | None = None
    """Override every stage's steps (quick runs)."""


def fill_placeholders(value: Any, mapping: dict[str, str]) -> Any:
    """Replace {name} placeholders in every string of a nested dict/list."""
    if isinstance(value, dict):
        return {k: fill_placeholders(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, mapping) for v in value]
    if isinstance(value, str):
        for name, replacement in mapping.items():
            value = value.replace("{" + name + "}", replacement)
    return value


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Clock:
    """Wall and CPU seconds per phase, in the order the phases ran."""

    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    _start: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), cpu_seconds())

    def stop(self, phase: str) -> float:
        wall, cpu = time.perf_counter() - self._start[0], cpu_seconds() - self._start[1]
        self.phases[phase] = (wall, cpu)
        self.start()
        return wall


def make_data(output: Path, config: DemoConfig) -> ShapesDataset:
    return make_shapes_dataset(
        output / "data",
        config.seed,
        num_caption=config.num_caption,
        num_qa=config.num_qa,
        num_eval=config.num_eval,
        image_size=config.image_size,
        aspects=SQUARE,
        held_out_fraction=config.held_out_fraction,
        max_dynamic_patch=1,
        max_turns=6,
        balanced_questions=True,
    )


def copy_components(output: Path) -> Path:
    """components/: the shipped pretrained components (vit/, llm/, components.json), copied.

    A components/ that holds anything else (a demo of another version made its own) is refused
    rather than mixed with stages trained from other weights.
    """
    components = output / "components"
    shipped = (ASSETS / "components.json").read_text()
    if not components.exists():
        partial = output / f"components.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        _copy_asset(ASSETS, partial, skip="recipe.toml")
        try:
            partial.rename(components)
        except OSError:  # another rank copied it first
            shutil.rmtree(partial)
    record = components / "components.json"
    if not record.exists() or record.read_text() != shipped:
        raise ConfigError([f"{components} holds other components than the shipped ones "
                           "(an older demo pretrained its own); give another --output or "
                           "delete it"])  # fmt: skip
    return components


def _copy_asset(source: Traversable, target: Path, skip: str = "") -> None:
    """Copy a package-data file or folder (an importlib Traversable) to `target`."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            if child.name != skip:
                _copy_asset(child, target / child.name)
    else:
        with source.open("rb") as reader, open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer)


def untrained_model(stage: Stage, output: Path) -> Path:
    """Stage 1's starting point (fresh projector) saved so it can be evaluated as a baseline."""
    directory = output / "stages" / "stage0_untrained"
    if not (directory / "config.json").exists():
        torch.manual_seed(stage.config.train.seed)  # as the training loop seeds its build
        built = build_model(stage.config.model)
        save_internvl(built.model, built.tokenizer, directory,
                      image_settings=stage.config.data.image_settings())  # fmt: skip
    return directory


def check_data(stage: Stage, components: Path) -> None:
    """`vlpretrain data check` on stage 1's data: shows the planted bad records being caught."""
    facts = read_run_facts(stage.config.model)
    run_check(
        stage.config.train.meta_path, str(components / "llm"), stage.config.data, facts, workers=1
    )


def last_loss(metrics_path: Path) -> float | None:
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    return json.loads(lines[-1])["loss"] if lines else None


def _result(name: str, evaluation: StageEval, *, params: int = 0, steps: int = 0,
            final_loss: float | None = None, seconds: float = 0.0) -> StageResult:  # fmt: skip
    return StageResult(
        stage=name,
        num_trainable_params=params,
        num_steps=steps,
        final_loss=final_loss,
        qa_by_type=evaluation.qa_by_type,
        caption_by_attribute=evaluation.caption_by_attribute,
        seconds=seconds,
    )


def run_demo(
    output: str | Path, env: DistEnv, config: DemoConfig = DemoConfig()
) -> list[StageResult]:
    """Generate data, run the recipe from the shipped components, evaluate each stage, report."""
    # The report at the end draws with matplotlib: refuse now rather than after the training.
    require("matplotlib.figure", "the demo's report (loss curves, accuracy bars)", PLOTS_EXTRA)
    output = Path(output).resolve()
    clock = Clock()
    clock.start()
    data = make_data(output, config)
    components = copy_components(output)
    clock.stop("dataset")
    mapping = {"data": str(data.root), "components": str(components), "output": str(output)}
    recipe_text = (ASSETS / "recipe.toml").read_text(encoding="utf-8")
    recipe = fill_placeholders(tomllib.loads(recipe_text), mapping)
    overrides = [f"train.max_steps={config.max_steps}"] if config.max_steps else []
    overrides.append(f"train.seed={config.seed}")
    stages = build_stages(recipe, overrides)
    for warning in check_stages(stages, env.world_size):
        logger.warning(warning)
    items = eval_items(data.eval_path, data.eval_captions_path, data.root)
    evaluations: dict[str, StageEval] = {}
    results = []
    if env.is_main:
        check_data(stages[0], components)
        clock.stop("data check")
        evaluations[UNTRAINED] = evaluate_model(untrained_model(stages[0], output), items)
        results.append(_result(UNTRAINED, evaluations[UNTRAINED]))
        clock.stop("eval untrained")
    for stage in stages:
        final = run_pipeline([stage], env)[stage.name]
        barrier()
        seconds = clock.stop(stage.name)
        if not env.is_main:
            continue
        stage_dir = Path(stage.config.train.output_dir)
        evaluations[stage.name] = evaluate_model(stage_dir, items)
        results.append(
            _result(stage.name, evaluations[stage.name], params=final["trainable_params"],
                    steps=stage.config.train.max_steps,
                    final_loss=last_loss(stage_dir / "metrics.jsonl"), seconds=seconds)
        )  # fmt: skip
        clock.stop(f"eval {stage.name}")
    if env.is_main:
        last_dir = Path(stages[-1].config.train.output_dir)
        ablation = evaluate_model(last_dir, items, captions=False, blank=True)
        results.append(_result(ABLATION, ablation))
        majority = majority_by_type(read_jsonl(data.eval_path))
        blind = StageEval(
            qa_by_type={kind: right / total for kind, (right, total) in majority.items()}
        )
        results.append(_result(BLIND, blind))
        clock.stop("eval ablation")
        _report(results, stages, output, items, evaluations, clock)
    return results


def _report(
    results: list[StageResult],
    stages: list[Stage],
    output: Path,
    items: list[EvalItem],
    evaluations: dict[str, StageEval],
    clock: Clock,
) -> None:
    metrics = {s.name: Path(s.config.train.output_dir) / "metrics.jsonl" for s in stages}
    plot_metrics(metrics, output / "loss_curves.png", panels=("loss", "learning rate"))
    plot_accuracy(results, output / "accuracy.png")
    write_samples_html(items, evaluations, output / "samples.html")
    total_wall = sum(wall for wall, _ in clock.phases.values())
    total_cpu = sum(cpu for _, cpu in clock.phases.values())
    summary = {
        "stages": [asdict(r) for r in results],
        "phases": {name: {"wall_s": w, "cpu_s": c} for name, (w, c) in clock.phases.items()},
        "wall_s": total_wall,
        "cpu_s": total_cpu,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_tables(results))
    phases = ", ".join(f"{name} {w:.0f}s/{c:.0f}s" for name, (w, c) in clock.phases.items())
    print(f"\ntime (wall/cpu): {phases}; total {total_wall:.0f}s wall, {total_cpu:.0f}s cpu")
    print(f"loss curves: {output / 'loss_curves.png'}\naccuracy:    {output / 'accuracy.png'}")
    print(f"samples:     {output / 'samples.html'}")
