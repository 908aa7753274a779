"""The checkpoint contract: one `states` mapping restored in a fixed order, no pickles, a
manifest checked on resume with a fallback to the newest intact checkpoint, I/O errors that
name the path and the OS error."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import pickle
import resource
import signal
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from vlpretrain.train.checkpoint.manifest import MANIFEST, CheckpointError, hash_files
from vlpretrain.train.checkpoint.states import LoaderState, TrainState, training_states
from vlpretrain.train.checkpoint.store import (
    FORMAT_VERSION,
    STATE_LAYOUT,
    Checkpointer,
    check_resume_checkpoint,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

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


def test_an_async_save_is_finished_at_the_next_save_and_resumes_like_a_sync_one(tmp_path):
    """The async checkpoint copies the state at save time: the steps taken while it is
    written do not leak into it, it stays `.tmp` (ignored by resume) until the next save or
    `finish`, and it restores exactly what a synchronous save of the same step restores."""
    straight = make_run(seed=0)
    checkpointer = Checkpointer(asynchronous=True)
    step(straight)
    checkpointer.save(tmp_path, straight["states"], step=1, config=CONFIG, keep=3)
    sync_path = save(straight, tmp_path / "sync")
    step(straight)  # training goes on while the tensors are written
    assert list_checkpoints(tmp_path) == []
    assert (tmp_path / "checkpoints" / "step-00000001.tmp").is_dir()
    checkpointer.save(tmp_path, straight["states"], step=2, config=CONFIG, keep=3)
    assert [number for number, _ in list_checkpoints(tmp_path)] == [1]
    final = checkpointer.finish()
    assert final is not None and [n for n, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert checkpointer.finish() is None

    from_async, from_sync = make_run(seed=1), make_run(seed=2)
    load_checkpoint(tmp_path / "checkpoints" / "step-00000001", from_async["states"])
    load_checkpoint(sync_path, from_sync["states"])
    for key, value in from_sync["model"].state_dict().items():
        assert torch.equal(value, from_async["model"].state_dict()[key]), key
    async_moments = from_async["optimizer"].state_dict()["state"]
    for index, moments in from_sync["optimizer"].state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, async_moments[index][name]), (index, name)
    assert from_async["state"] == from_sync["state"]


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


def plant_byte_entry(path: Path, key: str, payload: bytes) -> None:
    """What an attacker with write access does: make `.metadata` declare `key` a DCP byte
    entry (the kind DCP unpickles) stored in bytes appended to the shard, and re-hash."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    shard = path / "__0_0.distcp"
    offset = shard.stat().st_size
    with shard.open("ab") as handle:
        handle.write(payload)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in metadata.storage_data if i.fqn == key]:
        del metadata.storage_data[index]
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_0.distcp", offset, len(payload))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"].update(hash_files(path, 0, 1))
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "key",
    [
        "optimizer.param_groups.0.lr",  # an optimizer setting (a pickle in DCP's own layout)
        "optimizer.state.weight.exp_avg",  # a tensor entry turned into a byte entry
    ],
)
def test_a_payload_in_a_dcp_byte_entry_is_refused_and_never_runs(tmp_path, key):
    run = make_run(seed=0)
    step(run)
    path = save(run, tmp_path / "run")
    marker = tmp_path / "payload_ran"
    PLANTED_MARKER[:] = [str(marker)]
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)  # how DCP itself writes a byte entry
    plant_byte_entry(path, key, buffer.getvalue())
    assert find_resume_checkpoint(tmp_path / "run") == path  # the manifest matches ...
    with pytest.raises(CheckpointError, match=f"{key}.* are not tensors.*refusing"):
        load_checkpoint(path, make_run(seed=1)["states"])
    assert not marker.exists()  # ... but nothing ran
    # The same bytes loaded the way DCP's default planner does would have run: the test can fail.
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()


