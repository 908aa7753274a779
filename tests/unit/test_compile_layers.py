"""train.compile: each ViT layer and each LLM decoder layer compiled in place.

The compiled loss and gradients equal eager ones, and packed rows of new lengths, sample
boundaries and tile counts reuse the one graph of each layer type (no recompiles).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from train_fixtures import stage_raw, train_assets  # noqa: F401

from vlpretrain.config import build_run_config
from vlpretrain.distributed.env import DistEnv
from vlpretrain.distributed.parallel import compile_layers, enable_activation_checkpointing
from vlpretrain.train.freeze import apply_train_mode
from vlpretrain.train.loop import prepare_model

ENV = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")


def _repacked(batch: dict[str, torch.Tensor], extra_tokens: int, extra_tiles: int) -> dict:
    """`batch` plus a text sample of `extra_tokens` tokens and `extra_tiles` dummy tiles."""
    ids = batch["input_ids"]
    # The last tokens are the text-only second sample's: no image placeholders among them.
    new_ids = ids[:, -4:].repeat(1, 4)[:, :extra_tokens]
    positions = torch.arange(extra_tokens).unsqueeze(0)
    labels = torch.cat([torch.tensor([[-100]]), new_ids[:, 1:]], dim=1)
    tiles = batch["pixel_values"]
    return {
        "input_ids": torch.cat([ids, new_ids], dim=1),
        "position_ids": torch.cat([batch["position_ids"], positions], dim=1),
        "pixel_values": torch.cat([tiles, tiles[-1:].expand(extra_tiles, -1, -1, -1)]),
        "image_flags": torch.cat(
            [batch["image_flags"], torch.zeros(extra_tiles, dtype=torch.long)]
        ),
        "labels": torch.cat([batch["labels"], labels], dim=1),
        "loss_weight": torch.cat([batch["loss_weight"], (labels != -100).float()], dim=1),
    }


@pytest.mark.slow  # about 6 s: dynamo traces each layer type, forward and backward
def test_compiled_layers_match_eager_without_recompiling(tiny_model, make_vlm_batch):
    """aot_eager (no code generation) traces exactly what inductor would get, in a fraction
    of inductor's CPU compile time; the selective checkpoint is traced inside the ViT layer."""
    model = tiny_model.model
    apply_train_mode(model)
    base = make_vlm_batch(tiny_model)
    # Rows of 20 + 3..7 tokens (a new last sample each time) and 2..6 tiles.
    batches = [_repacked(base, 3 + step, step) for step in range(5)]
    eager = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss_sum
        loss.backward()
        eager.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    enable_activation_checkpointing(model, vision="selective", llm="full")
    counter = CompileCounterWithBackend("aot_eager")
    compile_layers(model, backend=counter)
    for batch, (expected_loss, expected_grads) in zip(batches, eager, strict=True):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss_sum
        loss.backward()
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=0, atol=1e-5)
    # One graph for the ViT layer type and one for the decoder layer type, over 5 packings.
    assert counter.frame_count == 2


def test_the_run_config_chooses_checkpointing_and_compilation(train_assets, tmp_path):  # noqa: F811
    train = {
        "vision_checkpointing": "selective",
        "grad_checkpoint": True,
        "llm_checkpointing": "full",
        "compile": True,
    }
    config = build_run_config(stage_raw(train_assets, tmp_path, stage="stage2", train=train))
    _, model, _, _ = prepare_model(config, ENV)
    vision_layer = model.vision_layers()[0]
    llm_layer = model.language_model.get_decoder().layers[0]
    assert type(vision_layer).__name__ == "SelectivelyRecomputedVisionLayer"
    assert type(llm_layer).__name__.startswith("FullyRecomputed")
    # Module.compile wraps the call lazily: nothing compiles before the first forward.
    assert vision_layer._compiled_call_impl is not None
    assert llm_layer._compiled_call_impl is not None
