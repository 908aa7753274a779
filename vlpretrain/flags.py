"""The reference trainer's command-line flags, mapped onto RunConfig keys in one table.

Lets users keep their InternVL stage shell scripts: `vlpretrain train --vision_path ...
--freeze_llm True ...`. Values use the reference's syntax (`True`/`False`, bare numbers,
quoted strings). Flags that only steered HF Trainer/DeepSpeed plumbing we do not have are
accepted and ignored (listed in IGNORED with the reason), so nothing is silently misread.
--evaluation_strategy and --eval_steps keep HF Trainer's meaning (eval.steps); the reference
passes no evaluation data, so --eval_meta_path, ours, names it (eval.meta).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlpretrain.config import ConfigError, TrainConfig, parse_override_value
from vlpretrain.distributed.parallel import DistConfig

FLAG_TABLE: dict[str, str] = {
    # model
    "model_name_or_path": "model.model_name_or_path",
    "vision_path": "model.vision_path",
    "llm_path": "model.llm_path",
    "mlp_path": "model.mlp_path",
    "drop_path_rate": "model.drop_path_rate",
    "force_image_size": "model.force_image_size",
    "down_sample_ratio": "model.down_sample_ratio",
    "ps_version": "model.ps_version",
    "vision_select_layer": "model.vision_select_layer",
    "conv_style": "model.conv_style",
    "use_fast_tokenizer": "model.use_fast_tokenizer",
    "trust_remote_code": "model.trust_remote_code",
    # freeze
    "freeze_llm": "freeze.freeze_llm",
    "freeze_backbone": "freeze.freeze_backbone",
    "freeze_mlp": "freeze.freeze_mlp",
    "unfreeze_vit_layers": "freeze.unfreeze_vit_layers",
    "unfreeze_lm_head": "freeze.unfreeze_lm_head",
    "use_backbone_lora": "freeze.use_backbone_lora",
    "use_llm_lora": "freeze.use_llm_lora",
    # data
    "max_seq_length": "data.max_seq_length",
    "dynamic_image_size": "data.dynamic_image_size",
    "use_thumbnail": "data.use_thumbnail",
    "min_dynamic_patch": "data.min_dynamic_patch",
    "max_dynamic_patch": "data.max_dynamic_patch",
    "min_num_frame": "data.min_num_frame",
    "max_num_frame": "data.max_num_frame",
    "normalize_type": "data.normalize_type",
    "pad2square": "data.pad2square",
    # packing and stream
    "num_images_expected": "packing.num_images_expected",
    "max_packed_tokens": "packing.max_packed_tokens",
    "max_buffer_size": "packing.max_buffer_size",
    "strict_mode": "packing.strict_mode",
    "allow_overflow": "packing.allow_overflow",
    "loss_reduction": "packing.loss_reduction",
    "per_device_train_batch_size": "packing.rows_per_batch",
    "replacement": "stream.replacement",
    "use_data_resampling": "stream.use_data_resampling",
    "dataloader_num_workers": "stream.num_workers",
    # optimizer
    "learning_rate": "optim.learning_rate",
    "weight_decay": "optim.weight_decay",
    "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio",
    "lr_scheduler_type": "optim.lr_scheduler_type",
    "max_grad_norm": "optim.max_grad_norm",
    "adam_beta1": "optim.adam_beta1",
    "adam_beta2": "optim.adam_beta2",
    "adam_epsilon": "optim.adam_epsilon",
    # train
    "meta_path": "train.meta_path",
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "logging_steps": "train.logging_steps",
    # Whether the LLM is checkpointed; train.llm_checkpointing 'auto' then means full (or none).
    "grad_checkpoint": "train.grad_checkpoint",
    "loss_reduction_all_gather": "train.loss_reduction_all_gather",
    # Not a reference flag: the reference passes no evaluation data (eval_dataset=None).
    "eval_meta_path": "eval.meta",
}

IGNORED: dict[str, str] = {
    "save_strategy": "checkpoints are step based (save_steps)",
    "do_train": "always trains",
    "group_by_length": "packing replaces length grouping",
    "remove_unused_columns": "batches are typed records, nothing to strip",
    "use_packed_ds": "always packed",
    "log_freq": "packing statistics are logged every logging_steps",
    "use_liger": "our loss never materialises full logits",
    "dataloader_persistent_workers": "StatefulDataLoader manages workers",
}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


def _value(text: str) -> Any:
    lowered = text.strip()
    if lowered in ("True", "False"):
        return _bool(lowered)
    value = parse_override_value(lowered)
    return value


SPECIAL: dict[str, Callable[[dict[str, Any], str], None]] = {}

EVALUATION_FLAGS = ("evaluation_strategy", "eval_steps")
"""Read together after every other flag (_evaluation): one's meaning depends on the other."""


