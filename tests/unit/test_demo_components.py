"""The demo's shipped components and tools/make_demo_components.py, which makes them: cell words
built from the words they name, the LLM's answer-only labels, isolated packing, seeded
pretraining, and shipped files that are the script's current settings."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path

import pytest
import tomllib
import torch

from vlpretrain.config import ConfigError
from vlpretrain.demo.run import DemoConfig, copy_components
from vlpretrain.testing.shapes import caption_corpus, chat_text
from vlpretrain.testing.tokenizer import train_tiny_tokenizer
from vlpretrain.tokens import IMG_END, IMG_START

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_demo_components.py"


def load_tool():
    """tools/make_demo_components.py as a module (registered first: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("make_demo_components", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = load_tool()
CELL_TOKENS, IGNORE, CellWordEmbedding = tool.CELL_TOKENS, tool.IGNORE, tool.CellWordEmbedding
answer_labels, attribute_value_ids, pack_texts = (
    tool.answer_labels, tool.attribute_value_ids, tool.pack_texts
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    directory: Path = tmp_path_factory.mktemp("tokenizer")
    return train_tiny_tokenizer(
        directory, caption_corpus(0), 640, (IMG_START, IMG_END, *CELL_TOKENS)
    )


def test_cell_word_is_its_marker_plus_the_words_it_names(tokenizer) -> None:
    vocabulary = tokenizer.get_vocab()
    cells = CellWordEmbedding([vocabulary[token] for token in CELL_TOKENS[1:]],
                              attribute_value_ids(tokenizer), hidden=8)  # fmt: skip
    with torch.no_grad():
        cells.marker.copy_(torch.arange(8.0))
    embedding_VD = torch.randn(len(tokenizer), 8, requires_grad=True)
    table_VD = cells.table(embedding_VD)

    def row(word: str) -> torch.Tensor:
        (token,) = tokenizer(word)["input_ids"]
        return embedding_VD[token]

    cell = vocabulary["<|large red circle left|>"]
    expected = row("large") + row("red") + row("circle") + row("left") + cells.marker
    assert torch.allclose(table_VD[cell], expected)
    # Every other row is the embedding's own, and the answer words learn through the cells.
    cell_rows = set(cells.word_ids.tolist())
    others = [k for k in range(len(tokenizer)) if k not in cell_rows]
    assert torch.equal(table_VD[others], embedding_VD[others])
    table_VD[cell].sum().backward()
    assert embedding_VD.grad is not None
    (red,) = tokenizer("red")["input_ids"]
    assert torch.equal(embedding_VD.grad[red], torch.ones(8))
    # export() writes the same sums into a plain embedding table.
    plain = torch.nn.Embedding(len(tokenizer), 8)
    with torch.no_grad():
        plain.weight.copy_(embedding_VD)
    cells.export(plain)
    assert torch.allclose(plain.weight, table_VD)


def test_cell_word_gradient_is_the_same_bits_with_one_or_two_threads(tokenizer) -> None:
    # Indexing's backward on CPU adds repeated rows in a thread-dependent order; the demo's
    # LLM then differed run to run with two threads (docs/demo-notes.md, "CPU and thread count").
    vocabulary = tokenizer.get_vocab()
    cells = CellWordEmbedding([vocabulary[token] for token in CELL_TOKENS[1:]],
                              attribute_value_ids(tokenizer), hidden=128)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    embedding_VD = torch.randn(len(tokenizer), 128, generator=generator, requires_grad=True)
    upstream_VD = torch.randn(len(tokenizer), 128, generator=generator)
    threads = torch.get_num_threads()

    def gradient(num_threads: int) -> torch.Tensor:
        torch.set_num_threads(num_threads)
        embedding_VD.grad = None
        (cells.table(embedding_VD) * upstream_VD).sum().backward()
        assert embedding_VD.grad is not None
        return embedding_VD.grad.clone()

    try:
        one = gradient(1)
        assert all(torch.equal(one, gradient(2)) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


def test_attribute_words_must_be_whole_tokens(tmp_path: Path) -> None:
    bytes_only = train_tiny_tokenizer(tmp_path, ["ab"], 260)
    with pytest.raises(ValueError, match="splits the answer word 'small'"):
        attribute_value_ids(bytes_only)


def test_answer_labels_keep_only_the_answers_and_their_end(tokenizer) -> None:
    text = chat_text([("What colour is the circle?", "red"), ("Is there a square?", "no")])
    ids = tokenizer(text)["input_ids"]
    start = tokenizer("<|im_start|>assistant\n")["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = answer_labels(ids, start, end)
    kept = [token for token in labels if token != IGNORE]
    assert tokenizer.decode(kept) == "red<|im_end|>no<|im_end|>"
    # Every kept label is the input token at that position.
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids, strict=True))


def test_pack_texts_fits_best_longest_first_and_restarts_positions() -> None:
    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE, 2, 3], [IGNORE, 5], [IGNORE, 7, 8, 9]]
    ids, targets, positions = pack_texts(texts, labels, row_tokens=6, pad_id=0)
    # Longest first: 4 tokens open row 0, 3 do not fit its 2 free ones and open row 1, and 2
    # fill row 0 exactly (in corpus order the rows would be 5 + 4 tokens, and 3 would go on).
    assert ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert targets.tolist() == [[IGNORE, 7, 8, 9, IGNORE, 5],
                                [IGNORE, 2, 3, IGNORE, IGNORE, IGNORE]]  # fmt: skip
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]


