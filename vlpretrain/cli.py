"""Command-line shell: parse arguments, set up logging, call the library. Nothing else.

vlpretrain train [STAGE.toml] [--set a.b=c ...] [--reference_flag value ...]
vlpretrain show-config [STAGE.toml] [--set ...] [--reference_flag value ...]
vlpretrain data check [STAGE.toml] [--set ...] [--reference_flag value ...] [--all]
    (refuses what `train` refuses at start; judges one epoch with train's skip policy)
vlpretrain data show [STAGE.toml] [--set ...] [--reference_flag value ...] --index N
vlpretrain chat [QUESTION] --model DIR [--image PATH ...]
vlpretrain export DIR --to {hf,internvl} OUT
vlpretrain unlock OUTPUT_DIR
vlpretrain plot OUTPUT_DIR    (loss_curves.png from the stage's metrics.jsonl)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlpretrain.config import (
    ConfigError,
    RunConfig,
    apply_override,
    build_run_config,
    describe,
    load_toml,
    validate,
)
from vlpretrain.errors import RefusedError
from vlpretrain.facts import RunFacts
from vlpretrain.log import setup_logging

if TYPE_CHECKING:  # annotations only; each command imports its library code lazily
    from PIL import Image

    from vlpretrain.chat import ChatModel, DecodeConfig

logger = logging.getLogger("vlpretrain")


def resolve_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """TOML file, then reference flags, then --set overrides (last wins)."""
    from vlpretrain.flags import apply_reference_flags

    raw: dict[str, Any] = load_toml(args.config) if args.config else {}
    for note in apply_reference_flags(raw, extra):
        logger.info(note)
    for assignment in args.set or []:
        apply_override(raw, assignment)
    return build_run_config(raw)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="stage TOML file")
    parser.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value"
    )


def run_distributed(
    job: Callable[[Any], object], log_all_ranks: bool, timeout_minutes: float | None = None
) -> int:
    """Join the process group (torchrun's or a 1-rank one), run `job(env)`, leave it."""
    from vlpretrain.distributed.env import DEFAULT_TIMEOUT_MINUTES, init_distributed, shutdown

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
    parser = commands.add_parser("chat", help="ask a saved model about images")
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
    data = commands.add_parser("data", help="validate and inspect the training data of a run")
    subcommands = data.add_subparsers(dest="data_command", required=True)
    check = subcommands.add_parser("check", help="validate the meta file and every record")
    show = subcommands.add_parser("show", help="render one sample")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--log-all-ranks", action="store_true", help="log INFO on every rank")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="run one stage (also accepts the reference trainer's flags)"
    )
    _add_config_arguments(train)
    train.set_defaults(func=cmd_train, takes_extra=True)
    show = commands.add_parser("show-config", help="print the resolved configuration")
    _add_config_arguments(show)
    show.set_defaults(func=cmd_show_config, takes_extra=True)
    pipeline = commands.add_parser("pipeline", help="run a recipe's stages in order")
    pipeline.add_argument("recipe", help="recipe TOML ([pipeline] + [stages.NAME.*])")
    pipeline.add_argument(
        "--set",
        action="append",
        metavar="[stages.NAME.]SECTION.KEY=VALUE",
        help="override a value in every stage, or with stages.NAME. in stage NAME only",
    )
    pipeline.add_argument("--check-only", action="store_true", help="validate and exit")
    pipeline.set_defaults(func=cmd_pipeline)
    demo = commands.add_parser("demo", help="the three-stage recipe on generated data (CPU)")
    demo.add_argument("--output", default="demo_out", help="where everything is written")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-limit", type=int, default=300,
                      help="held-out images (one question and one caption each)")  # fmt: skip
    demo.add_argument("--max-steps", type=int, default=None, help="override every stage's steps")
    demo.set_defaults(func=cmd_demo)
    add_data_commands(commands)
    add_chat_command(commands)
    _add_export_command(commands)
    _add_unlock_command(commands)
    _add_plot_command(commands)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    """Convert `args.source` into format `args.to` under `args.out`.

    A directory that cannot be converted is reported in one line (exit code 2), not a trace.
    """
    from vlpretrain.hf_export import EXPORTERS

    try:
        EXPORTERS[args.to](args.source, args.out)
    except (ValueError, FileNotFoundError) as error:
        logger.error("export %s --to %s: %s", args.source, args.to, error)
        return 2
    return 0


def _add_export_command(commands: Any) -> None:
    from vlpretrain.hf_export import EXPORTERS

    export = commands.add_parser(
        "export", help="convert between the InternVL chat layout and transformers' InternVL"
    )
    export.add_argument("source", metavar="DIR", help="model directory to convert")
    export.add_argument(
        "--to",
        required=True,
        choices=sorted(EXPORTERS),
        help="hf: transformers InternVLForConditionalGeneration; internvl: InternVL chat layout",
    )
    export.add_argument("out", metavar="OUT", help="output directory")
    export.set_defaults(func=cmd_export)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Remove the run lock of `args.output_dir` and print whose it was (exit 1 if its holder
    is a live process on this host)."""
    from pathlib import Path

    from vlpretrain.train.run_lock import LOCK_FILE, RunLockError, break_lock

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
    unlock = commands.add_parser(
        "unlock",
        help="remove an output_dir's run lock now (its holder on another host is known dead)",
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
    plot = commands.add_parser(
        "plot", help="draw a stage's loss curves (loss_curves.png) from its metrics.jsonl"
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
