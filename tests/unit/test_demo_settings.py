"""`vlpretrain demo --set pretrain.FIELD=VALUE`: TOML values, every problem at once, no stale reuse.

The same settings reach bench/demo_figures.py and bench/demo_llm_probe.py, which refuse bad
ones before they start any run.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from vlpretrain.cli import main
from vlpretrain.config import ConfigError
from vlpretrain.demo.pretrain import PretrainConfig
from vlpretrain.demo.run import DemoConfig, component_config, make_components, pretrain_settings

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_reads_toml_values_into_pretrain_config_fields():
    settings = pretrain_settings(
        ["pretrain.llm_lr=3e-3", "pretrain.llm_heads=[8, 2]", "pretrain.llm_steps = 10"]
    )
    assert settings == dataclasses.replace(
        PretrainConfig(), llm_lr=3e-3, llm_heads=(8, 2), llm_steps=10
    )
    assert pretrain_settings(["pretrain.llm_lr=1"]).llm_lr == 1.0  # TOML int widened


def test_set_reports_every_bad_assignment_at_once():
    with pytest.raises(ConfigError) as error:
        pretrain_settings(
            ["pretrain.llm_lr=1", "pretrain.llm_rate=3e-3", "pretrain.llm_steps",
             "llm_texts=10", "pretrain.llm_batch=eight", "pretrain.seed=3"]
        )  # fmt: skip
    problems = error.value.problems
    assert len(problems) == 5
    message = str(error.value)
    assert "pretrain.llm_rate" in message and "llm_lr" in message  # nearest valid key
    assert "'pretrain.llm_steps'" in message and "'llm_texts=10'" in message
    assert "pretrain.llm_batch must be an integer" in message
    assert "'pretrain.seed=3'" in message and "--seed" in message  # the demo sets it


def test_demo_cli_refuses_bad_settings_before_writing_anything(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(["demo", "--output", str(output), "--set", "pretrain.llm_rate=1"])
    assert code == 2
    assert "pretrain.llm_rate" in capsys.readouterr().err
    assert not output.exists()


def test_components_made_with_other_settings_are_not_reused(tmp_path):
    made = component_config(DemoConfig())
    (tmp_path / "components").mkdir()
    record = dataclasses.asdict(dataclasses.replace(made, llm_steps=10))
    (tmp_path / "components" / "pretrain.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=rf"llm_steps 10 -> {made.llm_steps}.*another --output"):
        make_components(tmp_path, DemoConfig())


@pytest.mark.parametrize("bench", ["demo_figures", "demo_llm_probe"])
def test_benches_refuse_bad_settings_before_any_run(bench, tmp_path, capsys):
    args = ["--set", "pretrain.llm_rate=1", "--output", str(tmp_path / "out")]
    if bench == "demo_llm_probe":
        args += ["--pretrain", "0"]
    with pytest.raises(SystemExit) as exit_:
        load_bench(bench).main(args)
    assert exit_.value.code == 2
    assert "pretrain.llm_rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
