"""Aux losses: hand-computed values, HuggingFace's function, masks and pooling."""

from __future__ import annotations

import math

import pytest
import torch

from clusterformers.moe import load_balancing_loss, router_z_loss

LN3 = math.log(3.0)
LOGITS = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, LN3]], dtype=torch.float64)


def test_hand_computed_values():
    # f = (2/3, 1/3), P = (7/12, 5/12): 2 * (14/36 + 5/36) = 19/18
    torch.testing.assert_close(load_balancing_loss(LOGITS, 2, 1), torch.tensor(19 / 18, dtype=torch.float64))
    torch.testing.assert_close(router_z_loss(LOGITS), torch.tensor(math.log(4.0) ** 2, dtype=torch.float64))


def test_perfect_balance_gives_k():
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1.0
    logits[torch.arange(8), (torch.arange(8) + 1) % 4] = 0.5
    torch.testing.assert_close(load_balancing_loss(logits, 4, 2), torch.tensor(2.0))


def test_mask_and_layer_pooling():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    mask = torch.arange(10) % 3 != 0
    torch.testing.assert_close(load_balancing_loss(a, 4, 2, mask), load_balancing_loss(a[mask], 4, 2))
    torch.testing.assert_close(router_z_loss(a, mask.view(2, 5)), router_z_loss(a[mask]))
    torch.testing.assert_close(load_balancing_loss((a, b), 4, 2), load_balancing_loss(torch.cat([a, b]), 4, 2))
    torch.testing.assert_close(
        load_balancing_loss((a, b), 4, 2, mask), load_balancing_loss(torch.cat([a[mask], b[mask]]), 4, 2)
    )
    # brute force: E * sum_e f_e P_e with f_e counting top-k assignments per kept token
    probs = torch.softmax(a[mask], 1)
    top = probs.topk(2, 1).indices
    f = torch.tensor([(top == e).sum().item() / mask.sum().item() for e in range(4)])
    torch.testing.assert_close(load_balancing_loss(a, 4, 2, mask), 4 * (f * probs.mean(0)).sum())


def test_equals_huggingface():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    g = torch.Generator().manual_seed(1)
    layers = (torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g))
    ours = load_balancing_loss(layers, 6, 2)
    theirs = mixtral.load_balancing_loss_func(layers, 6, 2)
    torch.testing.assert_close(ours, theirs)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    torch.testing.assert_close(
        load_balancing_loss(layers, 6, 2, mask.bool()), mixtral.load_balancing_loss_func(layers, 6, 2, mask)
    )
    torch.testing.assert_close(
        load_balancing_loss(LOGITS.float(), 2, 1), mixtral.load_balancing_loss_func((LOGITS.float(),), 2, 1)
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="logits"):
        load_balancing_loss(torch.randn(4, 3), 4, 1)
    with pytest.raises(ValueError, match="logits"):
        router_z_loss(())
    with pytest.raises(ValueError, match="mask"):
        router_z_loss(torch.randn(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        router_z_loss((torch.randn(4, 3), torch.randn(5, 3)))
