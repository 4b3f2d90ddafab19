"""Linear evaluation of a frozen encoder (as CCLK-release's ``evaluate/lbfgs.py``).

- Digits: ``Linear(D, classes)`` trained with L-BFGS (500 steps) on cross-entropy + ``1e-6 ‖W‖²``; test top-1.
- Colour: linear regression to the raw colour ``c`` (0–255) minimising MSE + ``1e-6 ‖W‖²``, in closed
  form (ridge ``α = 3N·1e-6`` on centred fp64 features, unpenalised intercept). Reported: test MSE in
  0–255 units (higher = more colour removed) and ``R² = 1 − MSE / Var_test(c)``.

Evaluate the **final** encoder, never the best epoch on the test set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _check_x(x: Tensor, name: str) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} features must be a float [N, D] tensor, got {x.dtype} {list(x.shape)}")


def _check_xy(x: Tensor, y: Tensor, name: str) -> None:
    _check_x(x, name)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} targets must have N = {x.shape[0]} rows, got shape {list(y.shape)}")


def fit_digit_probe(
    x: Tensor, y: Tensor, *, num_classes: int | None = None, steps: int = 500, reg: float = 1e-6, seed: int = 0
) -> nn.Linear:
    """L-BFGS linear classifier on frozen features.

    Args:
        x: ``[N, D]`` features; y: long ``[N]`` labels.
        num_classes: default ``max(y) + 1``.
        steps: ``LBFGS.step`` calls (each up to 20 iterations, as in CCLK).
        reg: weight on ``‖W‖²`` (bias unpenalised).
        seed: initialisation seed (the global RNG is left untouched).
    """
    _check_xy(x, y, "train")
    x = x.detach().float()
    y = y.to(x.device).long()
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(x.shape[1], classes)
    clf = clf.to(x.device)
    opt = torch.optim.LBFGS(clf.parameters())
    criterion = nn.CrossEntropyLoss()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = criterion(clf(x), y) + reg * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return clf


def digit_predictions(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, *, num_classes: int, steps: int = 500, reg: float = 1e-6,
    seed: int = 0,
) -> Tensor:
    """Predicted test labels ``[N_test]`` (CPU, long) of :func:`fit_digit_probe`."""
    _check_x(x_test, "test")
    clf = fit_digit_probe(x_train, y_train, num_classes=num_classes, steps=steps, reg=reg, seed=seed)
    with torch.no_grad():
        return clf(x_test.detach().float().to(clf.weight.device)).argmax(1).cpu()


def digit_accuracy(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *, steps: int = 500, reg: float = 1e-6,
    seed: int = 0,
) -> float:
    """Test top-1 accuracy (fraction in ``[0, 1]``) of :func:`fit_digit_probe`."""
    _check_xy(x_test, y_test, "test")
    classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    pred = digit_predictions(x_train, y_train, x_test, num_classes=classes, steps=steps, reg=reg, seed=seed)
    return float((pred == y_test.cpu().long()).double().mean())


def color_regression(
    x_train: Tensor, c_train: Tensor, x_test: Tensor, c_test: Tensor, *, reg: float = 1e-6,
    return_items: bool = False,
) -> dict:
    """Closed-form ridge from features to the raw colour.

    Args:
        x_train, x_test: ``[N, D]`` features.
        c_train, c_test: ``[N, 3]`` raw colours in 0–255.
        reg: the ``1e-6`` of ``MSE + reg ‖W‖²`` (MSE averaged over ``3N`` entries, so ``α = 3N·reg``).

        return_items: also return ``"sq_error"``, the ``[N_test]`` float64 squared error of each test item
            (mean over the three channels; its mean is the MSE).

    Returns:
        ``{"mse": test MSE in 0–255 units, "r2": 1 − MSE / Var_test(c)}``; ``Var_test`` is the mean of the
        per-channel (population) variances.
    """
    _check_xy(x_train, c_train, "train")
    _check_xy(x_test, c_test, "test")
    xtr, ctr = x_train.detach().double().cpu(), c_train.detach().double().cpu()
    xte, cte = x_test.detach().double().cpu(), c_test.detach().double().cpu()
    x_mean, c_mean = xtr.mean(0), ctr.mean(0)
    xc = xtr - x_mean
    alpha = ctr.numel() * reg
    gram = xc.T @ xc + alpha * torch.eye(xc.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (ctr - c_mean))
    pred = (xte - x_mean) @ w + c_mean
    sq_error = ((pred - cte) ** 2).mean(1)
    mse = float(sq_error.mean())
    var = float(((cte - cte.mean(0)) ** 2).mean())
    out: dict = {"mse": mse, "r2": 1.0 - mse / var if var > 0 else float("nan")}
    if return_items:
        out["sq_error"] = sq_error
    return out


@torch.no_grad()
def encode(
    encoder: nn.Module,
    images: Tensor,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features of a frozen encoder in eval mode: ``[N, ...]`` images → ``[N, D]`` (on the CPU).

    Args:
        transform: applied per batch on the device (e.g. ``colormnist.eval_transform``).
        device: default the encoder's device.
    """
    if device is None:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    feats = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        if transform is not None:
            batch = transform(batch)
        feats.append(encoder(batch).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats)


def linear_eval(
    encoder: nn.Module,
    train: tuple[Tensor, Tensor, Tensor],
    test: tuple[Tensor, Tensor, Tensor],
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    steps: int = 500,
    reg: float = 1e-6,
    seed: int = 0,
    return_items: bool = False,
) -> dict:
    """Both probes on a frozen encoder.

    Args:
        train, test: ``(images [N, C, H, W], labels [N], raw colours [N, 3])``.
        transform: evaluation transform (resize to the encoder's input size).

        return_items: also return ``"items"``: ``{"correct": [N_test] 0/1, "sq_error": [N_test]}`` as lists,
            the per-item values whose means are the accuracy and the MSE (for intervals over eval items).

    Returns:
        ``{"accuracy", "mse", "r2"}`` (and ``"items"``).
    """
    x_tr = encode(encoder, train[0], transform=transform)
    x_te = encode(encoder, test[0], transform=transform)
    classes = int(max(int(train[1].max()), int(test[1].max()))) + 1
    pred = digit_predictions(x_tr, train[1], x_te, num_classes=classes, steps=steps, reg=reg, seed=seed)
    correct = pred == test[1].cpu().long()
    color = color_regression(x_tr, train[2], x_te, test[2], reg=reg, return_items=True)
    out: dict = {"accuracy": float(correct.double().mean()), "mse": color["mse"], "r2": color["r2"]}
    if return_items:
        out["items"] = {"correct": correct.int().tolist(), "sq_error": color["sq_error"].tolist()}
    return out
