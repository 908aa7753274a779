"""Non-finite steps are not applied, counted and logged; too many in a row stop the run; export
refuses non-finite weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from vlpretrain.train.checkpoint.states import TrainState
from vlpretrain.train.nonfinite import (
    NonFiniteError,
    global_loss_and_finiteness,
    guard_nonfinite,
    refuse_nonfinite_weights,
)


def result(applied: bool) -> dict:
    return {"applied": applied, "loss": 1.5 if applied else math.nan, "grad_norm": 0.5}


@pytest.mark.parametrize(
    "loss_sum, grad_norm, finite",
    [(3.0, 1.0, True), (math.nan, 1.0, False), (math.inf, 1.0, False), (3.0, math.inf, False),
     (3.0, math.nan, False)],
)  # fmt: skip
def test_a_step_is_finite_only_if_loss_and_gradient_norm_are(loss_sum, grad_norm, finite):
    loss, ok, _ = global_loss_and_finiteness(
        torch.tensor(loss_sum, dtype=torch.float64), grad_norm, 4.0
    )
    assert ok is finite
    if finite:
        assert loss == 3.0 / 4.0


def test_a_step_without_supervised_tokens_is_not_a_nonfinite_step():
    loss, ok, _ = global_loss_and_finiteness(torch.zeros((), dtype=torch.float64), 0.0, 0.0)
    assert ok and math.isnan(loss)  # nothing to average, but nothing non-finite either


def test_nonfinite_steps_are_counted_logged_and_reset(caplog):
    state = TrainState(step=7)
    with caplog.at_level(logging.WARNING):
        guard_nonfinite(
            state, **result(False), describe_data=lambda: "a.jsonl:3 (dataset 'a')", max_steps=3
        )
    assert (state.nonfinite_steps, state.consecutive_nonfinite_steps) == (1, 1)
    assert "step 7 not applied" in caplog.text and "a.jsonl:3 (dataset 'a')" in caplog.text
    guard_nonfinite(state, **result(True), describe_data=lambda: "", max_steps=3)
    assert (state.nonfinite_steps, state.consecutive_nonfinite_steps) == (1, 0)


def test_consecutive_nonfinite_steps_stop_the_run():
    state = TrainState(step=10)
    guard_nonfinite(state, **result(False), describe_data=lambda: "", max_steps=2)
    state.step += 1
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(up to step 11\).*step 9"):
        guard_nonfinite(state, **result(False), describe_data=lambda: "", max_steps=2)


def test_export_refuses_nonfinite_weights(tmp_path):
    good = {"a": torch.ones(2), "ids": torch.arange(3)}
    refuse_nonfinite_weights(good, tmp_path)
    bad = {**good, "b": torch.tensor([1.0, math.nan]), "c": torch.tensor([math.inf])}
    with pytest.raises(NonFiniteError, match="2 of 4 tensors hold NaN or inf.*b, c.*not marked"):
        refuse_nonfinite_weights(bad, tmp_path)
