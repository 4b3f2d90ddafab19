"""Attacks (FGSM, PGD, SPSA), robust accuracy, corruptions, and attacking through the elliptical metric."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from clusterformers.attention import set_metric_grad
from clusterformers.models.vit import ViT, ViTConfig
from clusterformers.robust.attacks import fgsm, margin_loss, pgd, robust_accuracy, spsa
from clusterformers.robust.corruptions import gaussian_noise, salt_and_pepper

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP trained on sklearn's 8×8 digits (pixels scaled to [0, 1]), with 400 held-out images."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]  # [1797, 1, 8, 8]
    y = torch.tensor(data.target, dtype=torch.long)
    torch.manual_seed(0)
    perm = torch.randperm(len(y))
    train, test = perm[:-400], perm[-400:]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    return model.eval(), x[test], y[test]


def linear_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 3)


# ----------------------------------------------------------------------------- FGSM / PGD


def test_fgsm_matches_hand_computed_step() -> None:
    model = linear_model()
    x = torch.rand(5, 8)
    y = torch.tensor([0, 1, 2, 1, 0])
    eps = 0.1
    w, b = model.weight.detach(), model.bias.detach()
    p = (x @ w.T + b).softmax(-1)
    grad = (p - F.one_hot(y, 3).float()) @ w  # ∂CE/∂x for a linear softmax classifier
    expected = (x + eps * grad.sign()).clamp(0, 1)
    model.train()
    x_adv = fgsm(model, x, y, eps)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)
    assert model.training and model.weight.grad is None and not x_adv.requires_grad


def test_pgd_one_step_without_random_start_is_fgsm() -> None:
    model = linear_model()
    x, y = torch.rand(5, 8), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(
        pgd(model, x, y, 0.05, steps=1, step_size=0.05, random_start=False), fgsm(model, x, y, 0.05), rtol=0, atol=0
    )


def test_pgd_stays_in_ball_and_lowers_accuracy(digits_mlp) -> None:
    model, x, y = digits_mlp
    eps = 0.1
    x_adv = pgd(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    clean = robust_accuracy(model, (x, y), None)
    attacked = robust_accuracy(model, (x, y), pgd, batch_size=128, eps=eps, generator=torch.Generator().manual_seed(0))
    assert clean > 0.85
    assert attacked < clean - 0.3
    assert robust_accuracy(model, (x, y), "fgsm", eps=eps) < clean - 0.2
    again = pgd(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, x_adv, rtol=0, atol=0)


def test_attack_input_errors() -> None:
    model = linear_model()
    x, y = torch.rand(2, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        fgsm(model, x * 3, y, 0.1)
    with pytest.raises(ValueError, match="torch.long"):
        pgd(model, x, y.int(), 0.1)
    with pytest.raises(ValueError, match="eps"):
        spsa(model, x, y, -1.0)
    with pytest.raises(ValueError, match="attack must be one of"):
        robust_accuracy(model, (x, y), "cw")


# ----------------------------------------------------------------------------- SPSA


def test_spsa_increases_loss_within_ball() -> None:
    model = linear_model()
    x, y = torch.rand(6, 8) * 0.8 + 0.1, torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.05
    x_adv = spsa(model, x, y, eps, iters=10, samples=32, generator=torch.Generator().manual_seed(0), max_forward=64)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (margin_loss(model(x_adv), y) >= margin_loss(model(x), y)).all()
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.01
    again = spsa(model, x, y, eps, iters=10, samples=32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, x_adv, rtol=0, atol=1e-6)  # chunking does not change the estimate


def test_margin_loss_against_loop() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(margin_loss(logits, y), torch.tensor([1.0 - 2.0, 3.0 - (-1.0)]))


def test_robust_accuracy_accepts_tensors_and_batches(digits_mlp) -> None:
    model, x, y = digits_mlp
    manual = float((model(x).argmax(1) == y).float().mean())
    loader = [(x[i : i + 64], y[i : i + 64], "extra") for i in range(0, len(y), 64)]
    assert robust_accuracy(model, (x, y), None, batch_size=37) == pytest.approx(manual)
    assert robust_accuracy(model, loader, None) == pytest.approx(manual)


# ----------------------------------------------------------------------------- corruptions


def test_gaussian_noise_clipping_and_seeding() -> None:
    x = torch.rand(4, 1, 6, 6)
    noisy = gaussian_noise(x, 0.5, torch.Generator().manual_seed(1))
    assert noisy.min() == 0 and noisy.max() == 1  # clipped at both ends
    raw = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy, raw.clamp(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(gaussian_noise(x, 0.5, torch.Generator().manual_seed(1)), noisy, rtol=0, atol=0)
    assert not torch.equal(gaussian_noise(x, 0.5, torch.Generator().manual_seed(2)), noisy)
    torch.testing.assert_close(gaussian_noise(x, 0.0), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(x, -0.1)
    with pytest.raises(TypeError, match="floating-point"):
        gaussian_noise(torch.zeros(2, 2, dtype=torch.uint8), 0.1)


def test_salt_and_pepper() -> None:
    x = torch.full((20, 1, 10, 10), 0.5)
    out = salt_and_pepper(x, 0.2, torch.Generator().manual_seed(0))
    hit = out != 0.5
    assert set(out[hit].unique().tolist()) == {0.0, 1.0}
    assert 0.17 < hit.float().mean() < 0.23
    assert 0.4 < (out[hit] == 1).float().mean() < 0.6
    with pytest.raises(ValueError, match="amount"):
        salt_and_pepper(x, 1.5)


# ----------------------------------------------------------------------------- metric gradient


def test_metric_grad_changes_input_gradient_not_output() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=3, num_heads=2, attention="elliptical")).eval()
    for p in model.parameters():  # away from GPT-2 init, so the metric matters
        nn.init.normal_(p, std=0.5)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    def output_and_grad(flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        set_metric_grad(model, flag)
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        (grad,) = torch.autograd.grad(F.cross_entropy(out, y), xg)
        return out.detach(), grad

    out_off, grad_off = output_and_grad(False)
    out_on, grad_on = output_and_grad(True)
    assert torch.equal(out_off, out_on)
    assert (grad_on - grad_off).abs().max() > 1e-3 * grad_off.abs().max()
    x_adv = pgd(model, x, y, 8 / 255, steps=3, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    set_metric_grad(model, False)
    assert not torch.equal(pgd(model, x, y, 8 / 255, steps=3, generator=torch.Generator().manual_seed(0)), x_adv)