def test_pack_texts_refuses_a_text_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match=r"text 1, 7 tokens.*llm_row_tokens"):
        pack_texts([[1], list(range(7))], [[1], list(range(7))], row_tokens=6, pad_id=0)


def test_pack_texts_refuses_labels_for_other_texts() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 label lists"):
        pack_texts([[1], [2]], [[1]], row_tokens=6, pad_id=0)


def test_tiny_llm_init_std_sets_the_initial_weight_scale() -> None:
    from transformers import Qwen2ForCausalLM

    from vlpretrain.testing.components import tiny_llm_config

    def weight_std(init_std: float) -> float:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_llm_config(100, init_std=init_std))
        return float(model.model.layers[0].self_attn.q_proj.weight.std())

    assert weight_std(0.02) == pytest.approx(0.02, rel=0.1)
    assert weight_std(0.1) == pytest.approx(0.1, rel=0.1)


def test_llm_snapshots_are_the_llm_at_those_steps_and_leave_training_alone(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    PretrainConfig, make_llm = tool.PretrainConfig, tool.make_llm

    def weights(directory: Path) -> dict[str, torch.Tensor]:
        return load_file(directory / "model.safetensors")

    settings = PretrainConfig(llm_steps=4, llm_texts=40, llm_hidden=32, llm_snapshot_steps=(2, 4))
    make_llm(settings, tmp_path / "llm")
    make_llm(PretrainConfig(llm_steps=4, llm_texts=40, llm_hidden=32), tmp_path / "plain")
    final, plain = weights(tmp_path / "llm"), weights(tmp_path / "plain")
    at_2, at_4 = weights(tmp_path / "llm_step2"), weights(tmp_path / "llm_step4")
    assert all(torch.equal(final[name], plain[name]) for name in final)  # training unchanged
    assert all(torch.equal(final[name], at_4[name]) for name in final)
    assert not all(torch.equal(final[name], at_2[name]) for name in final)
    assert (tmp_path / "llm_step2" / "tokenizer.json").exists()


def test_vit_pretraining_depends_on_its_seed_only(tmp_path: Path) -> None:
    """Not on torch's global generator, which imports and earlier work may have advanced (the
    probe's initialisation drew from it: transformers 5.25 then gave another ViT than 5.24)."""
    from safetensors.torch import load_file

    PretrainConfig, pretrain_vision = tool.PretrainConfig, tool.pretrain_vision

    settings = PretrainConfig(vision_steps=2, vision_batch=4)
    saved = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        directory = pretrain_vision(settings, tmp_path / f"vit_{global_seed}")
        saved.append(load_file(directory / "model.safetensors"))
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])


