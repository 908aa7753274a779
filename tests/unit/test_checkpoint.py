"""The checkpoint contract: one `states` mapping restored in a fixed order, no pickles, a
manifest checked on resume with a fallback to the newest intact checkpoint, I/O errors that
name the path and the OS error."""

from __future__ import annotations

import ast
import json
import logging
import pickle
import resource
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from vlpretrain.train.checkpoint import (
    FORMAT_VERSION,
    STATE_LAYOUT,
    check_resume_checkpoint,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from vlpretrain.train.checkpoint_manifest import MANIFEST, CheckpointError, hash_files
from vlpretrain.train.states import LoaderState, TrainState, training_states

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"train": {"max_steps": 4}}


class DrawingLoader:
    """Counts batches; creating an iterator draws from the torch RNG, as DataLoader does."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        torch.rand(1)  # the DataLoader draws its base seed here

        def batches():
            while True:
                self.position += 1
                yield torch.full((2, 3), float(self.position))

        return batches()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_run(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = TrainState()
    states = training_states(model, optimizer, scheduler, DrawingLoader(), state)
    return {"model": model, "optimizer": optimizer, "state": state, "states": states}


def step(run: dict) -> None:
    batch = next(run["states"]["loader"].iterator)
    noise = torch.randn(2, 2)  # the step itself draws from the RNG too (dropout, drop-path)
    loss = ((run["model"](batch) + noise) ** 2).mean()
    loss.backward()
    run["optimizer"].step()
    run["optimizer"].zero_grad()
    run["states"]["scheduler"].step()
    run["state"].step += 1
    run["state"].tokens_seen += 6


def save(run: dict, output_dir: Path, keep: int = 3) -> Path:
    return save_checkpoint(
        output_dir, run["states"], step=run["state"].step, config=CONFIG, keep=keep
    )


def test_resume_restores_every_part_in_order(tmp_path):
    straight = make_run(seed=0)
    for _ in range(2):
        step(straight)
    path = save(straight, tmp_path)
    for _ in range(2):
        step(straight)

    resumed = make_run(seed=1)  # different initial weights and RNG: all must come back
    shared = load_checkpoint(path, resumed["states"])
    assert shared["step"] == 2 and shared["config"] == CONFIG
    assert resumed["state"].step == 2 and resumed["state"].tokens_seen == 12
    for _ in range(2):
        step(resumed)
    # Bit for bit: weights, Adam moments, LR schedule, loader position and the RNG stream after
    # the loader's iterator drew from it (restoring the RNG before that draw would differ).
    for key, value in straight["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[key]), key
    assert (
        straight["states"]["scheduler"].get_last_lr()
        == resumed["states"]["scheduler"].get_last_lr()
    )
    assert (
        straight["states"]["loader"].loader.position
        == resumed["states"]["loader"].loader.position
        == 4
    )
    assert resumed["state"] == straight["state"]


def test_the_layout_names_every_part_and_a_wrong_mapping_is_refused(tmp_path):
    run = make_run(seed=0)
    assert list(run["states"]) == [name for name, _ in STATE_LAYOUT]
    partial = {k: v for k, v in run["states"].items() if k != "rng"}
    with pytest.raises(ValueError, match="the layout needs"):
        save_checkpoint(tmp_path, partial, step=1, config=CONFIG, keep=1)


def test_plain_state_is_json_and_tensors_are_safetensors(tmp_path):
    run = make_run(seed=0)
    step(run)
    path = save(run, tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        ".metadata",
        "__0_0.distcp",
        MANIFEST,
        "rank-00000.json",
        "rank-00000.rng.safetensors",
        "shared.json",
    ]
    local = json.loads((path / "rank-00000.json").read_text())
    assert local["states"]["loader"] == {"position": 1}
    assert local["states"]["train_state"]["step"] == 1
    shared = json.loads((path / "shared.json").read_text())
    assert shared["format_version"] == FORMAT_VERSION and shared["world_size"] == 1
    assert shared["states"]["scheduler"]["last_epoch"] == 1
    manifest = json.loads((path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [n for n in names if n != MANIFEST]
    assert manifest["files"]["shared.json"]["size"] == (path / "shared.json").stat().st_size


def test_another_format_version_is_refused_with_the_versions(tmp_path):
    run = make_run(seed=0)
    path = save(run, tmp_path)
    shared = json.loads((path / "shared.json").read_text())
    shared["format_version"] = FORMAT_VERSION + 1
    (path / "shared.json").write_text(json.dumps(shared))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*reads version"):
        load_checkpoint(path, make_run(seed=0)["states"])


class Payload:
    """Runs code when unpickled: what a tampered checkpoint file would carry."""

    def __reduce__(self):
        return (Path.touch, (Path(PLANTED_MARKER[0]),))


PLANTED_MARKER: list[str] = []


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    run = make_run(seed=0)
    step(run)
    path = save(run, tmp_path / "run")
    marker = tmp_path / "payload_ran"
    PLANTED_MARKER[:] = [str(marker)]
    # The attacker rewrites DCP's pickled .metadata and even re-hashes the manifest.
    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"].update(hash_files(path, 0, 1))
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert check_resume_checkpoint(path) == path  # the manifest matches ...
    with pytest.raises(CheckpointError, match=r"\.metadata refers to pathlib.Path.touch|refusing"):
        load_checkpoint(path, make_run(seed=0)["states"])
    assert not marker.exists()  # ... but nothing ran
    # The same payload loaded the unsafe way would have run: the test can fail.
    pickle.loads((path / ".metadata").read_bytes())
    assert marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    offenders = []
    for file in sorted((REPO / "vlpretrain").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flags = {k.arg: k.value for k in node.keywords}
                safe = (
                    isinstance(flags.get("weights_only"), ast.Constant)
                    and flags["weights_only"].value is True
                )
                if not safe:
                    offenders.append(f"{file.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def three_checkpoints(output_dir: Path) -> list[Path]:
    run = make_run(seed=0)
    paths = []
    for _ in range(3):
        step(run)
        paths.append(save(run, output_dir))
    return paths


def test_a_corrupted_latest_is_reported_and_the_previous_one_used(tmp_path, caplog):
    first, second, third = three_checkpoints(tmp_path)
    data = bytearray((third / "__0_0.distcp").read_bytes())
    data[100:108] = b"\xff" * 8  # 8 bytes overwritten inside the tensor data, same size
    (third / "__0_0.distcp").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == second
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(third) in message and "__0_0.distcp content differs" in message
    assert f"resuming from {second}" in message


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("empty", "empty directory"),
        ("no_manifest", "no manifest.json"),
        ("truncated", "rank-00000.json has"),
        ("missing_file", "rank-00000.rng.safetensors is missing"),
        ("bad_manifest_json", "manifest.json: invalid JSON at line 1 column 2"),
    ],
)
def test_a_partial_or_invalid_latest_falls_back_with_its_reason(tmp_path, caplog, damage, reason):
    _, second, third = three_checkpoints(tmp_path)
    if damage == "empty":
        for file in third.iterdir():
            file.unlink()
    elif damage == "no_manifest":
        (third / MANIFEST).unlink()
    elif damage == "truncated":
        text = (third / "rank-00000.json").read_text()
        (third / "rank-00000.json").write_text(text[: len(text) // 2])
    elif damage == "missing_file":
        (third / "rank-00000.rng.safetensors").unlink()
    else:
        (third / MANIFEST).write_text("{half written")
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == second
    assert any(reason in r.getMessage() and str(third) in r.getMessage() for r in caplog.records)
    resumed = make_run(seed=1)
    load_checkpoint(second, resumed["states"])
    assert resumed["state"].step == 2


def test_no_intact_checkpoint_is_one_clear_error_listing_each(tmp_path):
    paths = three_checkpoints(tmp_path)
    for path in paths:
        (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        find_resume_checkpoint(tmp_path)
    assert all(str(path) in str(error.value) for path in paths)
    assert find_resume_checkpoint(tmp_path / "nothing_here") is None


def test_an_explicit_resume_directory_is_verified_without_fallback(tmp_path):
    _, _, third = three_checkpoints(tmp_path)
    (third / "shared.json").write_text("{}")
    with pytest.raises(CheckpointError, match="train.resume .* cannot be used: shared.json has"):
        check_resume_checkpoint(third)


def test_a_failed_write_names_path_and_os_error_and_keeps_earlier_checkpoints(tmp_path):
    run = make_run(seed=0)
    step(run)
    first = save(run, tmp_path)
    step(run)
    # A per-file size limit makes the next write fail with a real OS error (EFBIG), like a
    # full disk (ENOSPC) would, without needing a small file system.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        with pytest.raises(CheckpointError) as error:
            save(run, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert "step-00000002.tmp" in message and "File too large" in message
    assert "Earlier checkpoints are untouched" in message
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert find_resume_checkpoint(tmp_path) == first


def test_train_state_refuses_unknown_fields():
    with pytest.raises(ValueError, match="expected"):
        TrainState().load_state_dict({"step": 1})


def test_loader_state_creates_its_iterator_once():
    wrapper = LoaderState(DrawingLoader())
    assert wrapper.iterator is wrapper.iterator
