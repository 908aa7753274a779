"""Run a recipe: stages in order, each stage's exported model feeding the next.

    recipe.toml: [pipeline] output_dir, stages = ["stage1", "stage1_5", "stage2"]
                 [stages.<name>.<section>] ... one complete RunConfig per stage, inline,
                 or [stages.<name>] config = "../configs/<stage>.toml" (a stage file)
    stage output_dir: [stages.<name>.train] output_dir in the recipe, else
                      <[pipeline] output_dir>/<name>, else the stage file's, else
                      runs/pipeline/<name> (the recipe wins over its stage files)
    stage k (k > 0) without model.model_name_or_path, or with the one its stage file chains
    to (the previous stage file's own output_dir) -> the output_dir of stage k-1
    a stage whose output_dir holds training_complete.json is skipped if the config recorded
    there (config.resolved.json) is the one the recipe resolves now, else refused (or trained
    again with train.resume = "never"); a half-finished one resumes from its latest
    checkpoint (train.resume = "auto")

`pipeline --set section.key=value` changes every stage; `--set stages.NAME.section.key=value`
changes stage NAME only.

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
    to_dict,
    validate,
)
from vlpretrain.distributed.env import DistEnv
from vlpretrain.train.checkpoint.resume import RESUME_SAFE_FIELDS, changed_fields
from vlpretrain.train.loop import train
from vlpretrain.train.summary import FINAL_MARKER, RECORDED_CONFIG

logger = logging.getLogger(__name__)

HIGH_LR_FOR_LLM = 1e-3
"""Above this a stage that trains the whole LLM is flagged (the reference uses 4e-5; toy
models trained from scratch tolerate a few 1e-4)."""


OUTPUT_FROM_STAGE = "recipe [stages.{name}.train] output_dir"
OUTPUT_FROM_RECIPE = "recipe [pipeline] output_dir"
OUTPUT_FROM_STAGE_FILE = "stage file"
OUTPUT_FROM_DEFAULT = "default"
DEFAULT_OUTPUT_ROOT = Path("runs/pipeline")
MODEL_KEYS = ("model_name_or_path", "vision_path", "llm_path")


@dataclass(frozen=True)
class Stage:
    name: str
    config: RunConfig
    output_source: str = OUTPUT_FROM_DEFAULT
    """Where the stage's train.output_dir came from (printed by `pipeline --check-only`)."""


@dataclass(frozen=True)
class StageRaw:
    """One stage's raw config before overrides, and what its stage file said on its own."""

    raw: dict[str, Any]
    output_source: str
    file_output_dir: str | None
    """The stage file's own train.output_dir (where it writes when run alone), if any."""


def _stage_raw(recipe: dict[str, Any], name: str, index: int, previous: StageRaw | None,
               output_root: Path | None, base_dir: Path) -> StageRaw:  # fmt: skip
    raw = copy.deepcopy(recipe.get("stages", {}).get(name, {}))
    named_here = raw.get("train", {}).get("output_dir")
    named_model = any(raw.get("model", {}).get(key) for key in MODEL_KEYS)
    file_output_dir = None
    if "config" in raw:
        # A stage given as a complete stage file (configs/*.toml), relative to the recipe.
        from_file = load_toml(base_dir / raw.pop("config"))
        file_output_dir = from_file.get("train", {}).get("output_dir")
        # Inline tables refine the file's sections key by key (not a whole-section replace).
        for section, values in raw.items():
            from_file.setdefault(section, {}).update(values)
        raw = from_file
    source = _set_output_dir(raw.setdefault("train", {}), name, named_here, output_root)
    if index > 0 and previous is not None and not named_model:
        _chain_model(raw.setdefault("model", {}), previous)
    return StageRaw(raw, source, file_output_dir)


def _set_output_dir(
    train_section: dict[str, Any], name: str, named_here: Any, output_root: Path | None
) -> str:
    """Set the stage's output_dir; returns where it came from. The recipe owns its stages'
    outputs: a stage file's own output_dir (every shipped one sets it) would otherwise send a
    copied recipe's stages into the original experiment's directories."""
    if named_here:
        return OUTPUT_FROM_STAGE.format(name=name)
    if output_root is not None:
        train_section["output_dir"] = str(output_root / name)
        return OUTPUT_FROM_RECIPE
    if train_section.get("output_dir"):
        return OUTPUT_FROM_STAGE_FILE
    train_section["output_dir"] = str(DEFAULT_OUTPUT_ROOT / name)
    return OUTPUT_FROM_DEFAULT


def _chain_model(model: dict[str, Any], previous: StageRaw) -> None:
    """Start from the previous stage's output, unless the stage file names another model.

    A stage file that starts from its own previous stage file's output_dir means "the stage
    before me": in the recipe that is the previous stage's output_dir, wherever it is now.
    """
    previous_output = previous.raw["train"]["output_dir"]
    named = model.get("model_name_or_path")
    chained_by_file = (
        named is not None
        and previous.file_output_dir is not None
        and Path(named) == Path(previous.file_output_dir)
    )
    if chained_by_file or not any(model.get(key) for key in MODEL_KEYS):
        model["model_name_or_path"] = previous_output


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
    output_root = Path(pipeline["output_dir"]) if pipeline.get("output_dir") else None
    problems = unknown_stage_overrides(names, overrides)
    stages: list[Stage] = []
    previous: StageRaw | None = None
    for index, name in enumerate(names):
        if name not in recipe.get("stages", {}):
            problems.append(f"stage {name!r} is listed in [pipeline] but has no [stages.{name}]")
            continue
        try:
            stage_raw = _stage_raw(recipe, name, index, previous, output_root, base_dir)
        except ConfigError as error:
            problems.extend(f"stage {name}: {p}" for p in error.problems)
            continue
        raw = stage_raw.raw
        for assignment in overrides_for(name, overrides):
            apply_override(raw, assignment)
        try:
            config = build_run_config(raw)
        except ConfigError as error:
            problems.extend(f"stage {name}: {p}" for p in error.problems)
            continue
        stages.append(Stage(name, config, stage_raw.output_source))
        previous = StageRaw(
            {"train": {"output_dir": config.train.output_dir}},
            stage_raw.output_source,
            stage_raw.file_output_dir,
        )
    if problems:
        raise ConfigError(problems)
    return stages


