"""A training step reads the device once: every size and count the forward needs comes from
the host's layout of the micro-batch (collate_rows), not from the device.

On CUDA each read of a device value (`.item()`, `int(t)`, a data-dependent size such as
`nonzero` or boolean-mask indexing) stalls the host until the GPU has caught up, so the
host cannot queue the next kernels ahead. The CPU cannot show a stall, but it dispatches the
same ops: the test counts them with a dispatch mode.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_fixtures import stage_raw, train_assets  # noqa: F401  (pytest fixture)

from vlpretrain.config import build_run_config
from vlpretrain.data.build import build_sources
from vlpretrain.data.loader import build_dataloader
from vlpretrain.distributed.env import DistEnv
from vlpretrain.model import attention
from vlpretrain.model.build import run_facts
from vlpretrain.train import loop
from vlpretrain.train.optim import build_optimizer

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.nonzero.default,
                aten.masked_select.default, aten.is_nonzero.default}  # fmt: skip


class DeviceReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device's values on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in SCALAR_READS or boolean_index:
            self.reads.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def step_parts(train_assets):  # noqa: F811
    """A stage-2 model on the varlen path (the CUDA one) and two collated micro-batches."""
    raw = stage_raw(train_assets, "unused", stage="stage2",
                    model={"attn_implementation": attention.TORCH_VARLEN_REFERENCE})  # fmt: skip
    raw["train"].update(precision="bf16", gradient_accumulation_steps=2)
    config = build_run_config(raw)
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model, plain, tokenizer, _ = loop.prepare_model(config, env)
    facts = run_facts(plain, tokenizer)
    sources = build_sources(config.train.meta_path, config.data, facts, tokenizer)
    batches = iter(build_dataloader(sources, config.packing, facts, config.stream, 0, 1))
    return config, env, model, [next(batches), next(batches)]


def counted_step(step_parts, monkeypatch, batches) -> tuple[list[str], list[tuple]]:
    """Syncing ops dispatched by one train_step outside the optimizer update and the
    kernel stand-in, and the arguments of each explicit read of the step's values."""
    config, env, model, _ = step_parts
    optimizer = build_optimizer(model, config.optim)
    mode = DeviceReads()
    explicit = []
    paused = []

    def outside(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            paused.append(function)
            mode.__exit__(None, None, None)
            try:
                return function(*args, **kwargs)
            finally:
                mode.__enter__()

        return call

    # The optimizer keeps its step counter on the host on CUDA; the CPU stand-in of the
    # varlen kernel splits samples with .tolist(), the CUDA kernel takes them on the device.
    monkeypatch.setattr(optimizer, "step", outside(optimizer.step))
    monkeypatch.setattr(
        attention, "reference_varlen_attn", outside(attention.reference_varlen_attn)
    )
    # A host scalar summed over gloo, read on the host: no device involved on CUDA either.
    monkeypatch.setattr(loop, "all_reduce_host_sum", outside(loop.all_reduce_host_sum))
    read = loop.read_step_values
    monkeypatch.setattr(loop, "read_step_values", lambda *a: explicit.append(a) or read(*a))
    with mode:
        loop.train_step(model, optimizer, batches, config, env)
    assert paused  # the stand-ins did run inside the step
    return mode.reads, explicit


def test_a_step_reads_the_device_once(step_parts, monkeypatch):
    reads, explicit = counted_step(step_parts, monkeypatch, step_parts[3])
    assert reads == [] and len(explicit) == 1
    # The loss sum of each dataset of the mixture travels in that same read.
    _, _, dataset_sums = explicit[0]
    assert dataset_sums is not None and dataset_sums.shape == (2,)


def test_without_the_host_layout_the_forward_reads_the_device(step_parts, monkeypatch):
    """The same step on batches without a layout (how the model is called outside
    training): each micro-batch then asks the device for sizes and counts."""
    bare = [batch.__class__(**{**batch.__dict__, "layout": None}) for batch in step_parts[3]]
    reads, _ = counted_step(step_parts, monkeypatch, bare)
    assert len(reads) >= 2 * 6  # boundaries, tiles, slots, supervised positions, per batch
