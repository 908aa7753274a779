"""Run a recipe: stages in order, each stage's exported model feeding the next.

    recipe.toml: [pipeline] output_dir, stages = ["stage1", "stage1_5", "stage2"]
                 [stages.<name>.<section>] ... one complete RunConfig per stage, inline,
                 or [stages.<name>] config = "../configs/<stage>.toml" (a stage file)
    stage k (k > 0) without model.model_name_or_path -> the output_dir of stage k-1
    a stage whose output_dir holds training_complete.json is skipped; a half-finished one
    resumes from its latest checkpoint (train.resume = "auto")

Every stage's config is built and checked before the first step runs, so a typo in stage 2
fails in seconds rather than after stage 1's hours.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpretrain.config import (
    ConfigError,
    RunConfig,
    apply_override,
    build_run_config,
    load_toml,
    validate,
)
from vlpretrain.distributed.env import DistEnv
from vlpretrain.train.loop import FINAL_MARKER, train

logger = logging.getLogger(__name__)

HIGH_LR_FOR_LLM = 1e-3
"""Above this a stage that trains the whole LLM is flagged (the reference uses 4e-5; toy
models trained from scratch tolerate a few 1e-4)."""


@dataclass(frozen=True)
class Stage:
    name: str
    config: RunConfig


def _stage_raw(recipe: dict[str, Any], name: str, index: int, previous_output: str | None,
               output_root: Path, base_dir: Path) -> dict[str, Any]:  # fmt: skip
    raw = copy.deepcopy(recipe.get("stages", {}).get(name, {}))
    if "config" in raw:
        # A stage given as a complete stage file (configs/*.toml), relative to the recipe.
        from_file = load_toml(base_dir / raw.pop("config"))
        # Inline tables refine the file's sections key by key (not a whole-section replace).
        for section, values in raw.items():
            from_file.setdefault(section, {}).update(values)
        raw = from_file
    train_section = raw.setdefault("train", {})
    train_section.setdefault("output_dir", str(output_root / name))
    model = raw.setdefault("model", {})
    if index > 0 and not any(
        model.get(k) for k in ("model_name_or_path", "vision_path", "llm_path")
    ):
        model["model_name_or_path"] = previous_output
    return raw


def build_stages(
    recipe: dict[str, Any], overrides: Sequence[str] = (), base_dir: Path = Path(".")
) -> list[Stage]:
    """Every stage's RunConfig; raises one ConfigError naming every problem of every stage.

    `base_dir` resolves `[stages.NAME] config = "file.toml"` entries (the recipe's folder).
    """
    pipeline = recipe.get("pipeline", {})
    names = pipeline.get("stages", [])
    if not names:
        raise ConfigError(["[pipeline] stages must list at least one stage"])
    output_root = Path(pipeline.get("output_dir", "runs/pipeline"))
    problems, stages, previous = [], [], None
    for index, name in enumerate(names):
        if name not in recipe.get("stages", {}):
            problems.append(f"stage {name!r} is listed in [pipeline] but has no [stages.{name}]")
            continue
        try:
            raw = _stage_raw(recipe, name, index, previous, output_root, base_dir)
        except ConfigError as error:
            problems.extend(f"stage {name}: {p}" for p in error.problems)
            continue
        for assignment in overrides:
            apply_override(raw, assignment)
        try:
            config = build_run_config(raw)
        except ConfigError as error:
            problems.extend(f"stage {name}: {p}" for p in error.problems)
            continue
        stages.append(Stage(name, config))
        previous = config.train.output_dir
    if problems:
        raise ConfigError(problems)
    return stages


def check_stages(stages: list[Stage], world_size: int) -> list[str]:
    """Validate each stage (paths that will exist only after an earlier stage are allowed);
    returns warnings about settings that look wrong for the stage's role."""
    problems: list[str] = []
    warnings: list[str] = []
    produced = set()
    for stage in stages:
        config = stage.config
        try:
            validate(config, world_size)
        except ConfigError as error:
            pending = f"model.model_name_or_path {config.model.model_name_or_path} does not exist"
            problems.extend(
                f"stage {stage.name}: {p}"
                for p in error.problems
                if not (p == pending and config.model.model_name_or_path in produced)
            )
        produced.add(config.train.output_dir)
        warnings.extend(f"stage {stage.name}: {w}" for w in _role_warnings(config))
    if problems:
        raise ConfigError(problems)
    return warnings


def _role_warnings(config: RunConfig) -> list[str]:
    warnings = []
    trains_llm = not config.freeze.freeze_llm and not config.freeze.use_llm_lora
    if trains_llm and config.optim.learning_rate > HIGH_LR_FOR_LLM:
        warnings.append(
            f"trains the whole LLM at learning rate {config.optim.learning_rate:g} "
            f"(> {HIGH_LR_FOR_LLM:g}); the reference's full-tuning stage uses 4e-5"
        )
    if config.model.vision_path and not (
        config.freeze.freeze_backbone and config.freeze.freeze_llm
    ):
        warnings.append(
            "starts from separate ViT and LLM (Path B) but does not freeze both: the usual "
            "first stage trains only the projector"
        )
    return warnings


def run_pipeline(stages: list[Stage], env: DistEnv) -> dict[str, dict[str, Any]]:
    """Train each unfinished stage in order; returns each stage's final metrics."""
    results = {}
    for stage in stages:
        marker = Path(stage.config.train.output_dir) / FINAL_MARKER
        if marker.exists():
            logger.info(
                "stage %s already finished in %s; skipping",
                stage.name,
                stage.config.train.output_dir,
            )
            results[stage.name] = {**json.loads(marker.read_text()), "skipped": True}
            continue
        logger.info("stage %s -> %s", stage.name, stage.config.train.output_dir)
        results[stage.name] = train(stage.config, env)
    return results


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> list[Stage]:
    return build_stages(load_toml(path), overrides, Path(path).parent)