def test_a_pickled_entry_is_refused_by_the_load_planner_too(tmp_path):
    """The planner refuses byte entries itself, should a reader ever let one through."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    from vlpretrain.train.checkpoint.tensors import TensorOnlyLoadPlanner, split_tensors

    run = make_run(seed=0)
    step(run)
    path = save(run, tmp_path)
    marker = tmp_path / "payload_ran"
    PLANTED_MARKER[:] = [str(marker)]
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    plant_byte_entry(path, "optimizer.state.weight.exp_avg", buffer.getvalue())
    tensors, _ = split_tensors({"optimizer": run["states"]["optimizer"].state_dict()})
    with pytest.raises(CheckpointException, match="are not tensors but pickles; refusing"):
        dcp.load(tensors, storage_reader=FileSystemReader(path), planner=TensorOnlyLoadPlanner())
    assert not marker.exists()


def test_dcp_files_hold_only_tensors_and_the_optimizer_settings_are_json(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from vlpretrain.train.checkpoint.manifest import MetadataSafeReader

    straight = make_run(seed=0)
    step(straight)
    path = save(straight, tmp_path)
    metadata = MetadataSafeReader(path).read_metadata()
    assert "model.weight" in metadata.state_dict_metadata
    assert not [
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
    ]
    group = json.loads((path / "shared.json").read_text())["structures"]["dict"]["optimizer"]
    group = group["dict"]["param_groups"]["list"][0]["dict"]
    # LambdaLR after one step: lr = 0.1 * 1 / (1 + 1)
    assert group["lr"] == {"value": 0.05}
    assert group["betas"] == {"tuple": [{"value": 0.9}, {"value": 0.999}]}
    assert group["params"] == {"list": [{"value": "weight"}, {"value": "bias"}]}
    resumed = make_run(seed=1)
    resumed["optimizer"].param_groups[0]["betas"] = (0.5, 0.5)  # must come back as saved
    load_checkpoint(path, resumed["states"])

    def settings(run):
        return [
            {k: v for k, v in g.items() if k != "params"} for g in run["optimizer"].param_groups
        ]

    assert settings(resumed) == settings(straight)
    assert resumed["optimizer"].param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again


def test_a_checkpoint_with_pickled_optimizer_settings_is_refused_saying_why(tmp_path):
    run = make_run(seed=0)
    path = save(run, tmp_path)
    shared = json.loads((path / "shared.json").read_text())
    shared["format_version"] = 3  # the format that kept lr, betas, ... as DCP byte entries
    (path / "shared.json").write_text(json.dumps(shared))
    with pytest.raises(ValueError, match="version 3, which stored the optimizer's settings"):
        load_checkpoint(path, make_run(seed=0)["states"])


def rewrite_manifest(path: Path, name: str, target: Path) -> None:
    """List `name` in the manifest with `target`'s true size and hash, as an attacker would."""
    from vlpretrain.train.checkpoint.manifest import HASH, file_hash

    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = {"size": target.stat().st_size, HASH: file_hash(target)}
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["dot_dot", "absolute", "symlink"])
def test_a_manifest_may_name_only_files_inside_its_checkpoint(tmp_path, how):
    path = save(make_run(seed=0), tmp_path / "run")
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of any checkpoint\n")
    if how == "dot_dot":
        name = "../../../secret.txt"  # step-N -> checkpoints -> run -> tmp_path
        assert (path / name).resolve() == outside.resolve()
    elif how == "absolute":
        name = str(outside)
    else:
        name = "rank-00001.json"
        (path / name).symlink_to(outside)
    rewrite_manifest(path, name, outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as error:
        check_resume_checkpoint(path)
    assert name in str(error.value)


def test_a_symlink_to_a_file_inside_the_checkpoint_is_accepted(tmp_path):
    path = save(make_run(seed=0), tmp_path)
    (path / "copy.json").symlink_to(path / "shared.json")
    rewrite_manifest(path, "copy.json", path / "shared.json")
    assert check_resume_checkpoint(path) == path


def test_every_checkpoint_file_gets_the_umask_permissions(tmp_path):
    run = make_run(seed=0)
    step(run)
    previous = os.umask(0o027)
    try:
        path = save(run, tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    # 0o666 & ~0o027 = 0o640 for files; 0o777 & ~0o027 = 0o750 for the directory
    assert modes == {name: 0o640 for name in modes} and len(modes) == 6
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


def test_dcp_metadata_may_name_only_data_inside_its_checkpoint(tmp_path):
    run = make_run(seed=0)
    step(run)
    path = save(run, tmp_path / "run")
    metadata = pickle.loads((path / ".metadata").read_bytes())
    (index, info), *_ = metadata.storage_data.items()
    (tmp_path / "elsewhere.distcp").write_bytes((path / info.relative_path).read_bytes())
    info.relative_path = "../../../elsewhere.distcp"  # step-N -> checkpoints -> run -> tmp_path
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(path, ".metadata", path / ".metadata")
    assert check_resume_checkpoint(path) == path
    with pytest.raises(
        CheckpointError, match="'../../../elsewhere.distcp', outside the checkpoint"
    ):
        load_checkpoint(path, make_run(seed=1)["states"])
