"""Nothing in a model directory runs unless model.trust_remote_code says so.

The remote tokenizer below is our own stand-in: importing it writes a marker file, so a test
can see whether the directory's Python ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpretrain.config import build_run_config
from vlpretrain.flags import apply_reference_flags
from vlpretrain.model.build import ModelConfig
from vlpretrain.model.llm import llm_from_config, load_tokenizer
from vlpretrain.testing.tokenizer import train_tiny_tokenizer

REMOTE_TOKENIZER = """
from pathlib import Path
from transformers import PreTrainedTokenizerFast

Path({marker!r}).write_text("yes")


class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def remote_tokenizer_dir(tmp_path) -> Path:
    directory = tmp_path / "remote_tok"
    train_tiny_tokenizer(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "MarkerTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "marker_tokenization.MarkerTokenizer"]}
    config_path.write_text(json.dumps(config))
    # transformers imports a copy from its module cache: the marker path is absolute.
    marker = str(directory / "remote_code_ran")
    (directory / "marker_tokenization.py").write_text(REMOTE_TOKENIZER.format(marker=marker))
    return directory


def test_remote_tokenizer_refused_by_default_naming_the_setting(remote_tokenizer_dir):
    with pytest.raises(ValueError, match="Set model.trust_remote_code = true") as error:
        load_tokenizer(remote_tokenizer_dir)
    assert f"{remote_tokenizer_dir}/tokenizer_config.json" in str(error.value)
    assert "MarkerTokenizer" in str(error.value)
    assert not (remote_tokenizer_dir / "remote_code_ran").exists()


def test_remote_tokenizer_runs_when_trusted(remote_tokenizer_dir):
    tokenizer, added = load_tokenizer(remote_tokenizer_dir, trust_remote_code=True)
    assert type(tokenizer).__name__ == "MarkerTokenizer" and added == 9
    assert (remote_tokenizer_dir / "remote_code_ran").read_text() == "yes"


def test_remote_llm_is_refused_even_when_trusted():
    with pytest.raises(ValueError, match="'mystery_lm' cannot train packed: it exists only as"):
        llm_from_config({"model_type": "mystery_lm", "auto_map": {"AutoModel": "m.M"}})


def test_default_is_off_and_reference_flags_turn_it_on(tmp_path):
    assert ModelConfig(vision_path="v", llm_path="l").trust_remote_code is False
    paths = ["--vision_path", "v", "--llm_path", "l"]
    raw: dict = {}
    apply_reference_flags(raw, paths)
    assert build_run_config(raw).model.trust_remote_code is True
    raw = {}
    apply_reference_flags(raw, [*paths, "--trust_remote_code", "False"])
    assert build_run_config(raw).model.trust_remote_code is False
    raw = {"model": {"trust_remote_code": False}}
    apply_reference_flags(raw, paths)  # a TOML's explicit choice wins over the flag default
    assert build_run_config(raw).model.trust_remote_code is False


def test_loaded_llm_uses_no_hub_kernels_in_train_mode(tmp_path):
    # transformers 5.25 turned Hub kernels on by default: code fetched from the Hub that
    # replaces layers, and a kernelize() in train() that fails on FSDP's meta-device init.
    from vlpretrain.model.llm import load_llm
    from vlpretrain.testing.components import build_tiny_components

    model = load_llm(build_tiny_components(tmp_path).llm_path)
    model.train()
    assert model.use_kernels is False
    assert getattr(model, "_kernels_mode", None) is None