def _evaluation(raw: dict[str, Any], values: dict[str, str]) -> None:
    """--evaluation_strategy and --eval_steps as HF Trainer reads them: 'no' never evaluates
    (eval_steps is then ignored), 'steps' every eval_steps optimizer steps, which default to
    logging_steps; 'epoch' has no meaning in an endless packed stream and is refused."""
    strategy = _value(values.get("evaluation_strategy", "no"))
    if strategy == "no":
        if "evaluation_strategy" in values:
            raw.setdefault("eval", {})["steps"] = 0
        return
    if strategy != "steps":
        raise ValueError(
            f"--evaluation_strategy {strategy!r}: use 'steps' (with --eval_steps N) or 'no'; "
            "the packed stream has no epochs to end"
        )
    train = raw.get("train", {})
    steps = _value(values["eval_steps"]) if "eval_steps" in values else None
    if steps is None:
        steps = train.get("logging_steps", TrainConfig.logging_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"--eval_steps {steps!r}: give a whole number of steps >= 1 (a fraction of the run "
            "is not supported)"
        )
    raw.setdefault("eval", {})["steps"] = steps


def _bf16(raw: dict[str, Any], text: str) -> None:
    raw.setdefault("train", {})["precision"] = "bf16" if _bool(text) else "fp32"


def _deepspeed(raw: dict[str, Any], text: str) -> None:
    mapped = DistConfig.from_deepspeed(text)
    raw["dist"] = {
        "strategy": mapped.strategy,
        "reshard_after_forward": mapped.reshard_after_forward,
        "cpu_offload": mapped.cpu_offload,
    }


def _seed(raw: dict[str, Any], text: str) -> None:
    # The reference's seed also drives its data workers' randomness: set both.
    seed = int(text)
    raw.setdefault("train", {})["seed"] = seed
    raw.setdefault("stream", {})["seed"] = seed


def _overwrite_output_dir(raw: dict[str, Any], text: str) -> None:
    # The reference resumes from output_dir's last checkpoint only when this is False; its
    # scripts pass True, so they always start from scratch. An explicit checkpoint
    # (--resume_from_checkpoint, train.resume = DIR) wins in both.
    train = raw.setdefault("train", {})
    if train.get("resume", "auto") in ("auto", "never"):
        train["resume"] = "never" if _bool(text) else "auto"


def _resume_from_checkpoint(raw: dict[str, Any], text: str) -> None:
    raw.setdefault("train", {})["resume"] = text


def _report_to(raw: dict[str, Any], text: str) -> None:
    # The reference takes one name or several (`--report_to wandb`, 'all', 'none'); several
    # come here comma-separated. A backend we lack is refused by the config with the valid ones.
    names = [name.strip() for name in text.split(",") if name.strip()]
    raw.setdefault("train", {})["report_to"] = names or ["none"]


SPECIAL.update(
    {
        "bf16": _bf16,
        "deepspeed": _deepspeed,
        "report_to": _report_to,
        "seed": _seed,
        "overwrite_output_dir": _overwrite_output_dir,
        "resume_from_checkpoint": _resume_from_checkpoint,
    }
)


def split_flags(argv: list[str]) -> list[tuple[str, str]]:
    """`--name value` / `--name=value` pairs; raises ConfigError on a dangling flag."""
    pairs, index = [], 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise ConfigError([f"unexpected argument {token!r} (flags look like --name value)"])
        if "=" in token:
            name, value = token[2:].split("=", 1)
            index += 1
        else:
            if index + 1 >= len(argv):
                raise ConfigError([f"flag {token} has no value"])
            name, value = token[2:], argv[index + 1]
            index += 2
        pairs.append((name, value))
    return pairs


def apply_reference_flags(raw: dict[str, Any], argv: list[str]) -> list[str]:
    """Fold reference flags into the nested config dict; returns notes on ignored flags.

    A run driven by reference flags trusts remote code as the reference does
    (model.trust_remote_code, unless the TOML or `--trust_remote_code False` says otherwise).
    """
    problems, notes = [], []
    evaluation: dict[str, str] = {}
    if argv:
        raw.setdefault("model", {}).setdefault("trust_remote_code", True)
    for name, text in split_flags(argv):
        if name in EVALUATION_FLAGS:
            evaluation[name] = text
        elif name in SPECIAL:
            try:
                SPECIAL[name](raw, text)
            except ValueError as error:
                problems.append(f"--{name}: {error}")
        elif name in FLAG_TABLE:
            section, key = FLAG_TABLE[name].split(".")
            try:
                raw.setdefault(section, {})[key] = _value(text)
            except ConfigError as error:  # a value nested too deeply: its own problem lines
                problems.extend(f"--{name}: {problem}" for problem in error.problems)
            except ValueError as error:
                problems.append(f"--{name}: {error}")
        elif name in IGNORED:
            notes.append(f"--{name} ignored: {IGNORED[name]}")
        else:
            known = sorted([*FLAG_TABLE, *SPECIAL, *IGNORED, *EVALUATION_FLAGS])
            problems.append(f"unknown flag --{name}; known flags: {', '.join(known)}")
    try:
        _evaluation(raw, evaluation)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ConfigError(problems)
    return notes
