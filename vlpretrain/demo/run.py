"""`vlpretrain demo`: the whole three-stage recipe on a generated dataset, on CPU, in minutes.

    make_shapes_dataset --> data/ (captions, QA, eval, meta files, planted bad records)
    pretrain_vision / pretrain_llm --> components/vit, components/llm (Path B inputs)
    recipes/tiny_cpu.toml (placeholders filled) --> stage1 -> stage1_5 -> stage2
    after each stage: greedy answers on held-out questions --> accuracy
    --> summary table, loss_curves.png, accuracy.png, summary.json

Rerunning skips finished work (dataset, components and stages are reused).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vlpretrain.config import load_toml
from vlpretrain.data.check import run_check
from vlpretrain.data.templates import get_template
from vlpretrain.demo.pretrain import PretrainConfig, pretrain_llm, pretrain_vision
from vlpretrain.demo.report import StageResult, format_table, plot_accuracy, plot_loss_curves
from vlpretrain.demo.shapes import (
    caption_corpus,
    last_question_and_answer,
    score_answer,
    text_pretraining_corpus,
)
from vlpretrain.demo.synthetic import chance_accuracy, make_shapes_dataset
from vlpretrain.distributed.env import DistEnv, barrier
from vlpretrain.model.build import build_model, read_run_facts, save_internvl
from vlpretrain.pipeline import Stage, build_stages, check_stages, run_pipeline

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.toml"


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


def make_components(output: Path, config: PretrainConfig) -> Path:
    components = output / "components"
    if not (components / "vit" / "config.json").exists():
        pretrain_vision(config, components / "vit")
    if not (components / "llm" / "config.json").exists():
        system = get_template("internvl2_5").default_system
        texts = text_pretraining_corpus(config.seed, 3000, system)
        system_block = f"<|im_start|>system\n{system}<|im_end|>\n"
        corpus = caption_corpus(config.seed) + [system_block] * 200
        pretrain_llm(config, texts, corpus, components / "llm")
    return components


def evaluate(model_dir: Path, eval_path: Path, root: Path, limit: int) -> float:
    """Greedy accuracy (first word exact match) on held-out single-image questions."""
    from vlpretrain.chat import load

    chat_model = load(model_dir)
    records = [json.loads(line) for line in eval_path.read_text().splitlines()[:limit]]
    correct = 0
    for record in records:
        question, gold = last_question_and_answer(record)
        answer = chat_model.chat([str(root / record["image"])], question, max_new_tokens=4)
        correct += score_answer(answer, gold)
    return correct / len(records)


def untrained_model(stage: Stage, output: Path) -> Path:
    """Stage 1's starting point (fresh projector) saved so it can be evaluated as a baseline."""
    directory = output / "stages" / "stage0_untrained"
    if not (directory / "config.json").exists():
        built = build_model(stage.config.model)
        save_internvl(built.model, built.tokenizer, directory)
    return directory


def check_data(stage: Stage, components: Path) -> None:
    """`vlpretrain data check` on stage 1's data: shows the planted bad records being caught."""
    facts = read_run_facts(stage.config.model)
    run_check(
        stage.config.train.meta_path, str(components / "llm"), stage.config.data, facts, workers=2
    )


def last_loss(metrics_path: Path) -> float | None:
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    return json.loads(lines[-1])["loss"] if lines else None


def run_demo(output: str | Path, env: DistEnv, seed: int = 0, eval_limit: int = 120,
             max_steps: int | None = None,
             pretrain_steps: int | None = None) -> list[StageResult]:  # fmt: skip
    """Generate data and components, run the recipe, evaluate after each stage, report."""
    output = Path(output).resolve()
    data = make_shapes_dataset(output / "data", seed, num_caption=1500, num_qa=6000,
                               num_eval=eval_limit)  # fmt: skip
    pretrain = PretrainConfig(seed=seed)
    if pretrain_steps:
        pretrain = replace(pretrain, vision_steps=pretrain_steps, llm_steps=pretrain_steps)
    components = make_components(output, pretrain)
    mapping = {"data": str(data.root), "components": str(components), "output": str(output)}
    recipe = fill_placeholders(load_toml(RECIPE), mapping)
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    stages = build_stages(recipe, overrides)
    if env.is_main:
        check_data(stages[0], components)
    for warning in check_stages(stages, env.world_size):
        logger.warning(warning)
    results = [_baseline(stages[0], output, data, eval_limit)]
    for stage in stages:
        start = time.perf_counter()
        final = run_pipeline([stage], env)[stage.name]
        barrier()
        stage_dir = Path(stage.config.train.output_dir)
        accuracy = None
        if env.is_main:
            accuracy = evaluate(stage_dir, data.eval_path, data.root, eval_limit)
        result = StageResult(
            stage=stage.name,
            num_trainable_params=final["trainable_params"],
            num_steps=stage.config.train.max_steps,
            final_loss=last_loss(stage_dir / "metrics.jsonl"),
            eval_accuracy=accuracy,
            seconds=time.perf_counter() - start,
        )
        results.append(result)
    if env.is_main:
        _report(results, stages, output, chance_accuracy(_eval_records(data.eval_path)))
    return results


def _eval_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _baseline(stage: Stage, output: Path, data: Any, eval_limit: int) -> StageResult:
    directory = untrained_model(stage, output)
    accuracy = evaluate(directory, data.eval_path, data.root, eval_limit)
    return StageResult(stage="untrained", num_trainable_params=0, num_steps=0,
                       final_loss=None, eval_accuracy=accuracy, seconds=0.0)  # fmt: skip


def _report(results: list[StageResult], stages: list[Stage], output: Path, chance: float) -> None:
    metrics = {s.name: Path(s.config.train.output_dir) / "metrics.jsonl" for s in stages}
    plot_loss_curves(metrics, output / "loss_curves.png")
    plot_accuracy(results, output / "accuracy.png", chance=chance)
    table = format_table(results, chance=chance)
    (output / "summary.json").write_text(
        json.dumps({"chance_accuracy": chance, "stages": [asdict(r) for r in results]}, indent=2)
    )
    print(table)
    print(f"\nloss curves: {output / 'loss_curves.png'}\naccuracy:    {output / 'accuracy.png'}")
