"""Chunked weighted cross-entropy and the VLM forward's loss and scatter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.data.collate import len2weight
from vlpretrain.model.loss import weighted_cross_entropy_sum, weighted_cross_entropy_sums
from vlpretrain.model.vlm import ImageTokenMismatchError

NUM_POSITIONS, HIDDEN, VOCAB = 7, 5, 11


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_POSITIONS, HIDDEN, generator=generator, requires_grad=True)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))
    targets = torch.randint(0, VOCAB, (NUM_POSITIONS,), generator=generator)
    return hidden, head, targets


def _grads(loss, hidden, head):
    return torch.autograd.grad(loss, (hidden, head.weight))


def test_len2weight_values():
    assert len2weight(4, "token") == 1.0
    assert len2weight(4, "sample") == 0.25  # 1 / 4
    assert len2weight(4, "square") == 0.5  # 1 / sqrt(4)
    assert len2weight(3, "square") == pytest.approx(1 / math.sqrt(3))
    assert len2weight(0, "square") == 0.0
    with pytest.raises(ValueError, match="loss_reduction"):
        len2weight(1, "mean")


def test_chunked_token_loss_equals_cross_entropy_sum_and_mean(problem):
    hidden, head, targets = problem
    ones = torch.ones(NUM_POSITIONS)

    # chunk_size 3 over 7 positions: chunks of 3, 3 and 1.
    chunked = weighted_cross_entropy_sum(hidden, head, targets, ones, chunk_size=3)
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")

    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(
        chunked / ones.sum(), F.cross_entropy(head(hidden), targets, reduction="mean")
    )
    for got, want in zip(_grads(chunked, hidden, head), _grads(plain, hidden, head), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_chunked_loss_applies_per_sample_weights(problem, reduction):
    hidden, head, targets = problem
    # Two samples: positions 0-2 (n = 3) and 3-6 (n = 4).
    # sample: weights 1/3 and 1/4; square: 1/sqrt(3) and 1/sqrt(4) = 1/2.
    w1, w2 = len2weight(3, reduction), len2weight(4, reduction)
    assert (w1, w2) == ((1 / 3, 1 / 4) if reduction == "sample" else (1 / math.sqrt(3), 0.5))
    weights = torch.tensor([w1] * 3 + [w2] * 4)

    chunked = weighted_cross_entropy_sum(hidden, head, targets, weights, chunk_size=3)
    ce = F.cross_entropy(head(hidden), targets, reduction="none")
    by_hand = w1 * ce[:3].sum() + w2 * ce[3:].sum()

    torch.testing.assert_close(chunked, by_hand)
    for got, want in zip(_grads(chunked, hidden, head), _grads(by_hand, hidden, head), strict=True):
        torch.testing.assert_close(got, want)


def test_per_group_sums_come_from_the_same_losses_and_leave_the_total_and_grads_alone(problem):
    hidden, head, targets = problem
    # Positions 0-2 in group 2, 3-6 in group 0 (group 1 empty); chunks of 3 split group 0.
    weights = torch.tensor([1 / 3] * 3 + [1 / 4] * 4)
    groups = torch.tensor([2, 2, 2, 0, 0, 0, 0])
    plain = weighted_cross_entropy_sum(hidden, head, targets, weights, chunk_size=3)
    total, per_group = weighted_cross_entropy_sums(
        hidden, head, targets, weights, groups, 3, chunk_size=3
    )
    assert torch.equal(total, plain)  # bit for bit: the group sums are a side output
    ce = F.cross_entropy(head(hidden), targets, reduction="none").detach()
    by_hand = torch.stack([(ce[3:] / 4).sum(), torch.tensor(0.0), (ce[:3] / 3).sum()])
    torch.testing.assert_close(per_group, by_hand)
    torch.testing.assert_close(per_group.sum(), total.detach())
    assert not per_group.requires_grad
    for got, want in zip(_grads(total, hidden, head), _grads(plain, hidden, head), strict=True):
        assert torch.equal(got, want)


def test_chunked_loss_without_grad_and_when_empty(problem):
    hidden, head, targets = problem
    ones = torch.ones(NUM_POSITIONS)
    with torch.no_grad():
        no_grad = weighted_cross_entropy_sum(hidden, head, targets, ones, chunk_size=3)
        plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    torch.testing.assert_close(no_grad, plain)

    empty = weighted_cross_entropy_sum(hidden[:0], head, targets[:0], ones[:0], chunk_size=3)
    assert empty.dtype == torch.float32
    assert empty.item() == 0.0


def _forward(model, batch):
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        pixel_values=batch["pixel_values"],
        image_flags=batch["image_flags"],
        labels=batch["labels"],
        loss_weight=batch["loss_weight"],
    )


def test_forward_loss_equals_cross_entropy_of_shifted_logits(tiny_model, make_vlm_batch):
    model = tiny_model.model.eval()
    batch = make_vlm_batch(tiny_model)
    labels = batch["labels"]
    num_supervised = int((labels != -100).sum())

    out = _forward(model, batch)
    logits = model.logits(
        batch["input_ids"], batch["position_ids"], batch["pixel_values"], batch["image_flags"]
    )
    # Position t predicts label t + 1.
    expected = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="mean")

    assert out.num_supervised == num_supervised
    assert out.weight_sum.item() == num_supervised
    torch.testing.assert_close(out.loss_sum / out.weight_sum, expected)


def test_forward_loss_with_square_weights(tiny_model, make_vlm_batch):
    model = tiny_model.model.eval()
    batch = make_vlm_batch(tiny_model)
    labels = batch["labels"][0]
    supervised = (labels != -100).nonzero().flatten().tolist()
    # The two samples' answers are the two runs of consecutive supervised positions.
    split = next(i for i in range(1, len(supervised)) if supervised[i] != supervised[i - 1] + 1)
    first, second = supervised[:split], supervised[split:]
    w1, w2 = len2weight(len(first), "square"), len2weight(len(second), "square")
    weights = torch.zeros_like(labels, dtype=torch.float32)
    weights[first], weights[second] = w1, w2
    batch["loss_weight"] = weights.unsqueeze(0)

    out = _forward(model, batch)
    logits = model.logits(
        batch["input_ids"], batch["position_ids"], batch["pixel_values"], batch["image_flags"]
    )
    ce = F.cross_entropy(logits[0, :-1], labels[1:].clamp(min=0), reduction="none")
    # ce[t] predicts label t + 1.
    expected = w1 * ce[[t - 1 for t in first]].sum() + w2 * ce[[t - 1 for t in second]].sum()

    torch.testing.assert_close(out.loss_sum, expected)
    torch.testing.assert_close(out.weight_sum, torch.tensor(len(first) * w1 + len(second) * w2))


def test_image_features_land_in_the_context_slots(tiny_model, make_vlm_batch):
    model = tiny_model.model.eval()
    batch = make_vlm_batch(tiny_model)
    slots = batch["input_ids"][0] == model.image_context_token_id

    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_flags"])
        features = model.image_features(batch["pixel_values"][:1])  # the real tile only
        text = model.language_model.get_input_embeddings()(batch["input_ids"])

    assert torch.equal(embeds[0, slots], features[0])
    assert torch.equal(embeds[0, ~slots], text[0, ~slots])


def test_context_token_count_mismatch_raises(tiny_model, make_vlm_batch):
    model = tiny_model.model.eval()
    # One real tile gives 4 rows; the dummy tile (flag 0) contributes none.
    for num_context in (3, 8):
        batch = make_vlm_batch(tiny_model, num_context=num_context)
        with pytest.raises(
            ImageTokenMismatchError,
            match=f"{num_context} <IMG_CONTEXT> tokens "
            "but 4 image feature rows \\(1 real tiles x 4 tokens\\)",
        ):
            _forward(model, batch)


def test_batch_without_supervised_token_still_reaches_the_head(tiny_model, make_vlm_batch):
    # DDP/FSDP2 need every trainable parameter in the graph every step, lm_head included.
    batch = make_vlm_batch(tiny_model)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["loss_weight"] = torch.zeros_like(batch["loss_weight"])
    out = tiny_model.model(**batch)
    out.loss_sum.backward()
    assert out.num_supervised == 0 and float(out.loss_sum) == 0.0
    missing = [n for n, p in tiny_model.model.named_parameters() if p.grad is None]
    assert missing == []


def test_two_rows_equal_each_row_alone(tiny_model, make_vlm_batch):
    # Rows run as one flattened sequence (flash-attention varlen needs batch size 1); the
    # restarting position_ids keep them independent: the loss of 2 rows is the sum.
    model = tiny_model.model.eval()
    one = make_vlm_batch(tiny_model)
    two = {k: torch.cat([v, v]) for k, v in one.items()}  # rows and their tiles, twice
    with torch.no_grad():
        single = model(**one).loss_sum
        double = model(**two).loss_sum
    torch.testing.assert_close(double, 2 * single, rtol=1e-5, atol=1e-6)
