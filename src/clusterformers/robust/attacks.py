"""L∞ adversarial attacks on image classifiers in ``[0, 1]`` pixel space.

All attacks use the **true** labels, keep ``‖x_adv − x‖∞ ≤ eps`` and clip to ``[0, 1]`` (the reference
code of Elliptical Attention attacked normalised inputs, unclipped, with predicted labels).
They run the model in eval mode and restore every submodule's mode afterwards; parameter gradients are
neither computed nor touched. Everything happens on the input's device.

**Gradient through the elliptical metric.** FGSM and PGD differentiate the model as it is configured. The
reference treats the metric ``m`` as a constant (it is detached: gradient masking); to attack through it,
the caller switches it on first::

    set_metric_grad(model, True)     # clusterformers.attention.set_metric_grad
    acc = robust_accuracy(model, (x, y), pgd, eps=8 / 255)
    set_metric_grad(model, False)

The forward output is the same in both settings; only the input gradient changes. SPSA needs no gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.robust.corruptions import sample_like

logger = logging.getLogger(__name__)

Attack = Callable[..., Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's own ``training`` flag on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def _check(x: Tensor, y: Tensor, eps: float) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point image batch [B, ...], got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.dtype != torch.long or tuple(y.shape) != (x.shape[0],):
        got = f"{y.dtype} {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be torch.long class labels of shape [{x.shape[0]}], got {got}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"x must hold pixels in [0, 1] (attacks work in pixel space; normalise inside the model), "
            f"got min {lo:.4g}, max {hi:.4g}"
        )


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L∞ ball of radius ``eps`` around ``x`` intersected with ``[0, 1]``."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input only (parameter grads untouched)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method: ``clip(x + eps · sign(∇ₓ CE(model(x), y)), 0, 1)``.

    Args:
        model: classifier ``[B, ...] -> logits [B, K]``.
        x: images ``[B, ...]`` in ``[0, 1]``.
        y: true labels ``[B]`` (long).
        eps: L∞ radius in pixel units.

    Returns:
        ``x_adv`` like ``x``, detached.
    """
    _check(x, y, eps)
    with eval_mode(model):
        grad = _input_grad(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al.) on the cross-entropy, L∞, returning the last iterate.

    Args:
        model, x, y, eps: as in :func:`fgsm`.
        steps: number of signed-gradient steps.
        step_size: default ``2.5 · eps / steps``.
        random_start: start from ``x + U(−eps, eps)`` (projected) instead of ``x``.
        generator: optional generator for the random start.

    Returns:
        ``x_adv`` like ``x``, detached, with ``‖x_adv − x‖∞ ≤ eps`` and pixels in ``[0, 1]``.
    """
    _check(x, y, eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    if not alpha >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    x = x.detach()
    x_adv = x
    if random_start:
        x_adv = _project(x + eps * (2 * sample_like(x, "uniform", generator) - 1), x, eps)
    with eval_mode(model):
        for _ in range(steps):
            x_adv = _project(x_adv + alpha * _input_grad(model, x_adv, y).sign(), x, eps)
    return x_adv


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j≠y} z_j − z_y`` per sample ``[B]``: positive iff the sample is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - true


def spsa(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    iters: int = 20,
    samples: int = 128,
    lr: float = 0.01,
    delta: float = 0.01,
    generator: torch.Generator | None = None,
    max_forward: int = 4096,
) -> Tensor:
    """SPSA (Uesato et al., 2018): gradient-free, Adam ascent on the margin loss, projected.

    Each iteration estimates ``∇ₓ margin`` from ``samples`` Rademacher directions ``v``:
    ``mean_v (L(x + δv) − L(x − δv)) / (2δ) · v``, takes an Adam step (β = 0.9, 0.999) of size ``lr`` and
    projects onto the eps-ball and ``[0, 1]``. Per sample, the iterate with the highest margin seen so far
    is returned (a sample stays adversarial once it has been made so). The model is only evaluated, never
    differentiated, so the metric's gradient setting is irrelevant.

    Args:
        model, x, y, eps: as in :func:`fgsm`.
        iters: number of Adam steps.
        samples: perturbation directions per step (antithetic pairs: ``2 · samples`` evaluations).
        lr: Adam learning rate (pixel units).
        delta: finite-difference step of the estimate.
        generator: optional generator for the directions.
        max_forward: most images per forward pass while estimating (never fewer than ``2 · B``).

    Returns:
        ``x_adv`` like ``x``, detached.
    """
    _check(x, y, eps)
    if iters < 1 or samples < 1 or max_forward < 1:
        raise ValueError(f"iters, samples and max_forward must be >= 1, got {iters}, {samples}, {max_forward}")
    if not (lr > 0 and delta > 0):
        raise ValueError(f"lr and delta must be > 0, got lr={lr}, delta={delta}")
    x = x.detach()
    batch = x.shape[0]
    per_chunk = max(1, max_forward // (2 * batch))
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    x_adv = x.clone()
    first = torch.zeros_like(x)
    second = torch.zeros_like(x)
    with eval_mode(model), torch.no_grad():
        best = x.clone()
        best_loss = margin_loss(model(x), y)
        for t in range(1, iters + 1):
            grad = torch.zeros_like(x)
            for start in range(0, samples, per_chunk):
                k = min(per_chunk, samples - start)
                v = sample_like(x.new_empty((k, *x.shape)), "rademacher", generator)  # [k, B, ...]
                probes = torch.cat([x_adv + delta * v, x_adv - delta * v]).flatten(0, 1)
                losses = margin_loss(model(probes), y.repeat(2 * k)).view(2, k, batch)
                diff = (losses[0] - losses[1]) / (2 * delta)  # [k, B]
                grad += (diff.view(k, batch, *([1] * (x.dim() - 1))) * v).sum(dim=0)
            grad /= samples
            first.mul_(beta1).add_(grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = (first / (1 - beta1**t)) / ((second / (1 - beta2**t)).sqrt() + adam_eps)
            x_adv = _project(x_adv + lr * step, x, eps)
            loss = margin_loss(model(x_adv), y)
            better = loss > best_loss
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_loss = torch.where(better, loss, best_loss)
    return best


_ATTACKS: dict[str, Attack] = {"fgsm": fgsm, "pgd": pgd, "spsa": spsa}


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """``(x, y)`` tensors are split into batches; anything else is iterated as ``(x, y, ...)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
    return ((batch[0], batch[1]) for batch in data)


