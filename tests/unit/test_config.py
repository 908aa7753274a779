"""RunConfig loading: strict keys, types, all problems at once, --set parsing, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    apply_override,
    build_run_config,
    describe,
    field_docs,
    load_run_config,
    load_toml,
    parse_override_value,
    toml_nesting_depth,
    validate,
)
from vlpretrain.facts import RunFacts
from vlpretrain.pipeline import build_stages, load_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.toml"))
SHIPPED_RECIPES = [*sorted((REPO / "recipes").glob("*.toml")),
                   REPO / "vlpretrain" / "demo" / "assets" / "recipe.toml"]  # fmt: skip
PATH_B = {"vision_path": "vit", "llm_path": "llm"}


def minimal(**sections: dict) -> dict:
    """Smallest valid raw config (Path B placeholders), with sections updated."""
    raw = {"model": dict(PATH_B), "train": {"meta_path": "meta.json"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_run_config(raw)
    return caught.value.problems


def test_minimal_config_builds_with_defaults():
    config = build_run_config(minimal())
    assert config.model.vision_path == "vit"
    assert config.optim.learning_rate == 2e-4
    assert config.train.max_steps == 100
    assert config.dist.strategy == "ddp"


def test_module_rate_problems_are_listed_with_the_other_sections_problems():
    problems = problems_of(
        minimal(optim={"lr_projector": -1e-3, "vision_layer_decay": 0}, train={"max_steps": 0})
    )
    assert problems == [
        "optim.lr_projector must be a finite number >= 0, got -0.001; "
        "optim.vision_layer_decay must be in (0, 1], got 0.0",
        "train.max_steps must be >= 1, got 0",
    ]


def test_module_rates_default_to_the_learning_rate():
    config = build_run_config(minimal(optim={"learning_rate": 1e-4, "lr_llm": 2e-5}))
    assert (config.optim.lr_vision, config.optim.lr_projector) == (None, None)
    assert config.optim.module_learning_rates() == {
        "vision": 1e-4,
        "projector": 1e-4,
        "llm": 2e-5,
    }


def test_unknown_key_names_nearest_valid_key():
    [problem] = problems_of(minimal(optim={"learning_rte": 1e-3}))
    assert "unknown key optim.learning_rte" in problem
    assert "did you mean learning_rate" in problem


def test_unknown_section_names_nearest_section():
    [problem] = problems_of(minimal(optimiser={"learning_rate": 1e-3}))
    assert "unknown section [optimiser]" in problem
    assert "optim" in problem


def test_unknown_key_without_close_match_lists_valid_keys():
    [problem] = problems_of(minimal(dist={"zzz": 1}))
    assert "unknown key dist.zzz" in problem
    assert "valid: strategy, reshard_after_forward, cpu_offload" in problem


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "max_steps", "ten", "train.max_steps must be an integer, got 'ten'"),
        ("train", "max_steps", 2.5, "train.max_steps must be an integer, got 2.5"),
        ("train", "max_steps", True, "train.max_steps must be an integer, got True"),
        ("freeze", "freeze_llm", "True", "freeze.freeze_llm must be true or false, got 'True'"),
        ("freeze", "freeze_llm", 1, "freeze.freeze_llm must be true or false, got 1"),
        ("optim", "learning_rate", "fast", "optim.learning_rate must be float, got 'fast'"),
        ("train", "precision", "fp16", "train.precision must be one of ['fp32', 'bf16']"),
        ("dist", "strategy", "zero3", "dist.strategy must be one of ['ddp', 'fsdp']"),
        ("model", "force_image_size", "448", "model.force_image_size must be an integer"),
    ],
)
def test_type_mismatch_names_key_and_value(section, key, value, message):
    [problem] = problems_of(minimal(**{section: {key: value}}))
    assert message in problem


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("wandb", ("wandb",)),  # one name stands for a list of one
        (["tensorboard", "mlflow"], ("tensorboard", "mlflow")),
        (["none"], ("none",)),
        ([], ()),
    ],
)
def test_report_to_takes_one_tracker_name_or_a_list(value, expected):
    assert build_run_config(minimal(train={"report_to": value})).train.report_to == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["wandb", "comet"],
            "train.report_to must be one of ['tensorboard', 'wandb', 'mlflow', "
            "'all', 'none'], got 'comet'",
        ),
        (["wandb", "none"], "train.report_to: 'none' stands alone, got ['wandb', 'none']"),
        (["all", "mlflow"], "train.report_to: 'all' stands alone, got ['all', 'mlflow']"),
        (3, "train.report_to must be a list, got 3"),
    ],
)
def test_report_to_refuses_unknown_trackers_and_mixes_with_all_or_none(value, message):
    [problem] = problems_of(minimal(train={"report_to": value}))
    assert message in problem


def test_int_widens_to_float_but_float_never_narrows():
    config = build_run_config(minimal(optim={"learning_rate": 1}))
    assert config.optim.learning_rate == 1.0
    assert isinstance(config.optim.learning_rate, float)


def test_optional_field_accepts_none_and_its_type():
    assert build_run_config(minimal(model={"force_image_size": 448})).model.force_image_size == 448
    config = build_run_config(minimal(stream={"num_epochs": 2}))
    assert config.stream.num_epochs == 2


def test_every_problem_is_reported_at_once():
    raw = minimal(
        optim={"learning_rte": 1e-3},  # unknown key
        train={"max_steps": "ten"},  # type mismatch
        packing={"tile_size": 448},  # derived field
        extra={"x": 1},  # unknown section
    )
    problems = problems_of(raw)
    assert len(problems) == 4
    text = "\n".join(problems)
    for fragment in ("learning_rte", "train.max_steps", "packing.tile_size", "[extra]"):
        assert fragment in text
    # The exception message lists them all too, one per line.
    with pytest.raises(ConfigError) as caught:
        build_run_config(raw)
    assert str(caught.value).count("\n  - ") == 4


def test_post_init_errors_of_several_sections_are_collected():
    raw = minimal(train={"max_steps": 0}, optim={"learning_rate": -1.0})
    problems = problems_of(raw)
    assert len(problems) == 2
    assert any("train.max_steps must be >= 1, got 0" in p for p in problems)
    assert any("optim.learning_rate must be > 0, got -1.0" in p for p in problems)


def test_balance_queue_rows_error_is_collected_with_the_others():
    raw = minimal(train={"max_steps": 0}, packing={"balance_queue_rows": -1})
    problems = problems_of(raw)
    assert len(problems) == 2
    assert any("PackingConfig.balance_queue_rows must be >= 0, got -1" in p for p in problems)
    assert (
        build_run_config(minimal(packing={"balance_queue_rows": 0})).packing.balance_queue_rows == 0
    )


@pytest.mark.parametrize(
    ("section", "key", "source"),
    [
        ("data", "tile_size", "model.force_image_size"),
        ("data", "num_image_token", "ViT patch size"),
        ("data", "conv_style", "model.conv_style"),
        ("packing", "pad_token_id", "the tokenizer"),
    ],
)
def test_derived_fields_are_rejected(section, key, source):
    [problem] = problems_of(minimal(**{section: {key: 1}}))
    assert f"{section}.{key} is derived from" in problem
    assert source in problem
    assert "do not set it" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-5", 1e-5),
        ("2e-4", 2e-4),
        ("3", 3),
        ("0.5", 0.5),
        ("true", True),
        ("false", False),
        ('"fsdp"', "fsdp"),
        ("fsdp", "fsdp"),  # not TOML: kept as a bare string
        ("runs/stage 1", "runs/stage 1"),
        ("[1, 2]", [1, 2]),
        ('["a", "b"]', ["a", "b"]),
        ("True", "True"),  # TOML booleans are lower case; the type check then rejects it
    ],
)
def test_parse_override_value(text, expected):
    value = parse_override_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_set_overrides_reach_the_run_config(tmp_path):
    path = tmp_path / "stage.toml"
    path.write_text(
        '[model]\nvision_path = "vit"\nllm_path = "llm"\n[optim]\nlearning_rate = 1.0\n'
    )
    config = load_run_config(
        path,
        [
            "optim.learning_rate=1e-5",
            "freeze.freeze_llm=true",
            "train.output_dir=runs/x",
            'dist.strategy="fsdp"',
            "train.max_steps = 7",
            "model.force_image_size=28",
        ],
    )
    assert config.optim.learning_rate == 1e-5
    assert config.freeze.freeze_llm is True
    assert config.train.output_dir == "runs/x"
    assert config.dist.strategy == "fsdp"
    assert config.train.max_steps == 7
    assert config.model.force_image_size == 28


def test_set_value_may_contain_equals_sign():
    raw: dict = {}
    apply_override(raw, "train.output_dir=runs/a=b")
    assert raw == {"train": {"output_dir": "runs/a=b"}}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("optim.learning_rate", "expected section.key=value"),
        ("learning_rate=1e-5", "the key must be section.key"),
        ("a.b.c=1", "the key must be section.key"),
    ],
)
def test_malformed_set_is_an_error(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override({}, assignment)


def test_set_with_a_typo_names_the_nearest_key():
    with pytest.raises(ConfigError, match="did you mean max_steps"):
        load_run_config(None, ["model.vision_path=v", "model.llm_path=l", "train.max_step=3"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nmax_steps = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(path)


def test_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\noutput_dir = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    [problem] = caught.value.problems
    # "[train]\noutput_dir = 'caf" is 8 + 17 = 25 bytes, so the 0xe9 of the e-acute is byte 25
    assert problem == (
        f"config file {path} is not UTF-8 text (byte 0xe9 at offset 25); the stage's TOML "
        "file must be UTF-8: save it as UTF-8"
    )


def test_config_file_nested_too_deeply_names_the_file_and_the_limit(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("[train]\nmax_steps = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"config file {path} nests arrays or inline tables too deeply")
    assert "at most 100 levels" in problem


def test_set_value_nested_too_deeply_is_a_config_error():
    with pytest.raises(ConfigError, match="nests arrays or inline tables too deeply"):
        apply_override({}, "train.max_steps=" + "[" * 5000 + "]" * 5000)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("[train]\nx = [[1], {a = [2]}]\n", 3),  # [train] closes before the value opens
        ("x = \"[[[[\" # [[[[\ny = '{{'\n", 0),  # brackets in strings and comments
        ('x = """\n[[[\n"""\ny = "a\\"[" \n', 0),  # multi-line strings, escaped quote
    ],
)
def test_nesting_depth_counts_brackets_outside_strings_and_comments(text, depth):
    assert toml_nesting_depth(text) == depth


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_toml(tmp_path)
    assert caught.value.problems == [
        f"config file {tmp_path} is a directory; give the stage's TOML file"
    ]


def test_config_file_errors_reach_the_command_line_as_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[train]\nseed = 1 # \xff\n")
    for bad in (path, tmp_path):
        assert main(["show-config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(bad) in err


def test_held_out_meta_must_exist_when_the_run_evaluates(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    paths = {"vision_path": str(tmp_path), "llm_path": str(tmp_path)}
    held_out = {"meta": str(tmp_path / "gone.json")}
    raw = minimal(train={"meta_path": str(meta)}, model=paths, eval=held_out)
    validate(build_run_config(raw), world_size=1)  # eval.steps 0: the meta is not read
    raw["eval"]["steps"] = 10
    with pytest.raises(ConfigError, match=r"eval.meta .*gone.json does not exist"):
        validate(build_run_config(raw), world_size=1)
    assert any(
        "eval.steps = 10 needs eval.meta" in p for p in problems_of(minimal(eval={"steps": 10}))
    )


def test_validate_lists_every_cross_field_problem(tmp_path):
    config = build_run_config(
        {
            "model": {"vision_path": str(tmp_path / "no_vit"), "llm_path": str(tmp_path)},
            "freeze": {"freeze_backbone": True, "freeze_llm": True, "freeze_mlp": True},
            "data": {"max_seq_length": 4096},
            "packing": {"max_packed_tokens": 1024},
        }
    )
    with pytest.raises(ConfigError) as caught:
        validate(config, world_size=0)
    problems = caught.value.problems
    assert len(problems) == 5
    text = "\n".join(problems)
    assert "train.meta_path is required" in text
    assert "model.vision_path" in text and "does not exist" in text
    assert "every component is frozen" in text
    assert "data.max_seq_length 4096 exceeds packing.max_packed_tokens 1024" in text
    assert "world size must be >= 1" in text


def with_existing_paths(config: RunConfig, root: Path) -> RunConfig:
    """`config` with every path it names replaced by an existing placeholder under `root`."""
    model_paths = {}
    for name in ("model_name_or_path", "vision_path", "llm_path", "mlp_path"):
        if getattr(config.model, name):
            (root / name).mkdir(exist_ok=True)
            model_paths[name] = str(root / name)
    meta = root / "meta.json"
    meta.write_text("{}")
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model_paths),
        train=dataclasses.replace(config.train, meta_path=str(meta)),
    )


def test_shipped_configs_exist():
    assert len(SHIPPED_CONFIGS) >= 5
    assert len(SHIPPED_RECIPES) >= 3


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path):
    config = load_run_config(path)
    # The shipped paths are placeholders: validation only complains about their existence.
    try:
        validate(config, world_size=8)
    except ConfigError as error:
        assert all("does not exist" in p for p in error.problems), error.problems
    validate(with_existing_paths(config, tmp_path), world_size=8)


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_stages_load_chain_and_validate(path, tmp_path):
    text = path.read_text()
    if "{components}" in text:  # the demo recipe: fill its placeholders like `vlpretrain demo`
        filled = tmp_path / path.name
        filled.write_text(
            text.format(components=tmp_path / "components", data=tmp_path / "data", output=tmp_path)
        )
        path = filled
    stages = load_recipe(path)
    assert len(stages) >= 2
    # Every stage after the first starts from the previous stage's exported model.
    for previous, stage in zip(stages, stages[1:], strict=False):
        assert Path(stage.config.model.model_name_or_path) == Path(previous.config.train.output_dir)
    for stage in stages:
        validate(with_existing_paths(stage.config, tmp_path), world_size=8)


def test_describe_prints_values_with_field_docs():
    text = describe(build_run_config(minimal(train={"max_steps": 6})))
    lines = text.splitlines()
    for section in ("[model]", "[freeze]", "[data]", "[packing]", "[optim]", "[train]", "[dist]"):
        assert section in lines
    assert "max_steps = 6  # Optimizer steps." in lines
    assert any(
        line.startswith("weight_decay = 0.01  # Applied to weight matrices") for line in lines
    )


def test_show_config_command_prints_resolved_tree_with_docs(tmp_path, capsys):
    path = tmp_path / "stage.toml"
    path.write_text('[model]\nvision_path = "vit"\nllm_path = "llm"\n')
    code = main(
        ["show-config", str(path), "--set", "optim.learning_rate=1e-5", "--freeze_llm", "True"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "learning_rate = 1e-05" in out
    assert "freeze_llm = true  # Freeze the language model (incl. embeddings and head)." in out
    assert 'vision_path = "vit"  # Path B: a standalone InternViT directory.' in out
    # the per-module learning rates, resolved (an unset one is optim.learning_rate)
    assert (
        "# learning rates (peak; an unset one is optim.learning_rate): vision 1e-05, "
        "projector 1e-05, llm 1e-05; no ViT layer decay"
    ) in out
    # the skip policy's small-sample rule, with the run's fraction (data.max_skip_fraction 0.01)
    assert (
        "# skip policy: a run stops when more than data.max_skip_fraction (1.00%) of the records "
        "it has seen were skipped, judged from 100 records seen on"
    ) in out


def test_show_config_output_is_toml_that_reads_back_as_the_same_config(tmp_path, capsys):
    """What show-config prints is a stage file: tomllib parses it (true, not True; no None,
    no ()) and it builds the very RunConfig it was printed from."""
    import tomllib

    path = tmp_path / "stage.toml"
    path.write_text('[model]\nvision_path = "vit"\nllm_path = "llm"\n')
    settings = ("--set", 'model.conv_style="Hermes-2"', "--set", "optim.max_grad_norm=inf")
    assert main(["show-config", str(path), *settings]) == 0
    printed = capsys.readouterr().out
    assert "# force_image_size is unset" in printed  # a None field is a comment, not "None"
    assert 'preemption_signals = ["SIGTERM", "SIGUSR1", "SIGINT"]' in printed
    raw = tomllib.loads(printed)
    assert "facts" not in raw  # derived facts are comments: not settable
    expected = load_run_config(path, ['model.conv_style="Hermes-2"', "optim.max_grad_norm=inf"])
    assert build_run_config(raw) == expected
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert main(["show-config", str(again), *settings]) == 0
    assert capsys.readouterr().out == printed


def test_show_config_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "stage.toml"
    path.write_text('[model]\nvision_path = "vit"\nllm_path = "llm"\n[train]\nmax_stepz = 3\n')
    assert main(["show-config", str(path)]) == 2
    assert "did you mean max_steps" in capsys.readouterr().err


def test_a_config_error_is_one_line_on_ranks_other_than_rank_0(tmp_path, capsys, monkeypatch):
    # torchrun starts every rank with the same bad file: rank 0 says it all, the others once
    path = tmp_path / "stage.toml"
    path.write_text("[train]\nmax_stepz = 3\nsave_stepz = 1\n")
    monkeypatch.setenv("RANK", "1")
    assert main(["show-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "vlpretrain: rank 1: invalid configuration: (rank 0 printed the whole message)\n"
    )


def test_a_refusal_from_deep_in_a_command_is_a_message_not_a_traceback(capsys, monkeypatch):
    from vlpretrain import cli
    from vlpretrain.train.checkpoint.resume import ChangedConfigError

    def refuse(*args, **kwargs):
        raise ChangedConfigError("the configuration differs\n  - train.max_steps: 6 -> 8")

    monkeypatch.setattr(cli, "resolve_config", refuse)
    assert main(["show-config"]) == 1
    err = capsys.readouterr().err
    assert err == "vlpretrain: the configuration differs\n  - train.max_steps: 6 -> 8\n"


def test_ctrl_c_outside_the_training_steps_is_one_line_and_exit_130(capsys, monkeypatch):
    from vlpretrain import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "resolve_config", interrupted)  # e.g. while torch is imported
    assert main(["show-config"]) == 130  # 128 + SIGINT, as the shell reports it
    err = capsys.readouterr().err
    assert err == "vlpretrain: interrupted (Ctrl-C) outside the training steps; nothing saved\n"


CTRL_C_WHILE_IMPORTING = """
import runpy, sys

class CtrlC:  # Ctrl-C arrives while module {module} is imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
sys.argv = ["vlpretrain", "show-config"]
runpy.run_module("vlpretrain", run_name="__main__")
"""


@pytest.mark.parametrize(
    "module, message",
    [
        # The command line itself, before main() can catch anything (__main__.py does).
        ("vlpretrain.cli", "vlpretrain: interrupted (Ctrl-C) while starting; nothing saved\n"),
        # The command's libraries, which main() imports when the command runs.
        (
            "vlpretrain.config",
            "vlpretrain: interrupted (Ctrl-C) outside the training steps; nothing saved\n",
        ),
    ],
)
def test_ctrl_c_while_the_cli_starts_is_one_line_and_exit_130(module, message):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING.format(module=module)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == message


@pytest.mark.parametrize("cls", [*SECTIONS.values(), RunFacts], ids=lambda cls: cls.__name__)
def test_every_config_field_has_a_docstring(cls):
    """README promises every field is documented; show-config prints these docstrings."""
    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__}: add a docstring under {undocumented}"


def test_training_rejects_a_finite_stream(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    config = build_run_config(
        {
            "model": {"model_name_or_path": str(tmp_path)},
            "train": {"meta_path": str(meta)},
            "stream": {"num_epochs": 1},
        }
    )
    with pytest.raises(ConfigError) as caught:
        validate(config, 1)
    assert any("stream.num_epochs" in p for p in caught.value.problems)


def test_recipe_inline_section_refines_stage_file_key_by_key(tmp_path):
    stage_file = tmp_path / "stage.toml"
    stage_file.write_text(
        '[model]\nmodel_name_or_path = "x"\n[train]\nmax_steps = 100\nprecision = "bf16"\n'
    )
    recipe = {
        "pipeline": {"stages": ["s"], "output_dir": str(tmp_path / "out")},
        "stages": {"s": {"config": "stage.toml", "train": {"max_steps": 10}}},
    }
    (stage,) = build_stages(recipe, base_dir=tmp_path)
    assert stage.config.train.max_steps == 10
    assert stage.config.train.precision == "bf16"


def test_preemption_settings_are_checked_with_the_field_named():
    # SIGKILL cannot be caught, so it could never stop a run cleanly.
    problems = problems_of(minimal(train={"preemption_signals": ["SIGTERM", "SIGKILL"]}))
    assert problems == [
        "train.preemption_signals: 'SIGKILL' is not a signal a process can catch; use names "
        "such as SIGTERM, SIGUSR1, SIGINT"
    ]
    problems = problems_of(minimal(train={"preemption_grace_seconds": 0}))
    assert problems == ["train.preemption_grace_seconds must be > 0, got 0.0"]
    config = build_run_config(minimal(train={"preemption_signals": []}))
    assert config.train.preemption_signals == ()  # signals keep their usual effect
