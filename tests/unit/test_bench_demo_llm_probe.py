"""bench/demo_llm_probe.py's --set reads PretrainConfig fields and reports every bad one at once."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "demo_llm_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("demo_llm_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_reads_toml_values_into_pretrain_config_fields():
    probe = load_probe()
    overrides = probe.pretrain_overrides(["llm_lr=3e-3", "llm_heads=[8, 2]", "llm_steps = 10"])
    assert overrides == {"llm_lr": 3e-3, "llm_heads": (8, 2), "llm_steps": 10}


def test_set_names_every_unknown_or_malformed_assignment():
    probe = load_probe()
    with pytest.raises(SystemExit) as error:
        probe.pretrain_overrides(["llm_lr=1", "llm_rate=3e-3", "llm_steps"])
    message = str(error.value)
    assert "'llm_rate=3e-3'" in message and "'llm_steps'" in message
    assert "'llm_lr=1'" not in message and "llm_heads" in message
