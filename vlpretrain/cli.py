"""The `vlpretrain` command line: argparse subcommands that call the library.

Each `cmd_*` function parses nothing, configures nothing at import and imports the library code
it runs (torch, transformers, the model and the loop) inside its body, so that `--help`, a
typo in an option and the parser itself answer at once (tests/unit/test_cli_help.py guards
this: building the parser imports neither torch, transformers nor numpy). The user-facing
help lives in the strings below (DESCRIPTION, TRAIN_EPILOG, ...), not in this docstring.

`split_reference_flags` sets the reference trainer's `--name value` flags aside before argparse
sees them; `main` sets up logging, runs the command and turns a refusal (RefusedError) or a
Ctrl-C into one message and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlpretrain.errors import RefusedError  # light: the base class only, no library imports

if TYPE_CHECKING:  # annotations only; each command imports its library code when it runs
    from PIL import Image

    from vlpretrain.chat import ChatModel, DecodeConfig
    from vlpretrain.config import RunConfig
    from vlpretrain.facts import RunFacts

logger = logging.getLogger("vlpretrain")


def resolve_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """TOML file, then reference flags, then --set overrides (last wins)."""
    from vlpretrain.config import apply_override, build_run_config, load_toml
    from vlpretrain.flags import apply_reference_flags

    raw: dict[str, Any] = load_toml(args.config) if args.config else {}
    for note in apply_reference_flags(raw, extra):
        logger.info(note)
    for assignment in args.set or []:
        apply_override(raw, assignment)
    return build_run_config(raw)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", metavar="STAGE.toml", help="the stage's settings (see configs/)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config field (repeatable; show-config lists them)",
    )


def run_distributed(
    job: Callable[[Any], object], log_all_ranks: bool, timeout_minutes: float | None = None
) -> int:
    """Join the process group (torchrun's or a 1-rank one), run `job(env)`, leave it."""
    from vlpretrain.distributed.env import DEFAULT_TIMEOUT_MINUTES, init_distributed, shutdown
    from vlpretrain.log import setup_logging

    env = init_distributed(timeout_minutes or DEFAULT_TIMEOUT_MINUTES)
    setup_logging(env.rank, log_all_ranks)
    try:
        job(env)
    finally:
        shutdown()
    return 0


def job_world_size() -> int:
    """Ranks of this job: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", 1))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from vlpretrain.config import validate
    from vlpretrain.train.loop import train

    config = resolve_config(args, extra)
    validate(config, job_world_size())
    timeout = config.train.collective_timeout_minutes
    return run_distributed(lambda env: train(config, env), args.log_all_ranks, timeout)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from vlpretrain.pipeline import check_stages, load_recipe, plan_stages, run_pipeline

    stages = load_recipe(args.recipe, args.set or [])
    for warning in check_stages(stages, int(os.environ.get("WORLD_SIZE", 1))):
        logger.warning(warning)
    if args.check_only:
        for plan in plan_stages(stages):
            print(plan.describe())
        print(f"recipe {args.recipe}: {len(stages)} stages OK")
        return 0
    timeout = max(stage.config.train.collective_timeout_minutes for stage in stages)
    return run_distributed(lambda env: run_pipeline(stages, env), args.log_all_ranks, timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from vlpretrain.demo.run import DemoConfig, run_demo

    config = DemoConfig(seed=args.seed, num_eval=args.eval_limit, max_steps=args.max_steps)

    def job(env: Any) -> None:
        run_demo(args.output, env, config)

    return run_distributed(job, args.log_all_ranks)


def chat_interactive(
    chat_model: ChatModel, images: list[Image.Image], decode: DecodeConfig, system: str | None
) -> int:
    """Answer lines from stdin until EOF or 'exit', keeping the conversation as history."""
    from vlpretrain.chat import History, with_image_tags

    prompt = "user> " if sys.stdin.isatty() else ""
    history: History = []
    while True:
        try:
            question = input(prompt).strip()
        except EOFError:
            return 0
        if question in ("exit", "quit"):
            return 0
        if not question:
            continue
        question = with_image_tags(question, len(images), history)
        try:
            answer = chat_model.answer(images, question, decode, history, system)
        except ValueError as err:  # a bad question; the conversation goes on without it
            print(f"vlpretrain chat: {err}", file=sys.stderr)
            continue
        print(answer, flush=True)
        history.append((question, answer))


def cmd_chat(args: argparse.Namespace) -> int:
    """`vlpretrain chat`: one answer for a question argument, else an interactive loop.

    Bad input (decoding values, an unreadable image, a directory that is no InternVL chat
    model, a reserved token in the question) is reported on stderr with exit code 2.
    """
    from vlpretrain.chat import DecodeConfig, load, load_images

    try:
        decode = DecodeConfig(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        images = load_images(args.image)
        chat_model = load(args.model, args.device)
        if args.question is None:
            return chat_interactive(chat_model, images, decode, args.system)
        print(chat_model.answer(images, args.question, decode, None, args.system))
    except ValueError as err:
        print(f"vlpretrain chat: {err}", file=sys.stderr)
        return 2
    return 0


def add_chat_command(commands: Any) -> None:
    """Register `chat` on the subparsers object."""
    parser = add_command(
        commands,
        "chat",
        "ask a trained model about images",
        "Answer a question about the given images with a trained model (a stage's output_dir\n"
        "or any InternVL chat directory); without a question, answer lines from stdin.",
        "examples:\n"
        '  vlpretrain chat --model work_dirs/stage2 --image a.png "What is in the picture?"\n'
        "  vlpretrain chat --model work_dirs/stage2 --image a.png      # interactive",
    )
    parser.add_argument("question", nargs="?", help="omit for an interactive prompt on stdin")
    parser.add_argument("--model", required=True, help="InternVL chat directory")
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="repeat for several"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--system", default=None, help="system message (default: template's)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=cmd_chat)


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    """`data check` / `data show` with the run's own settings and the model's facts."""
    from vlpretrain.config import ConfigError, validate
    from vlpretrain.data.check import run_check, run_show
    from vlpretrain.model.build import read_run_facts

    config = resolve_config(args, extra)
    if not config.train.meta_path:
        raise ConfigError(["train.meta_path: empty; give the run's stage TOML or --meta_path"])
    if args.data_command == "check":
        validate(config, job_world_size())  # the data passes only for a run train would start
    try:
        facts = read_run_facts(config.model)
    except (OSError, ValueError, KeyError) as error:
        print(f"vlpretrain: cannot read the model's facts: {error}", file=sys.stderr)
        return 2
    tokenizer_dir = config.model.model_name_or_path or config.model.llm_path
    meta = config.train.meta_path
    if args.data_command == "check":
        return run_check(meta, tokenizer_dir, config.data, facts, args.workers,
                         packing=config.packing, stream=config.stream,
                         world_size=job_world_size(), list_all=args.all)  # fmt: skip
    return run_show(meta, tokenizer_dir, config.data, args.index, args.dataset,
                    config.stream.seed, facts)  # fmt: skip


def add_data_commands(commands: Any) -> None:
    """Register `data check` and `data show` (the run's TOML, --set and reference flags)."""
    data = add_command(commands, "data", "check or inspect a stage's training data")
    subcommands = data.add_subparsers(
        title="commands", dest="data_command", required=True, metavar="COMMAND"
    )
    check = add_command(
        subcommands,
        "check",
        "validate the meta file and every record before training",
        "Read every record of the stage's data mixture with the stage's own settings and report\n"
        "the ones training would skip; refuses what `train` would refuse at start. Takes the\n"
        "same stage TOML, --set and reference flags as `train`; exit code 0 when the run may\n"
        "start.",
    )
    show = add_command(
        subcommands,
        "show",
        "render one sample as the model would see it",
        "Print one record of the stage's data as the model sees it: its file and line, its\n"
        "images, token and tile counts, and the rendered conversation.",
    )
    for parser in (check, show):
        _add_config_arguments(parser)
        parser.set_defaults(func=cmd_data, takes_extra=True)
    check.add_argument("--workers", type=int, default=1, help="processes reading records")
    check.add_argument("--all", action="store_true", help="list every skipped record")
    show.add_argument("--index", type=int, required=True, help="record index in the dataset")
    show.add_argument("--dataset", default=None, help="dataset name (default: the first)")


def cmd_show_config(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the user settings and the facts derived from the model's config and tokenizer
    files (no weights are loaded)."""
    from vlpretrain.config import describe
    from vlpretrain.data.skips import SkipPolicy
    from vlpretrain.model.build import read_run_facts

    config = resolve_config(args, extra)
    facts: RunFacts | str
    try:
        facts = read_run_facts(config.model)
    except (OSError, ValueError, KeyError) as error:
        facts = f"{type(error).__name__}: {error}"
    print(describe(config, facts))
    # Comments, so that the whole output is a stage file `train` accepts back.
    print("# Rules that follow from the settings (not settable)\n#")
    print(f"# skip policy: {SkipPolicy(config.data.max_skip_fraction).describe()}")
    print(f"# {config.optim.describe_learning_rates()}")
    return 0


DESCRIPTION = """\
vlpretrain trains InternVL-style vision-language models (vision encoder, projector and
language model) stage by stage, from projector warm-up to instruction tuning, on a CPU or on
many GPUs."""

EPILOG = """\
usual flow:
  vlpretrain data check stage1.toml     check the data mixture before spending compute
  vlpretrain train stage1.toml          train one stage; rerun the same command to resume
  vlpretrain train stage2.toml          the next stage (its TOML names where it starts from)
  vlpretrain pipeline recipe.toml       ... or run every stage of a recipe in order
  vlpretrain chat --model work_dirs/stage2 --image a.png "What is in the picture?"
  vlpretrain export work_dirs/stage2 --to hf out_hf

on several GPUs, start the same command under torchrun:
  torchrun --nproc_per_node 8 -m vlpretrain train stage1.toml

`vlpretrain demo` runs a small three-stage recipe on generated data on the CPU.
`vlpretrain COMMAND --help` describes a command and its options."""

TRAIN_DESCRIPTION = """\
Train one stage (projector warm-up, full pretraining or instruction tuning: the stage TOML
says which parts are frozen, which data is used and where the weights come from).
Settings come from the TOML file, then the reference trainer's flags, then --set (last wins)."""

TRAIN_EPILOG = """\
resuming:
  Rerunning the same command resumes from the newest checkpoint in train.output_dir
  (train.resume = "auto", the default), data position and random state included. Use
  --set train.resume=never to start over, or --set train.resume=DIR for one checkpoint.

the reference trainer's flags:
  The flags of InternVL's internvl_chat_pretrain.py are accepted with their value syntax
  (--vision_path, --llm_path, --mlp_path, --conv_style, --freeze_llm True, --learning_rate,
  --max_steps, --meta_path, --output_dir, --deepspeed, ...), so a stage shell script runs with
  only the program name changed. Flags that only steered HF Trainer are accepted and ignored
  with a log line; an unknown flag is refused with the list of known ones. As in the
  reference, --overwrite_output_dir True starts from scratch: drop it (or pass False) for a
  rerun to resume.

overrides:
  --set section.key=value overrides any field, e.g. --set optim.learning_rate=2e-5 or
  --set train.max_steps=100; `vlpretrain show-config STAGE.toml` lists every field with its
  value and meaning.

examples:
  vlpretrain train configs/internvl2_5_1b_stage1.toml
  vlpretrain train configs/internvl2_5_1b_stage1.toml --set train.max_steps=20
  torchrun --nproc_per_node 8 -m vlpretrain train configs/internvl2_5_1b_stage1.toml
  vlpretrain train --vision_path ./InternViT-300M-448px-V2_5 --llm_path ./Qwen2.5-0.5B-Instruct \\
      --conv_style internvl2_5 --freeze_llm True --freeze_backbone True \\
      --learning_rate 2e-4 --meta_path ./data/mixture.json --output_dir work_dirs/stage1"""

SHOW_CONFIG_DESCRIPTION = """\
Print the resolved configuration of a stage (TOML, reference flags and --set applied): every
field with its value and meaning, then the facts read from the model's config and tokenizer
files (no weights are loaded). The output is itself a stage file that `train` accepts."""

PIPELINE_DESCRIPTION = """\
Run a recipe's stages in order; a stage that names no starting weights starts from the
previous stage's output. Rerunning the recipe skips finished stages and resumes a
half-finished one from its latest checkpoint."""

PIPELINE_EPILOG = """\
examples:
  vlpretrain pipeline recipes/internvl2_5_1b.toml --check-only
  vlpretrain pipeline recipes/internvl2_5_1b.toml --set train.logging_steps=5
  vlpretrain pipeline recipes/internvl2_5_1b.toml --set stages.stage2.optim.learning_rate=1e-5"""

EXPORT_FORMATS = {
    "hf": "transformers' InternVLForConditionalGeneration layout",
    "internvl": "InternVL's chat layout (the reference's remote code)",
}
"""The formats `export --to` names (formats/export.py EXPORTERS holds their converters; a test
checks that the two agree, so the parser needs no import of the converters)."""


def add_command(
    commands: Any,
    name: str,
    summary: str,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand with `summary` in the command list and `description` (else `summary`) atop
    its own --help; the layout of both texts is kept as written."""
    return commands.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; imports no library code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="vlpretrain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-all-ranks", action="store_true", help="log INFO on every rank")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    add_data_commands(commands)
    add_train_command(commands)
    add_pipeline_command(commands)
    show = add_command(commands, "show-config", "print a stage's resolved configuration",
                       SHOW_CONFIG_DESCRIPTION)  # fmt: skip
    _add_config_arguments(show)
    show.set_defaults(func=cmd_show_config, takes_extra=True)
    add_chat_command(commands)
    _add_export_command(commands)
    _add_plot_command(commands)
    _add_unlock_command(commands)
    add_demo_command(commands)
    return parser


def add_train_command(commands: Any) -> None:
    """Register `train` (a stage TOML, --set and the reference trainer's flags)."""
    train = add_command(commands, "train", "train one stage (accepts the reference's flags)",
                        TRAIN_DESCRIPTION, TRAIN_EPILOG)  # fmt: skip
    _add_config_arguments(train)
    train.set_defaults(func=cmd_train, takes_extra=True)


def add_pipeline_command(commands: Any) -> None:
    """Register `pipeline` (a recipe of stages)."""
    pipeline = add_command(commands, "pipeline", "run a recipe's stages in order",
                           PIPELINE_DESCRIPTION, PIPELINE_EPILOG)  # fmt: skip
    pipeline.add_argument("recipe", help="recipe TOML ([pipeline] + [stages.NAME.*])")
    pipeline.add_argument(
        "--set",
        action="append",
        metavar="[stages.NAME.]SECTION.KEY=VALUE",
        help="override a value in every stage, or with stages.NAME. in stage NAME only",
    )
    pipeline.add_argument(
        "--check-only",
        action="store_true",
        help="validate every stage, print each one's directory and origin, and exit",
    )
    pipeline.set_defaults(func=cmd_pipeline)


def add_demo_command(commands: Any) -> None:
    """Register `demo` (the three-stage recipe on generated data)."""
    demo = add_command(
        commands,
        "demo",
        "try the three-stage recipe on generated data (CPU, no downloads)",
        "Train a tiny model through projector warm-up, pretraining and instruction tuning on\n"
        "generated images, then evaluate it; everything is written under --output.",
    )
    demo.add_argument("--output", default="demo_out", help="where everything is written")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-limit", type=int, default=300,
                      help="held-out images (one question and one caption each)")  # fmt: skip
    demo.add_argument("--max-steps", type=int, default=None, help="override every stage's steps")
    demo.set_defaults(func=cmd_demo)


def cmd_export(args: argparse.Namespace) -> int:
    """Convert `args.source` into format `args.to` under `args.out`.

    A directory that cannot be converted is reported in one line (exit code 2), not a trace.
    """
    from vlpretrain.formats.export import EXPORTERS

    try:
        EXPORTERS[args.to](args.source, args.out)
    except (ValueError, FileNotFoundError) as error:
        logger.error("export %s --to %s: %s", args.source, args.to, error)
        return 2
    return 0


def _add_export_command(commands: Any) -> None:
    export = add_command(
        commands,
        "export",
        "convert a model between InternVL's chat layout and transformers' InternVL",
        "Convert a model directory (a stage's output_dir or a converted one) into another\n"
        "layout, tensor for tensor.",
        "examples:\n  vlpretrain export work_dirs/stage2 --to hf out_hf\n"
        "  vlpretrain export out_hf --to internvl back",
    )
    export.add_argument("source", metavar="DIR", help="model directory to convert")
    export.add_argument(
        "--to",
        required=True,
        choices=sorted(EXPORT_FORMATS),
        help="; ".join(f"{name}: {meaning}" for name, meaning in EXPORT_FORMATS.items()),
    )
    export.add_argument("out", metavar="OUT", help="output directory")
    export.set_defaults(func=cmd_export)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Remove the run lock of `args.output_dir` and print whose it was (exit 1 if its holder
    is a live process on this host)."""
    from pathlib import Path

    from vlpretrain.train.checkpoint.lock import LOCK_FILE, RunLockError, break_lock

    output_dir = Path(args.output_dir)
    try:
        removed = break_lock(output_dir)
    except (RunLockError, OSError) as error:
        print(f"vlpretrain unlock: {error}", file=sys.stderr)
        return 1
    if removed is None:
        print(f"{output_dir}: no run lock ({LOCK_FILE}) to remove")
    else:
        print(f"removed {output_dir / LOCK_FILE}: {removed}")
    return 0


def _add_unlock_command(commands: Any) -> None:
    unlock = add_command(
        commands,
        "unlock",
        "remove a run lock left by a run that died on another host",
        "Remove the run lock of OUTPUT_DIR now, for a run whose holder on another host is known\n"
        "to be dead (a holder on this host is checked and refused while it lives).",
    )
    unlock.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's train.output_dir")
    unlock.set_defaults(func=cmd_unlock)


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw `args.output_dir`/loss_curves.png; a missing file or package is one line, exit 1."""
    from vlpretrain.packages import MissingPackageError
    from vlpretrain.plots import plot_stage

    try:
        path = plot_stage(args.output_dir)
    except (FileNotFoundError, ValueError, MissingPackageError) as error:
        print(f"vlpretrain plot: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_plot_command(commands: Any) -> None:
    plot = add_command(
        commands, "plot", "draw a stage's loss curves (loss_curves.png) from its metrics.jsonl"
    )
    plot.add_argument("output_dir", metavar="OUTPUT_DIR", help="the stage's train.output_dir")
    plot.set_defaults(func=cmd_plot)


OWN_OPTIONS = {"--set": 1, "--log-all-ranks": 0, "--help": 0}
"""Options of `train` / `show-config` and how many values follow them."""
DATA_OPTIONS = {**OWN_OPTIONS, "--workers": 1, "--all": 0, "--index": 1, "--dataset": 1}
"""Options of `data check` / `data show`."""


def split_reference_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our arguments and the reference trainer's `--name value` flags, for train/show-config.

    argparse cannot know that an unknown `--vision_path` takes a value, so without this it
    would take that value for the positional config file (`train --vision_path DIR ...`).
    """
    command = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if command is None or argv[command] not in ("train", "show-config", "data"):
        return argv, []
    options = OWN_OPTIONS
    if argv[command] == "data":  # `data check` / `data show`: the subcommand is ours too
        command, options = command + 1, DATA_OPTIONS
    own, reference = argv[: command + 1], []
    index = command + 1
    while index < len(argv):
        token = argv[index]
        name = token.split("=", 1)[0]
        if token.startswith("--") and name not in options:
            width = 1 if "=" in token else 2
            reference.extend(argv[index : index + width])
        else:
            width = 1 if "=" in token else 1 + options.get(name, 0)
            own.extend(argv[index : index + width])
        index += width
    return own, reference


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    own, reference = split_reference_flags(argv)
    args, extra = parser.parse_known_args(own)
    extra = [*extra, *reference]
    from vlpretrain.log import setup_logging

    setup_logging(int(os.environ.get("RANK", 0)), args.log_all_ranks)
    takes_extra = getattr(args, "takes_extra", False)
    if extra and not takes_extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if takes_extra:
            return int(args.func(args, extra))
        return int(args.func(args))
    except RefusedError as error:
        report_refusal(error, int(os.environ.get("RANK", 0)))
        return error.exit_code
    except KeyboardInterrupt:
        # Training itself turns Ctrl-C into a clean stop (train.preemption_signals); this is
        # one that came before the first step or after the last one, with nothing to save.
        print("vlpretrain: interrupted (Ctrl-C) outside the training steps; nothing saved",
              file=sys.stderr)  # fmt: skip
        return INTERRUPTED_EXIT


INTERRUPTED_EXIT = 130
"""Exit code of a Ctrl-C outside the training steps: 128 + SIGINT, as the shell reports a
process that SIGINT ended."""


def report_refusal(error: RefusedError, rank: int) -> None:
    """The whole message on rank 0; one line on every other rank (each rank refuses the same
    job, and torchrun prefixes and interleaves every rank's lines)."""
    if rank == 0:
        print(f"vlpretrain: {error}", file=sys.stderr)
        return
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    more = " (rank 0 printed the whole message)" if "\n" in str(error) else ""
    print(f"vlpretrain: rank {rank}: {first}{more}", file=sys.stderr)