def correct_mask(
    model: nn.Module,
    data: Any,
    attack: Attack | str | None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    **attack_kwargs: Any,
) -> Tensor:
    """Per sample, whether ``model`` classifies the attacked input correctly (clean when ``attack`` is None).

    Args:
        model: classifier on pixels in ``[0, 1]``.
        data: a pair ``(x, y)`` of tensors (split into ``batch_size`` chunks), or an iterable of
            ``(x, y, ...)`` batches such as a ``DataLoader``.
        attack: ``fgsm``, ``pgd``, ``spsa`` (function or name), any ``attack(model, x, y, **kw) -> x_adv``,
            or None.
        batch_size: chunk size for tensor input.
        device: where batches go; default the device of the model's first parameter (else CPU).
        **attack_kwargs: passed to the attack (``eps``, ``steps``, ``generator``, ...).

    Returns:
        bool ``[N]`` on the CPU, in the order of ``data``.
    """
    if isinstance(attack, str):
        if attack not in _ATTACKS:
            raise ValueError(f"attack must be one of {sorted(_ATTACKS)} or a callable, got {attack!r}")
        attack = _ATTACKS[attack]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    out = []
    for x, y in _batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        x_eval = x if attack is None else attack(model, x, y, **attack_kwargs)
        with eval_mode(model), torch.no_grad():
            out.append((model(x_eval).argmax(dim=1) == y).cpu())
    if not out or sum(o.numel() for o in out) == 0:
        raise ValueError("robust_accuracy got no samples")
    return torch.cat(out)


def robust_accuracy(
    model: nn.Module,
    data: Any,
    attack: Attack | str | None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    **attack_kwargs: Any,
) -> float:
    """Accuracy of ``model`` on attacked inputs (clean accuracy when ``attack`` is None): the mean of
    :func:`correct_mask` (same arguments)."""
    correct = correct_mask(model, data, attack, batch_size=batch_size, device=device, **attack_kwargs)
    logger.debug("robust accuracy %d/%d", int(correct.sum()), correct.numel())
    return float(correct.double().mean())