STAGE_OVERRIDE = "stages."
"""Prefix of a --set that reaches one stage: stages.NAME.section.key=value."""


def split_stage_override(assignment: str) -> tuple[str | None, str]:
    """(stage name, section.key=value) of `stages.NAME.section.key=value`; (None, assignment)
    for a plain `section.key=value`, which reaches every stage."""
    if not assignment.startswith(STAGE_OVERRIDE):
        return None, assignment
    name, _, rest = assignment[len(STAGE_OVERRIDE) :].partition(".")
    return name, rest


def overrides_for(name: str, overrides: Sequence[str]) -> list[str]:
    """The assignments of stage `name`, in the order given (the last one wins)."""
    chosen = []
    for assignment in overrides:
        stage, rest = split_stage_override(assignment)
        if stage is None or stage == name:
            chosen.append(rest)
    return chosen


def unknown_stage_overrides(names: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """A problem for every stages.NAME.* assignment whose NAME is not a stage of the recipe."""
    problems = []
    for assignment in overrides:
        stage, _ = split_stage_override(assignment)
        if stage is not None and stage not in names:
            problems.append(
                f"--set {assignment!r}: no stage {stage!r} in [pipeline] stages "
                f"({', '.join(names)})"
            )
    return problems


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


@dataclass(frozen=True)
class StagePlan:
    """What the pipeline does with a stage: train it (fresh or resumed) or skip it."""

    stage: Stage
    skip: bool

    def describe(self) -> str:
        """One line: the output dir, where it came from, and the action."""
        action = "finished with the same config; skipped" if self.skip else "trains"
        output = self.stage.config.train.output_dir
        return f"stage {self.stage.name}: {output} ({self.stage.output_source}); {action}"


def plan_stages(stages: list[Stage]) -> list[StagePlan]:
    """Decide which stages train, before any does; raises one ConfigError for every finished
    stage whose recorded config differs from the recipe's (skipping it would reuse another
    experiment's result) and every finished stage behind one that trains again."""
    problems: list[str] = []
    plans: list[StagePlan] = []
    trains_before: Stage | None = None
    for stage in stages:
        output_dir = Path(stage.config.train.output_dir)
        fresh = stage.config.train.resume == "never"
        finished = (output_dir / FINAL_MARKER).exists()
        problem = _recorded_config_problem(stage) if finished else None
        if finished and trains_before is not None and not fresh:
            problem = problem or (
                f"stage {stage.name}: finished from stage {trains_before.name}'s earlier model "
                f"({output_dir}), but stage {trains_before.name} trains again now. "
                + _how_to_proceed(stage)
            )
        if problem is not None and not fresh:
            problems.append(problem)
        skip = finished and problem is None and not fresh
        plans.append(StagePlan(stage, skip))
        if not skip:
            trains_before = trains_before or stage
    if problems:
        raise ConfigError(problems)
    return plans


def _recorded_config_problem(stage: Stage) -> str | None:
    """Why a finished stage's recorded config is not the recipe's (None: it is)."""
    output_dir = Path(stage.config.train.output_dir)
    recorded = output_dir / RECORDED_CONFIG
    if not recorded.is_file():
        return (
            f"stage {stage.name}: {output_dir} holds a finished run but no {RECORDED_CONFIG}, "
            "so it cannot be told whether it was trained with this recipe's config. "
            + _how_to_proceed(stage)
        )
    saved = json.loads(recorded.read_text())
    # Fields that do not change what a step computes may differ (as on resume).
    ignored = RESUME_SAFE_FIELDS | set(stage.config.train.allow_changed_on_resume)
    changes = {
        key: values
        for key, values in changed_fields(saved, to_dict(stage.config)).items()
        if key not in ignored
    }
    if not changes:
        return None
    lines = "\n  - ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    return (
        f"stage {stage.name}: {output_dir} holds a run finished with another config (recorded "
        f"in {recorded}; this recipe's differs):\n  - {lines}\n" + _how_to_proceed(stage)
    )


def _how_to_proceed(stage: Stage) -> str:
    return (
        "Give the recipe a fresh [pipeline] output_dir (or this stage "
        f"[stages.{stage.name}.train] output_dir), or train this stage again in place with "
        f"[stages.{stage.name}.train] resume = 'never' (train.resume = 'never'; the earlier "
        "run is moved aside)."
    )


def run_pipeline(stages: list[Stage], env: DistEnv) -> dict[str, dict[str, Any]]:
    """Train each unfinished stage in order; returns each stage's final metrics."""
    results = {}
    for plan in plan_stages(stages):
        stage = plan.stage
        output_dir = stage.config.train.output_dir
        if plan.skip:
            logger.info("stage %s already finished in %s; skipping", stage.name, output_dir)
            marker = Path(output_dir) / FINAL_MARKER
            results[stage.name] = {**json.loads(marker.read_text()), "skipped": True}
            continue
        logger.info("stage %s -> %s (%s)", stage.name, output_dir, stage.output_source)
        results[stage.name] = train(stage.config, env)
    return results


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> list[Stage]:
    return build_stages(load_toml(path), overrides, Path(path).parent)
