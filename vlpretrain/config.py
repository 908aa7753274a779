"""RunConfig: compose the component configs; load TOML, apply --set and reference flags, validate.

    stage.toml --tomllib--> nested dict --(--set a.b=c)--> --(reference flags)--> RunConfig
    RunConfig --validate(world_size)--> one ValueError listing every problem
    RunConfig + RunFacts --describe--> show-config text (user settings, then derived facts)

Each section is the frozen dataclass that lives next to the code it configures. Unknown keys
and type mismatches are errors naming the key and the nearest valid ones; all problems of a
file are reported together. Facts that follow from the model and tokenizer (tile size, tokens
per tile, template, token ids) are not settings: they live in `vlpretrain.facts.RunFacts`, and
setting one is an error that says what it is derived from.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import signal
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import tomllib

from vlpretrain.data.build import SampleConfig
from vlpretrain.data.loader import StreamConfig
from vlpretrain.data.location import Location
from vlpretrain.data.packing import PackingConfig
from vlpretrain.distributed.parallel import DistConfig
from vlpretrain.errors import RefusedError
from vlpretrain.facts import RunFacts
from vlpretrain.files import read_user_text
from vlpretrain.model.build import ModelConfig
from vlpretrain.trackers import TrackerName
from vlpretrain.train.evaluate import EvalConfig
from vlpretrain.train.freeze import FreezeConfig
from vlpretrain.train.optim import OptimConfig

T = TypeVar("T")

CATCHABLE_SIGNALS = tuple(
    s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)
)
"""Signal names valid in train.preemption_signals (SIGKILL and SIGSTOP cannot be caught)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The run: data, length, cadences, precision, outputs."""

    meta_path: str = ""
    """Meta JSON of the training datasets (the reference's format)."""
    output_dir: str = "runs/stage"
    """Checkpoints, metrics and the exported model (the next stage's model_name_or_path)."""
    max_steps: int = 100
    """Optimizer steps."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (the loss is normalised over all of them)."""
    save_steps: int = 100
    """Resumable checkpoint cadence (the last step always saves)."""
    save_total_limit: int = 3
    """Checkpoints kept (older ones deleted)."""
    async_checkpoint: bool = False
    """Write checkpoints while training goes on: the tensors are copied to host memory (a
    second copy of this rank's model and optimizer shards in RAM while it lasts) and written
    in the background; the checkpoint is finished (hashed, renamed into place) at the next
    save or at the end of the stage. A crash before that loses that checkpoint, never an
    earlier one."""
    keep_replaced_runs: int = 1
    """Earlier runs kept after a fresh start (resume = 'never'), each in
    output_dir/replaced-<UTC time>/ with its checkpoints and metrics; older ones are deleted,
    and 0 deletes the earlier run at once."""
    logging_steps: int = 1
    """Metrics cadence in steps (stdout line, metrics.jsonl, trackers; the last step too)."""
    seed: int = 42
    """Seeds torch before the model is built (fresh projector, LoRA, dropout); the data order
    has its own stream.seed (the reference flag --seed sets both)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for forward/backward; weights and optimizer stay fp32."""
    save_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the exported model's weights; 'auto' follows `precision` (bf16 training, as in
    every shipped config, exports bf16 like the reference's checkpoints)."""
    grad_checkpoint: bool = True
    """Whether the LLM decoder layers are checkpointed at all [--grad_checkpoint]; how is
    llm_checkpointing. True with llm_checkpointing 'none', or False with 'selective' or
    'full', is a contradiction and refused."""
    llm_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"
    """Activation checkpointing of each LLM decoder layer: 'full' recomputes the layer in
    backward, 'selective' keeps the matmul and attention outputs and recomputes only the cheap
    ops between them (norms, activations), 'none' keeps everything; 'auto' follows
    grad_checkpoint (full when true, none when false)."""
    vision_checkpointing: Literal["none", "selective", "full"] = "full"
    """Activation checkpointing of each ViT layer, as llm_checkpointing ('full', the default,
    recomputes every layer in backward, frozen or not)."""
    compile: bool = False
    """torch.compile each ViT layer and each LLM decoder layer (one graph per layer type,
    dynamic shapes: packed rows of new lengths do not recompile)."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """torch.compile backend; aot_eager (no code generation, no speed-up) compiles in a
    fraction of the time and serves to check a model traces."""
    loss_reduction_all_gather: bool = True
    """Normalise the loss by the weight sum over all ranks and micro-batches of the step; False
    normalises each micro-batch by its local weight sum (the reference's per-rank mode)."""
    report_to: tuple[TrackerName, ...] = ("tensorboard",)
    """Experiment trackers fed on rank 0 besides metrics.jsonl (always written), one name or a
    list: 'tensorboard' (event files in output_dir), 'wandb' and 'mlflow' (extras
    vlpretrain[wandb] and vlpretrain[mlflow]; their run ids are kept in output_dir, so a resume
    continues the same tracker run), 'all' (every installed one) or 'none' [--report_to]."""
    resume: str = "auto"
    """'auto': latest checkpoint in output_dir if any; 'never'; or a checkpoint directory."""
    peak_tflops: float = 0.0
    """Per-device peak TFLOP/s for MFU (0: a known GPU's dense bf16 peak by name, else a bf16
    GEMM measured at start; on CPU no MFU is reported unless this is set)."""
    progress_bar: bool = True
    """A tqdm bar over the steps on rank 0."""
    max_nonfinite_steps: int = 5
    """Consecutive steps whose loss or gradient norm is NaN/inf (such a step is not applied:
    the weights and optimizer state stay, its data and LR step are consumed) before the run
    stops with an error; 1 stops at the first."""
    allow_changed_on_resume: tuple[str, ...] = ()
    """Config fields ('section.key') that may differ from the checkpoint's on resume; any other
    changed field is refused (operational ones such as logging_steps always may)."""
    collective_timeout_minutes: float = 10.0
    """A collective (all-reduce, barrier) waiting longer than this fails the run, and a step
    taking longer dumps every thread's stack to stderr (which rank waits where); a wait this
    long for the data loader's next micro-batch dumps the stacks and ends the run."""
    preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")
    """Signals that stop the run cleanly: every rank finishes its optimizer step, saves a
    checkpoint and exits with code 124 (resume continues from it); a second one exits at once.
    Empty: signals keep their usual effect."""
    preemption_grace_seconds: float = 90.0
    """After a preemption signal, the time allowed to finish the step and save; past it the
    process exits at once without a checkpoint (keep it below the scheduler's warning, e.g.
    Slurm's --signal=USR1@120)."""

    @property
    def llm_checkpoint_mode(self) -> Literal["none", "selective", "full"]:
        """The resolved llm_checkpointing ('auto' read through grad_checkpoint)."""
        if self.llm_checkpointing == "auto":
            return "full" if self.grad_checkpoint else "none"
        return self.llm_checkpointing

    @property
    def export_precision(self) -> Literal["fp32", "bf16"]:
        """The resolved save_dtype."""
        return self.precision if self.save_dtype == "auto" else self.save_dtype

    def __post_init__(self) -> None:
        names = ("max_steps", "gradient_accumulation_steps", "save_steps", "logging_steps",
                 "max_nonfinite_steps")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_replaced_runs < 0:
            count = self.keep_replaced_runs
            raise ValueError(f"train.keep_replaced_runs must be >= 0, got {count}")
        if self.collective_timeout_minutes <= 0:
            timeout = self.collective_timeout_minutes
            raise ValueError(f"train.collective_timeout_minutes must be > 0, got {timeout}")
        if self.preemption_grace_seconds <= 0:
            grace = self.preemption_grace_seconds
            raise ValueError(f"train.preemption_grace_seconds must be > 0, got {grace}")
        for name in self.preemption_signals:
            if name not in CATCHABLE_SIGNALS:
                raise ValueError(
                    f"train.preemption_signals: {name!r} is not a signal a process can catch; "
                    "use names such as SIGTERM, SIGUSR1, SIGINT"
                )
        explicit = self.llm_checkpointing
        if explicit != "auto" and (explicit != "none") != self.grad_checkpoint:
            raise ValueError(
                f"train.grad_checkpoint = {str(self.grad_checkpoint).lower()} contradicts "
                f"train.llm_checkpointing = {explicit!r}: grad_checkpoint says whether the LLM "
                "layers are checkpointed, llm_checkpointing how; set grad_checkpoint = "
                f"{str(explicit != 'none').lower()} or llm_checkpointing = 'auto'"
            )
        alone = [name for name in ("all", "none") if name in self.report_to]
        if alone and len(set(self.report_to)) > 1:
            raise ValueError(
                f"train.report_to: {alone[0]!r} stands alone, got {list(self.report_to)}"
            )
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"train.resume: {self.resume!r} is not 'auto', 'never' or a directory")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: SampleConfig = field(default_factory=SampleConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "freeze": FreezeConfig,
    "data": SampleConfig,
    "packing": PackingConfig,
    "stream": StreamConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "dist": DistConfig,
    "eval": EvalConfig,
}

FACT_ALIASES = {"conv_style": "template"}
"""Former config keys whose RunFacts field has another name (data.conv_style)."""


class ConfigError(RefusedError, ValueError):
    """Every problem of a configuration, reported at once."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` checked (and int->float widened) against `annotation`; raises TypeError."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise TypeError(f"must be one of {list(typing.get_args(annotation))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option)
            except TypeError as error:
                errors.append(str(error))
        raise TypeError(" or ".join(errors))
    if origin in (tuple, list):
        item_types = typing.get_args(annotation)
        names_only = len(item_types) == 2 and typing.get_origin(item_types[0]) is Literal
        if isinstance(value, str) and names_only:
            value = [value]  # one name of a list of names: report_to = "wandb"
        if not isinstance(value, list | tuple):
            raise TypeError(f"must be a list, got {value!r}")
        if origin is tuple and len(item_types) == 2 and item_types[1] is Ellipsis:
            # tuple[X, ...]: every item is an X (a Literal's items are checked by name)
            return tuple(_coerce(item, item_types[0]) for item in value)
        return tuple(value) if origin is tuple else list(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"must be an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise TypeError(f"must be {annotation.__name__}, got {value!r}")
    return value


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(options)})"


def _unknown_key_problem(section: str, key: str, valid: list[str]) -> str:
    """'unknown key' with the nearest valid keys, or what a RunFacts field is derived from."""
    fact = FACT_ALIASES.get(key, key)
    docs = field_docs(RunFacts)
    if fact in docs:
        return (
            f"{section}.{key} is derived from the model and tokenizer (RunFacts.{fact}: "
            f"{docs[fact]}); do not set it"
        )
    return f"unknown key {section}.{key}{_nearest(key, valid)}"


def _section_values(name: str, cls: type, raw: dict[str, Any], problems: list[str]) -> dict:
    """The fields of `cls` in `raw`, type-checked; unknown keys and bad values go to problems."""
    types_by_field = _field_types(cls)
    values = {}
    for key, value in raw.items():
        if key not in types_by_field:
            problems.append(_unknown_key_problem(name, key, list(types_by_field)))
        else:
            try:
                values[key] = _coerce(value, types_by_field[key])
            except TypeError as error:
                problems.append(f"{name}.{key} {error}")
    return values


def _build_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"[{name}] must be a table, got {raw!r}")
        return None
    values = _section_values(name, cls, raw, problems)
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        problems.append(str(error))
        return None


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    """RunConfig from a nested dict; raises ConfigError listing every problem."""
    problems: list[str] = []
    sections = {}
    for name in raw:
        if name not in SECTIONS:
            problems.append(f"unknown section [{name}]{_nearest(name, list(SECTIONS))}")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name, {}), problems)
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


MAX_TOML_NESTING = 100
"""Deepest nesting of arrays and inline tables a stage file or --set value may have (a stage
file needs three: [section], a list, a list inside it). tomllib recurses once per level and
would otherwise end in a RecursionError traceback."""


def toml_nesting_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings and comments (table headers count too)."""
    depth = deepest = index = 0
    while index < len(text):
        char = text[index]
        if char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
        elif char in "\"'":
            index = _string_end(text, index)
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
        index += 1
    return deepest


def _string_end(text: str, start: int) -> int:
    """Index of the last character of the TOML string opening at `start` (or the text's end)."""
    quote = text[start]
    if text.startswith(quote * 3, start):
        end = text.find(quote * 3, start + 3)
        return len(text) if end < 0 else end + 2
    index = start + 1
    while index < len(text) and text[index] not in (quote, "\n"):
        # basic strings escape with a backslash; literal ('...') strings have no escapes
        index += 2 if quote == '"' and text[index] == "\\" else 1
    return index


def _nesting_problem(text: str, what: str) -> str | None:
    depth = toml_nesting_depth(text)
    if depth <= MAX_TOML_NESTING:
        return None
    return (
        f"{what} nests arrays or inline tables too deeply ({depth} levels); "
        f"at most {MAX_TOML_NESTING} levels are read"
    )


def parse_override_value(text: str) -> Any:
    """A --set value: TOML syntax when it parses (1e-5, true, [1, 2], "s"), else a string.

    Raises:
        ConfigError: the value nests deeper than MAX_TOML_NESTING.
    """
    problem = _nesting_problem(text, f"value {text[:40]}...")
    if problem is not None:
        raise ConfigError([problem])
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` to the nested dict in place."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r}: expected section.key=value"])
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(
            [f"--set {assignment!r}: the key must be section.key, e.g. optim.learning_rate"]
        )
    raw.setdefault(parts[0], {})[parts[1]] = parse_override_value(text.strip())


def override_dataclass(instance: T, section: str, assignments: Sequence[str]) -> T:
    """`instance` with `section.key=value` assignments (--set) applied, as TOML values.

    For configs outside RunConfig (the demo's PretrainConfig); every malformed assignment,
    unknown key and mistyped value is reported at once in one ConfigError.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    for assignment in assignments:
        path, separator, text = assignment.partition("=")
        prefix, dot, key = path.strip().partition(".")
        if not separator or prefix != section or not dot or not key:
            problems.append(f"--set {assignment!r}: expected {section}.key=value")
            continue
        raw[key] = parse_override_value(text.strip())
    values = _section_values(section, type(instance), raw, problems)
    if problems:
        raise ConfigError(problems)
    try:
        return dataclasses.replace(instance, **values)  # type: ignore[type-var]
    except (ValueError, TypeError) as error:
        raise ConfigError([str(error)]) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """The nested dict of a stage TOML file.

    Raises:
        ConfigError: one line naming the file: missing, a directory, unreadable, not UTF-8,
            nested deeper than MAX_TOML_NESTING, or not valid TOML (with its line).
    """
    path = Path(path)
    try:
        text = read_user_text(path, "the stage's TOML file")
    except ValueError as error:
        raise ConfigError([f"config file {error}"]) from None
    problem = _nesting_problem(text, f"config file {path}")
    if problem is not None:
        raise ConfigError([problem])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: {error}"]) from None


def validate(config: RunConfig, world_size: int) -> None:
    """Cross-field and world-size rules; raises one ConfigError listing all problems."""
    problems = []
    if not config.train.meta_path:
        problems.append("train.meta_path is required (the meta JSON of the training data)")
    elif not Location.parse(config.train.meta_path).may_be_file():
        # a URL (s3://...) is checked when data.meta reads it
        problems.append(f"train.meta_path {config.train.meta_path} does not exist")
    meta = config.eval.meta
    if config.eval.steps > 0 and "://" not in meta and not Path(meta).is_file():
        problems.append(f"eval.meta {meta} does not exist")
    for name in ("model_name_or_path", "vision_path", "llm_path", "mlp_path"):
        value = getattr(config.model, name)
        if value and not Path(value).exists():
            problems.append(f"model.{name} {value} does not exist")
    freeze = config.freeze
    everything_frozen = (
        freeze.freeze_backbone
        and freeze.freeze_llm
        and freeze.freeze_mlp
        and not (freeze.unfreeze_vit_layers or freeze.unfreeze_lm_head)
        and not (freeze.use_backbone_lora or freeze.use_llm_lora)
    )
    if everything_frozen:
        problems.append("freeze: every component is frozen; nothing would train")
    if config.data.max_seq_length > config.packing.max_packed_tokens:
        problems.append(
            f"data.max_seq_length {config.data.max_seq_length} exceeds packing.max_packed_tokens "
            f"{config.packing.max_packed_tokens}: such samples could never be packed"
        )
    if config.stream.num_epochs is not None:
        problems.append(
            "stream.num_epochs is for finite evaluation streams; training runs to "
            "train.max_steps (the stream moves on to the next epoch by itself)"
        )
    if world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    for name in config.train.allow_changed_on_resume:
        section, _, key = name.partition(".")
        if section not in SECTIONS or key not in _field_types(SECTIONS[section]):
            problems.append(f"train.allow_changed_on_resume: {name!r} is not a config field")
    if problems:
        raise ConfigError(problems)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """TOML file (optional) + --set overrides -> RunConfig."""
    raw = load_toml(path) if path else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_run_config(raw)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef), f"{cls!r} source is not a class definition"
    docs, body = {}, class_def.body
    for previous, node in zip(body, body[1:], strict=False):
        if (
            isinstance(previous, ast.AnnAssign)
            and isinstance(previous.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs


def toml_value(value: Any) -> str | None:
    """`value` written as a TOML value (None: TOML has no null, the field is left unset).

    Strings use TOML basic strings, whose escapes are JSON's; floats keep their repr (nan and
    inf as TOML spells them), so `train --config` reads back exactly the printed value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        items = [toml_value(item) for item in value]
        if any(item is None for item in items):
            raise TypeError(f"cannot write {value!r} as TOML: it holds a None")
        return "[" + ", ".join(cast(list[str], items)) + "]"
    if isinstance(value, dict):
        pairs = [f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()]
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _describe_fields(title: str, section: Any, commented: bool = False) -> list[str]:
    """`[title]` and one `key = value  # doc` line per field; an unset (None) field and, with
    `commented`, every line are TOML comments, so the text reads back as the same config."""
    docs = field_docs(type(section))
    mark = "# " if commented else ""
    lines = [f"{mark}[{title}]"]
    for f in dataclasses.fields(section):
        doc = f"  # {docs[f.name]}" if f.name in docs else ""
        value = toml_value(getattr(section, f.name))
        if value is None:
            lines.append(f"# {f.name} is unset{doc}")
        else:
            lines.append(f"{mark}{f.name} = {value}{doc}")
    return [*lines, ""]


def describe(config: RunConfig, facts: RunFacts | str | None = None) -> str:
    """The resolved config as TOML with each field's docstring (`train --config` reads it
    back), then the derived facts (or, as a string, why they could not be read) as comments."""
    lines = ["# User settings (TOML, --set, reference flags)", ""]
    for name in SECTIONS:
        lines += _describe_fields(name, getattr(config, name))
    if facts is None:
        return "\n".join(lines)
    lines += ["# Derived from the model and tokenizer (RunFacts; not settable)", ""]
    if isinstance(facts, str):
        return "\n".join([*lines, "# [facts]", f"# unavailable: {facts}", ""])
    return "\n".join(lines + _describe_fields("facts", facts, commented=True))
