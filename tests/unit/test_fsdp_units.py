"""FSDP2 units: each ViT layer, the rest of the ViT, each LLM block, the root; forward prefetch.

Each unit, as its forward starts, also gathers the next unit to run, so that gather overlaps
the unit's own compute. One gloo rank suffices to check the units and the prefetch chain (the
2-rank tests check that the sharded steps equal one rank's).
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from vlpretrain.distributed.env import DistEnv
from vlpretrain.distributed.parallel import DistConfig, parallelize
from vlpretrain.train.freeze import apply_train_mode

ENV = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")


@pytest.fixture
def one_rank_group():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _prefetched(unit: FSDPModule) -> list:
    return list(unit._get_fsdp_state()._states_to_forward_prefetch)


def _units(model) -> list:
    decoder_layers = list(model.language_model.get_decoder().layers)
    return [model, model.vision_model, *model.vision_layers(), *decoder_layers]


def test_every_layer_is_a_unit_that_prefetches_the_next(tiny_model, one_rank_group):
    model = tiny_model.model
    parallelize(model, DistConfig(strategy="fsdp"), ENV)
    units = _units(model)
    # root, ViT rest, 2 ViT layers, 2 LLM blocks: 6 units in the order their forwards run.
    assert len(units) == 6 and all(isinstance(unit, FSDPModule) for unit in units)
    for unit, following in zip(units, units[1:], strict=False):
        assert _prefetched(unit) == [following._get_fsdp_state()]
    assert _prefetched(units[-1]) == []


def test_layers_after_the_selected_one_are_never_gathered(
    tiny_model, make_vlm_batch, one_rank_group
):
    """select_layer 1 runs only the first of the 2 ViT layers; it hands over to the LLM."""
    model = tiny_model.model
    model.config = dataclasses.replace(model.config, select_layer=1)
    parallelize(model, DistConfig(strategy="fsdp"), ENV)
    first, second = model.vision_layers()
    llm_first = model.language_model.get_decoder().layers[0]
    assert _prefetched(first) == [llm_first._get_fsdp_state()]
    assert second._get_fsdp_state() not in [s for u in _units(model) for s in _prefetched(u)]
    apply_train_mode(model)
    model(**make_vlm_batch(tiny_model)).loss_sum.backward()
    assert all(p.grad is None for p in second.parameters())