def test_set_reads_toml_values_into_pretrain_config_fields() -> None:
    settings = tool.pretrain_settings(
        ["pretrain.llm_lr=3e-3", "pretrain.llm_heads=[8, 2]", "pretrain.llm_steps = 10"]
    )
    assert settings == dataclasses.replace(
        tool.PretrainConfig(), llm_lr=3e-3, llm_heads=(8, 2), llm_steps=10
    )
    assert tool.pretrain_settings(["pretrain.llm_lr=1"]).llm_lr == 1.0  # TOML int widened


def test_set_reports_every_bad_assignment_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        tool.pretrain_settings(
            ["pretrain.llm_lr=1", "pretrain.llm_rate=3e-3", "pretrain.llm_steps",
             "llm_texts=10", "pretrain.llm_batch=eight"]
        )  # fmt: skip
    assert len(error.value.problems) == 4
    message = str(error.value)
    assert "pretrain.llm_rate" in message and "llm_lr" in message  # nearest valid key
    assert "'pretrain.llm_steps'" in message and "'llm_texts=10'" in message
    assert "pretrain.llm_batch must be an integer" in message


def test_tool_refuses_bad_settings_before_writing_anything(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--set", "pretrain.llm_rate=1", "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "pretrain.llm_rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


ASSETS = resources.files("vlpretrain.demo") / "assets"


def test_shipped_components_are_what_the_tool_makes_today() -> None:
    """Changing a default of PretrainConfig without rerunning the tool fails here, and so does
    a shipped file that is not the one the tool wrote."""
    manifest = json.loads((ASSETS / "components.json").read_text())
    assert manifest["settings"] == json.loads(json.dumps(dataclasses.asdict(tool.PretrainConfig())))
    with resources.as_file(ASSETS) as directory:
        assert manifest["files"] == tool.file_digests(directory)
        expected = {"vit/config.json", "vit/model.safetensors", "llm/config.json",
                    "llm/model.safetensors", "llm/tokenizer.json"}  # fmt: skip
        assert expected <= set(manifest["files"])
        size = sum((directory / name).stat().st_size for name in manifest["files"])
    assert size < 4 * 2**20  # package data stays small: a few MB


def test_shipped_components_fit_the_demo_dataset() -> None:
    # 48-px tiles (3x3 cells of 16 px) and the same held-out layouts as the demo's data, so no
    # component has seen a layout the demo evaluates on.
    settings = json.loads((ASSETS / "components.json").read_text())["settings"]
    demo = DemoConfig()
    assert (settings["tile_size"], settings["held_out_fraction"]) == (
        demo.image_size, demo.held_out_fraction
    )  # fmt: skip


def test_every_demo_asset_is_package_data() -> None:
    """The demo reads its recipe and components through importlib.resources, so an installed
    wheel must carry every file under assets/: pyproject's package-data globs must match each."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["vlpretrain.demo"]
    package = REPO / "vlpretrain" / "demo"
    files = [p.relative_to(package).as_posix() for p in (package / "assets").rglob("*")
             if p.is_file()]  # fmt: skip
    assert "assets/recipe.toml" in files and "assets/llm/model.safetensors" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


def test_demo_copies_the_shipped_components_once(tmp_path) -> None:
    components = copy_components(tmp_path)
    assert sorted(p.name for p in components.iterdir()) == ["components.json", "llm", "vit"]
    manifest = json.loads((components / "components.json").read_text())
    assert manifest["files"] == tool.file_digests(components)
    assert copy_components(tmp_path) == components  # a rerun reuses them
    assert [p.name for p in tmp_path.iterdir()] == ["components"]  # no partial copy left


def test_demo_refuses_components_that_are_not_the_shipped_ones(tmp_path) -> None:
    # An output directory of a demo that pretrained its own components: its stages were trained
    # from other weights, so reusing them (or mixing in the shipped ones) would mislead.
    (tmp_path / "components" / "llm").mkdir(parents=True)
    (tmp_path / "components" / "pretrain.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"components holds other components.*another --output"):
        copy_components(tmp_path)
