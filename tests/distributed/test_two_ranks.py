"""Two gloo ranks on CPU: DDP and FSDP2 equal one rank with the same global batch; an image-less
rank does not hang; a 2-rank CLI run checkpoints (DCP) and resumes exactly.

Equivalence: one rank with gradient_accumulation_steps = 2 over micro-batches (A, B) vs two
ranks with A on rank 0 and B on rank 1. Both normalise by the global weight sum wA + wB, so
the gradients are mathematically equal. They are not bit-equal: the single rank adds B's
gradient into A's in autograd, the two ranks all-reduce (and FSDP reduce-scatters flattened
shards) and divide by the world size, and the ranks run one thread each. Those are different
float32 summation orders (about 1 ulp per gradient element). AdamW then divides each gradient
by its own running magnitude, so for elements whose gradient is near zero that rounding shows
up as an absolute, not a relative, difference of the update. Hence the tolerance: 1e-6
relative plus 1e-6 absolute, a thousandth of one step's update at learning rate 1e-3
(measured: at most 1.2e-7, i.e. 1 ulp of the norm weights near 1.0, after 3 steps).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from train_fixtures import (
    cli_env,
    losses_by_step,
    read_metrics,
    records_read,
    records_seen,
    stage_raw,
    torch_threads,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

from vlpretrain.cli import main
from vlpretrain.config import RunConfig, build_run_config
from vlpretrain.data.build import build_sources
from vlpretrain.data.collate import PackedBatch, collate_rows
from vlpretrain.data.loader import build_dataloader
from vlpretrain.data.packing import PackItem, PackRow, PieceRef
from vlpretrain.data.samples import IGNORE_INDEX, SampleSource, TokenizedSample
from vlpretrain.data.skips import SKIP_LOG_NAME, SkipLog
from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.build import run_facts
from vlpretrain.train.checkpoint.store import list_checkpoints
from vlpretrain.train.evaluate import EvalConfig
from vlpretrain.train.loop import evaluate_held_out, held_out_data, prepare_model, train_step
from vlpretrain.train.optim import build_optimizer

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NUM_STEPS = 3
RTOL, ATOL = 1e-6, 1e-6
SPAWN_TIMEOUT = 420
"""Seconds for a spawned 2-rank job (5 jobs take ~250 s on a loaded 2-core box); a hang (a rank
skipping a collective) fails the test."""


def run_config(
    train_assets,  # noqa: F811
    strategy: str,
    accumulation: int,
    attention: str = "auto",
    precision: str = "fp32",
) -> RunConfig:
    """Stage-2 style (everything trains) so DDP / FSDP sync every part of the model."""
    raw = stage_raw(
        train_assets,
        "unused",
        stage="stage2",
        optim={"learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant"},
        dist={"strategy": strategy},
        model={"attn_implementation": attention},
    )
    raw["train"]["gradient_accumulation_steps"] = accumulation
    raw["train"]["precision"] = precision
    return build_run_config(raw)


def text_only_batch(tokenizer, config: RunConfig, facts) -> PackedBatch:
    """A micro-batch of two pure-text samples: no real tile, so collate adds one dummy tile."""
    samples = []
    for index, text in enumerate(["how many shapes are there? three", "is the sky blue? yes"]):
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
        labels = ids.copy()
        labels[: len(ids) // 2] = IGNORE_INDEX
        tile = facts.tile_size
        samples.append(
            TokenizedSample(
                input_ids=ids,
                labels=labels,
                pixel_values=np.zeros((0, 3, tile, tile), dtype=np.float32),
                num_tiles_per_image=(),
                dataset_index=0,
                source=SampleSource("text", "inline", index + 1),
            )
        )
    row = PackRow()
    for index, sample in enumerate(samples):
        row.append(PackItem(PieceRef.whole(sample, index, 0), sample))
    # One entry per dataset of the run's mixture (QA and captions), as on the other rank:
    # every rank's step reduces the loss and weight sums of every dataset of the run.
    return collate_rows([row], config.packing, facts, num_datasets=2)


def reference_batches(train_assets) -> tuple[list[PackedBatch], PackedBatch]:  # noqa: F811
    """2 * NUM_STEPS micro-batches from a 1-rank loader, and one text-only micro-batch."""
    config = run_config(train_assets, "ddp", 1)
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    _, plain, tokenizer, _ = prepare_model(config, env)
    facts = run_facts(plain, tokenizer)
    sources = build_sources(config.train.meta_path, config.data, facts, tokenizer)
    loader = iter(build_dataloader(sources, config.packing, facts, config.stream, 0, 1))
    batches = [next(loader) for _ in range(2 * NUM_STEPS)]
    return batches, text_only_batch(tokenizer, config, facts)


def single_rank(config: RunConfig, steps: list[list[PackedBatch]]) -> dict:
    """Losses and final weights of one process doing gradient accumulation over each step."""
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model, plain, tokenizer, _ = prepare_model(config, env)
    optimizer = build_optimizer(model, config.optim)
    results = [train_step(model, optimizer, batches, config, env) for batches in steps]
    return {
        "losses": [r.loss for r in results],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        **evaluation(model, config, run_facts(plain, tokenizer), tokenizer, env, results),
    }


def evaluation(model, config: RunConfig, facts, tokenizer, env: DistEnv, results) -> dict:
    """With eval.steps set: the held-out metrics of the trained model, and each step's loss
    and weight sums per dataset."""
    if config.eval.steps == 0:
        return {}
    sums = [(r.dataset_loss_sums, r.dataset_weight_sums, r.loss, r.weight_sum) for r in results]
    held_out = held_out_data(config, facts, tokenizer, env)
    return {"eval": evaluate_held_out(model, held_out, config), "dataset_sums": sums}


def with_evaluation(config: RunConfig, meta: Path) -> RunConfig:
    return replace(config, eval=EvalConfig(meta=str(meta), steps=NUM_STEPS))


def rank_worker(rank: int, port: int, jobs: list, result_dir: str) -> None:
    """One of two ranks: for each job, train NUM_STEPS steps on this rank's micro-batches."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=3))
    env = DistEnv(rank, rank, 2, torch.device("cpu"), "gloo")
    try:
        for name, config, steps in jobs:
            model, plain, tokenizer, _ = prepare_model(config, env)
            optimizer = build_optimizer(model, config.optim)
            results = [
                train_step(model, optimizer, [per_rank[rank]], config, env) for per_rank in steps
            ]
            facts = run_facts(plain, tokenizer)
            evaluated = evaluation(model, config, facts, tokenizer, env, results)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
            if rank == 0:
                losses = [r.loss for r in results]
                torch.save({"losses": losses, "state": state, **evaluated},
                           Path(result_dir) / f"{name}.pt")  # fmt: skip
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_two_ranks(jobs: list, result_dir: Path, timeout: float = SPAWN_TIMEOUT) -> None:
    context = mp.start_processes(
        rank_worker,
        args=(free_port(), jobs, str(result_dir)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-rank job did not finish within {timeout} s (a rank hangs)")


@pytest.fixture(scope="module")
def two_rank_results(train_assets, tmp_path_factory):  # noqa: F811
    """Run every 2-rank scenario in one spawn (each spawn costs a few seconds of imports)."""
    with torch_threads(1):
        batches, text_batch = reference_batches(train_assets)
    image_steps = [[batches[2 * s], batches[2 * s + 1]] for s in range(NUM_STEPS)]
    imageless_steps = [[batches[2 * s], text_batch] for s in range(NUM_STEPS)]
    assert all(b.stats.num_tiles > 0 for b in batches)
    assert text_batch.stats.num_tiles == 0 and text_batch.stats.num_dummy_tiles == 1

    jobs = []
    held_out = train_assets.data.meta_finetune_path
    for strategy in ("ddp", "fsdp"):
        config = run_config(train_assets, strategy, 1)
        # Evaluated after its steps: the weights compared below are those after evaluating.
        jobs.append((f"{strategy}_images", with_evaluation(config, held_out), image_steps))
        jobs.append((f"{strategy}_imageless", config, imageless_steps))
    # FSDP2 builds on rank 0 and shards from the meta device by default; this job builds the
    # full model on both ranks, the path it must reproduce bit for bit.
    full_build = replace(config, dist=replace(config.dist, meta_init=False))
    jobs.append(("fsdp_full_build_images", full_build, image_steps))
    # The varlen path under bf16 autocast: DDP keeps fp32 weights (q/k fp32 after RoPE, v
    # bf16), FSDP gathers bf16 ones and builds on rank 0 only. The FSDP job runs first: rank
    # 1 receives its model from rank 0 and has built none before in this process.
    for strategy in ("fsdp", "ddp"):
        varlen = run_config(train_assets, strategy, 1, "torch_varlen_reference", "bf16")
        jobs.insert(0 if strategy == "fsdp" else len(jobs), (f"{strategy}_varlen_bf16", varlen,
                                                             image_steps))  # fmt: skip
    result_dir = tmp_path_factory.mktemp("two_ranks")
    spawn_two_ranks(jobs, result_dir)

    reference_config = run_config(train_assets, "ddp", 2)
    with torch_threads(1):
        results = {
            "single_images": single_rank(with_evaluation(reference_config, held_out), image_steps),
            "single_imageless": single_rank(reference_config, imageless_steps),
            "single_sdpa_bf16": single_rank(
                run_config(train_assets, "ddp", 2, "sdpa", "bf16"), image_steps
            ),
        }
    for name, _, _ in jobs:
        results[name] = torch.load(result_dir / f"{name}.pt", weights_only=True)
    return results


def assert_matches(got: dict, expected: dict) -> None:
    assert len(got["losses"]) == NUM_STEPS
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=RTOL, atol=0)
    assert got["state"].keys() == expected["state"].keys()
    for key, value in expected["state"].items():
        torch.testing.assert_close(got["state"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    # The steps did move the weights (so matching them means something).
    assert got["losses"][0] != got["losses"][-1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_accumulation(two_rank_results, strategy):
    assert_matches(two_rank_results[f"{strategy}_images"], two_rank_results["single_images"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_imageless_rank_does_not_hang_and_matches(two_rank_results, strategy):
    # Rank 1's micro-batch is pure text with one dummy tile: it still runs the ViT (zero
    # contribution), so the collectives line up and the result equals the 1-rank reference.
    assert_matches(two_rank_results[f"{strategy}_imageless"], two_rank_results["single_imageless"])


def test_fsdp_meta_init_equals_building_the_full_model_on_every_rank(two_rank_results):
    got, expected = two_rank_results["fsdp_images"], two_rank_results["fsdp_full_build_images"]
    assert got["losses"] == expected["losses"]
    assert got["state"].keys() == expected["state"].keys()
    for key, value in expected["state"].items():
        assert torch.equal(got["state"][key], value), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_varlen_kernel_under_bf16_autocast_matches_one_rank_sdpa(two_rank_results, strategy):
    """Both ranks find the varlen kernel (also the FSDP rank that received its model from
    rank 0), its inputs reach it in one dtype, and the losses equal one rank's per-row sdpa
    in bf16 within bf16 rounding (8 mantissa bits: 0.4 % per rounding, over 3 steps)."""
    got = two_rank_results[f"{strategy}_varlen_bf16"]["losses"]
    expected = two_rank_results["single_sdpa_bf16"]["losses"]
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=0)
    assert got[0] != got[-1]


def test_global_loss_normalisation_weights_ranks_by_tokens(two_rank_results):
    # First step, same initial weights: the 2-rank loss is sum(loss_sum) / sum(weights) over
    # both ranks, i.e. the 1-rank accumulated value, not the mean of two per-rank means.
    single = two_rank_results["single_images"]["losses"][0]
    for strategy in ("ddp", "fsdp"):
        assert two_rank_results[f"{strategy}_images"]["losses"][0] == pytest.approx(
            single, rel=1e-7
        )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_evaluate_every_held_out_record_once_as_one_rank(two_rank_results, strategy):
    got = two_rank_results[f"{strategy}_images"]["eval"]
    expected = two_rank_results["single_images"]["eval"]
    # The two ranks' shares are disjoint and cover the held-out set: the same records, the
    # same samples and tokens as one rank reading all of it.
    for key in ("eval/records", "eval/skipped", "eval/samples", "eval/tokens"):
        assert got[key] == expected[key], key
    assert got["eval/records"] > 0 and got["kind"] == "eval"
    # The same weights within RTOL (the tests above): the same loss within float rounding.
    for key in ("eval/loss", "eval/loss/shapes_qa", "eval/loss/shapes_captions"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_per_dataset_sums_cover_both_ranks_and_combine_to_the_loss(two_rank_results, strategy):
    got = two_rank_results[f"{strategy}_images"]["dataset_sums"]
    expected = two_rank_results["single_images"]["dataset_sums"]
    for (loss_sums, weight_sums, loss, weight), (_, one_rank_weights, _, _) in zip(
        got, expected, strict=True
    ):
        # weights are host values: summed over the two ranks they are one rank's exactly
        assert weight_sums == pytest.approx(one_rank_weights, rel=1e-12)
        assert sum(weight_sums) == pytest.approx(weight, rel=1e-6)
        assert sum(loss_sums) / weight == pytest.approx(loss, rel=1e-6)


def torchrun(config: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "vlpretrain", "train", str(config), *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=cli_env(deterministic=True), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_ok(process: subprocess.Popen, timeout: float = SPAWN_TIMEOUT) -> None:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{' '.join(process.args)} did not finish within {timeout} s")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(process.args)} exited {process.returncode}:\n{stderr[-6000:]}")


def packer_balance_states(state: Any) -> list[dict[str, Any]]:
    """Every packer 'balance' entry inside a (nested) data-loader state."""
    found = []
    if isinstance(state, dict):
        if "balance" in state and "rows" in state:
            found.append(state["balance"])
        for value in state.values():
            found += packer_balance_states(value)
    elif isinstance(state, list | tuple):
        for value in state:
            found += packer_balance_states(value)
    return found


def test_two_rank_cli_checkpoint_and_resume(train_assets, tmp_path):  # noqa: F811
    """torchrun 2 ranks, FSDP2, FLOPs-balanced packing: 2 steps, then resume to 4, equals 4
    straight steps exactly (the packer's running FLOPs mean travels in the loader state)."""

    def stage(name: str, max_steps: int) -> Path:
        raw = stage_raw(
            train_assets,
            tmp_path / name,
            stage="stage2",
            max_steps=max_steps,
            # Constant LR: the schedule does not depend on max_steps, so a run can be extended.
            optim={"learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant"},
            dist={"strategy": "fsdp"},
        )
        raw["packing"]["balance_flops"] = True
        return write_stage(tmp_path / f"{name}.toml", raw)

    straight, resumed = stage("straight", 4), stage("resumed", 2)
    processes = [torchrun(straight), torchrun(resumed)]
    for process in processes:
        wait_ok(process)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata",  # DCP: which rank's file holds which shard
        "__0_0.distcp",
        "__1_0.distcp",
        "manifest.json",  # written last: size and hash of every other file
        "rank-00000.json",  # train state and data-loader state of each rank (no pickles)
        "rank-00000.rng.safetensors",
        "rank-00001.json",
        "rank-00001.rng.safetensors",
        "shared.json",
    ]
    assert '"world_size": 2' in (checkpoint / "shared.json").read_text()
    for rank in (0, 1):
        balances = packer_balance_states(
            json.loads((checkpoint / f"rank-{rank:05d}.json").read_text())
        )
        assert balances and all(b["total_tokens"] > 0 for b in balances)

    extend = (
        "--set",
        "train.max_steps=4",
        "--set",
        'train.allow_changed_on_resume=["train.max_steps"]',
    )
    wait_ok(torchrun(resumed, *extend))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert losses_by_step(tmp_path / "resumed") == losses_by_step(tmp_path / "straight")
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [2, 4]
    assert (tmp_path / "resumed" / "model.safetensors").is_file()
    # every skip of both ranks listed once, also across the resume
    skipped = SkipLog(tmp_path / "resumed" / SKIP_LOG_NAME).read()
    assert skipped == SkipLog(tmp_path / "straight" / SKIP_LOG_NAME).read()
    assert {e["rank"] for e in skipped} == {0, 1}

    # Elastic resume: the 2-rank FSDP2 checkpoint continues on 1 rank with 2 loader workers.
    # Every record the stream marks consumed was loaded once: the job's records_seen equals it.
    assert records_seen(checkpoint.parent / "step-00000004") == records_read(
        checkpoint.parent / "step-00000004"
    )
    extend_more = ["--set", "train.max_steps=6", "--set", "stream.num_workers=2"]
    main(["train", str(resumed), *extend_more, *extend[2:]])
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    last = tmp_path / "resumed" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in last.glob("rank-*.json")) == ["rank-00000.json"]
    balances = packer_balance_states(json.loads((last / "rank-00000.json").read_text()))
    assert len(balances) == 2 and all(b["total_tokens"] > 0 for b in balances)  # handed over
    assert (
        records_seen(last) == records_read(last) > records_seen(checkpoint.parent / "step-00000004")
    )


def test_text_only_batch_shape(train_assets):  # noqa: F811
    """The hand-made image-less micro-batch follows the collate conventions."""
    config = run_config(train_assets, "ddp", 1)
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    _, plain, tokenizer, _ = prepare_model(config, env)
    batch = text_only_batch(tokenizer, config, run_facts(plain, tokenizer))
    assert batch.pixel_values.shape == (1, 3, 28, 28)
    assert batch.image_flags.tolist() == [0]
    assert batch.num_tiles_per_image == ()
    # Every sample's first label is -100 and positions restart per sample.
    starts = batch.cu_seqlens[:-1].tolist()
    assert all(batch.labels[0, s] == IGNORE_INDEX for s in starts if s < batch.labels.shape[1])
    assert all(batch.position_ids[0, s] == 0 for s in starts if s < batch.labels.shape[1])
