"""Held-out evaluation: ranks in lockstep, the batch cap, eval mode, and nothing of the
training's state (module modes, RNG) changed by evaluating."""

from __future__ import annotations

import pytest
import torch
from stream_fakes import FACTS, FakeSource
from train_fixtures import stage_raw, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.config import build_run_config
from vlpretrain.data.loader import StreamConfig
from vlpretrain.data.packing import PackingConfig
from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.build import run_facts
from vlpretrain.train import evaluate as evaluation
from vlpretrain.train import loop


def ranks_with(other_rank_batches: int, monkeypatch) -> None:
    """Stand-in for the all-reduce: another rank holding `other_rank_batches` micro-batches."""
    calls = []

    def summed(flag: torch.Tensor) -> float:
        calls.append(1)
        return float(flag) + float(len(calls) <= other_rank_batches)

    monkeypatch.setattr(evaluation, "all_reduce_host_sum", summed)


def test_a_rank_whose_share_is_done_runs_the_filler_until_every_rank_is(monkeypatch):
    ranks_with(3, monkeypatch)  # this rank has 1 micro-batch, the other 3
    steps = list(evaluation.lockstep(iter(["a"]), "filler", max_batches=0))  # type: ignore[arg-type]
    assert steps == [("a", True), ("filler", False), ("filler", False)]


def test_max_batches_caps_each_rank(monkeypatch):
    ranks_with(0, monkeypatch)
    steps = list(evaluation.lockstep(iter("abc"), "filler", max_batches=2))  # type: ignore[arg-type]
    assert steps == [("a", True), ("b", True)]


def test_evaluation_needs_held_out_data():
    with pytest.raises(ValueError, match="eval.meta"):
        evaluation.EvalConfig(steps=10)
    assert [evaluation.EvalConfig(meta="m", steps=3).due(s, 7) for s in range(1, 8)] == [
        False, False, True, False, False, True, True,  # every 3 steps, and the last (7)
    ]  # fmt: skip


def test_a_held_out_set_smaller_than_the_streams_is_refused_by_name():
    # 2 ranks x 2 workers = 4 streams, the largest dataset has 3 records: one stream reads none
    env = DistEnv(0, 0, 2, torch.device("cpu"), "gloo")
    sources = [FakeSource(0, 3), FakeSource(1, 2)]
    with pytest.raises(ValueError, match=r"eval.meta held.json: .* 3 records, fewer than the 4"):
        evaluation.HeldOut(
            "held.json", sources, PackingConfig(), StreamConfig(num_workers=2), FACTS, env
        )


def test_evaluation_runs_in_eval_mode_and_restores_modes_and_rng(train_assets):  # noqa: F811
    raw = stage_raw(train_assets, "unused", stage="stage2", model={"drop_path_rate": 0.5},
                    eval={"meta": str(train_assets.data.meta_finetune_path), "steps": 1,
                          "max_batches": 1})  # fmt: skip
    config = build_run_config(raw)
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model, plain, tokenizer, _ = loop.prepare_model(config, env)
    held_out = loop.held_out_data(config, run_facts(plain, tokenizer), tokenizer, env)
    assert held_out is not None
    plain.projector.eval()  # a mode of our own that evaluating must give back as it was
    modes = {name: m.training for name, m in model.named_modules()}

    first = loop.evaluate_held_out(model, held_out, config)
    torch.manual_seed(1234)  # another RNG state: drop_path 0.5 would draw other masks
    rng = torch.get_rng_state()
    second = loop.evaluate_held_out(model, held_out, config)

    assert first == second and first["eval/batches"] == 1  # eval mode: nothing is dropped
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
