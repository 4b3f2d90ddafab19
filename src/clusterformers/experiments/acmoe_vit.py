"""AC-MoE image study: ViT-MoE on MNIST-5k.

A 4-block ViT (patch 7, d=64) whose blocks 2-4 (1-based) are MoE layers (E=8, k=2); an AC router is
adaptive in blocks 3-4 (the first MoE layer has no previous routing state). Clean accuracy, Gaussian noise,
PGD (L∞, pixel space, true labels), the routing flip rate under noise, test accuracy along
training, and a picture of which expert each image patch goes to at the last MoE layer. Attacks differentiate
the model as it runs: the AC metric is computed without gradient (as in the reference), so the attack sees M
as a constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.data.augment import random_translate
from clusterformers.data.images import mnist5k_split
from clusterformers.experiments.acmoe_common import (
    ARMS,
    ac_arms,
    eval_curve,
    moe_layers,
    routing_of,
    shared_init,
    train_cell,
)
from clusterformers.experiments.claims import compact
from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.metrics import flip_rate
from clusterformers.models.vit import ViT, ViTConfig
from clusterformers.report import Section, fmt, line_figure, markdown_table
from clusterformers.robust.attacks import correct_mask, pgd
from clusterformers.robust.corruptions import gaussian_noise
from clusterformers.train import TrainConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class VitStudy:
    """Sizes and budget of the ViT-MoE study; every arm gets the same."""

    arms: tuple[str, ...] = ("stablemoe", "ac")
    patch_size: int = 7
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_experts: int = 8
    k: int = 2
    moe_layers: tuple[int, ...] = (1, 2, 3)
    epochs: int = 30
    shift: int = 2  # random translation of up to this many pixels (training only)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    eval_images: int = 1000
    eval_batch: int = 500
    noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)
    attack_eps: tuple[int, ...] = (1, 2, 4, 8)  # in 1/255
    pgd_steps: int = 20
    pgd_step_frac: float = 0.15
    picture_digits: int = 6


def build_model(study: VitStudy, arm: str, seed: int) -> ViT:
    def make(name: str) -> ViT:
        cfg = ViTConfig(patch_size=study.patch_size, dim=study.dim, depth=study.depth, num_heads=study.num_heads,
                        mlp_ratio=study.mlp_ratio, ffn="moe",
                        ffn_kwargs={"num_experts": study.num_experts, "top_k": study.k,
                                    "moe_layers": list(study.moe_layers), **ARMS[name]})
        return ViT(cfg)

    torch.manual_seed(seed)
    return shared_init(make(arm), lambda: make("stablemoe"), seed)


def load_data(data_path: str | None, eval_images: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train tensors and ``eval_images`` test images in ``[0, 1]``, ``[N, 1, 28, 28]``.

    The test split comes sorted by label; a fixed permutation (the same for every arm and seed) makes any
    prefix a class-balanced sample and every evaluation batch a mix of classes, which matters for AC's
    batch statistics."""
    x_tr, y_tr, x_te, y_te = mnist5k_split(data_path, seed=0)
    order = np.random.default_rng(0).permutation(len(y_te))[:eval_images]
    return _images(x_tr), torch.from_numpy(y_tr), _images(x_te[order]), torch.from_numpy(y_te[order])


def _images(x: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, 1, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(x).float().div(255).unsqueeze(1)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, bs: int, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """Predicted labels ``[N]`` and each MoE layer's routing ``[N, 1 + patches, k]`` (batches of ``bs``)."""
    model.eval()
    preds, routes = [], []
    for (xb,) in batches((x,), bs):
        preds.append(model(xb.to(device)).argmax(-1).cpu())
        routes.append([r.view(xb.shape[0], -1, r.shape[-1]) for r in routing_of(model)])
    return torch.cat(preds), [torch.cat([r[i] for r in routes]) for i in range(len(routes[0]))]


def picture_index(y: Tensor, digits: int, within: int) -> list[int]:
    """The first test image of each digit ``0..digits-1`` among the first ``within`` images."""
    return [int((y[:within] == d).nonzero()[0]) for d in range(digits) if (y[:within] == d).any()]


def run_cell(study: VitStudy, arm: str, seed: int, cell_dir: Path, device: torch.device,
             data_path: str | None) -> dict:
    """Train one (arm, seed) ViT-MoE and evaluate it with its configured AC statistics (running ones in
    eval mode); scalar accuracies, and one 0/1 per test image under ``items``."""
    x_tr, y_tr, x_te, y_te = load_data(data_path, study.eval_images)
    model = build_model(study, arm, seed)
    base, spe = epoch_batch_fn((x_tr, y_tr), study.batch_size, seed)

    def batch_fn(step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        xb, yb = base(step, rank, world)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
        return random_translate(xb, study.shift, gen), yb

    def loss_fn(net, batch):
        xb, yb = batch
        logits = net(xb)
        return F.cross_entropy(logits, yb), {"acc": (logits.argmax(-1) == yb).float().mean()}

    def eval_fn(net):
        return {"test_acc": float((predict(net, x_te, study.eval_batch, device)[0] == y_te).float().mean())}

    tcfg = TrainConfig(steps=study.epochs * spe, lr=study.lr, optimizer="adam",
                       warmup_steps=min(study.epochs * spe, round(study.warmup_epochs * spe)),
                       schedule="cosine", log_every=spe, eval_every=spe, ckpt_every=spe * 5, seed=seed,
                       device=str(device), progress=False, name=f"vit/{arm}/seed{seed}")
    config = {"study": asdict(study), "arm": arm, "moe": ARMS[arm], "seed": seed}
    res = train_cell(model, loss_fn, batch_fn, tcfg, cell_dir, config, eval_fn)
    steps, curve = eval_curve(res.history, "test_acc")
    pred, routes = predict(model, x_te, study.eval_batch, device)
    items = {"clean": pred == y_te}
    idx = picture_index(y_te, study.picture_digits, study.eval_batch)
    flips: dict[str, list[float]] = {}
    for i, sigma in enumerate(study.noise_sigmas):
        noisy = gaussian_noise(x_te, sigma, generator=torch.Generator().manual_seed(1234 + i))
        pred_n, routes_n = predict(model, noisy, study.eval_batch, device)
        items[f"noise{sigma:g}"] = pred_n == y_te
        flips[f"{sigma:g}"] = list(flip_rate(routes[-1].flatten(0, 1), routes_n[-1].flatten(0, 1)))
    for e in study.attack_eps:
        items[f"pgd_e{e}"] = correct_mask(model, (x_te, y_te), pgd, batch_size=study.eval_batch, device=device,
                                          eps=e / 255, steps=study.pgd_steps, step_size=study.pgd_step_frac * e / 255,
                                          generator=torch.Generator(device=device).manual_seed(seed))
    items["pgd_mean"] = torch.stack([items[f"pgd_e{e}"] for e in study.attack_eps]).double().mean(0)
    return {**{k: float(v.double().mean()) for k, v in items.items()},
            "curve_epochs": [s // spe for s in steps], "curve": curve, "flip": flips,
            "picture": {"index": idx, "experts": routes[-1][idx, 1:, 0].tolist()},
            "num_moe_layers": len(moe_layers(model)),
            "items": {k: compact(v) for k, v in items.items()}}


# --------------------------------------------------------------------------------------------- report


def assignment_figure(path: Path, images: np.ndarray, experts: dict[str, list[list[int]]], patch: int,
                      num_experts: int) -> None:
    """Rows = arms, columns = test digits; each patch tinted with the colour of its top-1 expert at the last
    MoE layer (and labelled with the expert's number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arms, n = list(experts), images.shape[0]
    side = images.shape[1] // patch
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
    fig, axes = plt.subplots(len(arms), n, figsize=(1.6 * n, 1.7 * len(arms)), squeeze=False)
    for r, arm in enumerate(arms):
        for c in range(n):
            ax = axes[r][c]
            grid = np.asarray(experts[arm][c]).reshape(side, side)
            colours = cmap(grid % cmap.N)[..., :3].repeat(patch, 0).repeat(patch, 1)
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
            ax.imshow(colours, alpha=0.45)
            for i in range(side):
                for j in range(side):
                    ax.text(j * patch + patch / 2 - 0.5, i * patch + patch / 2 - 0.5, str(grid[i, j]),
                            ha="center", va="center", fontsize=7, color="white")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(arm, fontsize=9)
    fig.suptitle("Top-1 expert of each patch at the last MoE layer (seed 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(study: VitStudy, cells: dict[str, dict[int, dict]], out: Path, data_path: str | None) -> Section:
    """Tables and figures of the ViT-MoE study (``cells``: ``{arm: {seed: result}}``)."""
    arms = list(cells)
    mid = f"{study.noise_sigmas[len(study.noise_sigmas) // 2]:g}"
    header = ["arm", "seeds", "clean acc %", *[f"noise σ={s:g}" for s in study.noise_sigmas],
              *[f"PGD ε={e}/255" for e in study.attack_eps], f"flip top-1 (σ={mid})"]
    rows = [[a, len(rs), fmt([r["clean"] for r in rs], 2, 100),
             *[fmt([r[f"noise{s:g}"] for r in rs], 1, 100) for s in study.noise_sigmas],
             *[fmt([r[f"pgd_e{e}"] for r in rs], 1, 100) for e in study.attack_eps],
             fmt([r["flip"][mid][0] for r in rs], 3)]
            for a, rs in ((a, list(cells[a].values())) for a in arms)]
    layers = ", ".join(str(i + 1) for i in study.moe_layers)
    md = [f"ViT (patch {study.patch_size}, d={study.dim}, {study.depth} blocks, {study.num_heads} heads) with MoE "
          f"(E={study.num_experts}, k={study.k}, experts d→{int(study.dim * study.mlp_ratio)}→d) in blocks {layers}"
          f" (1-based); AC arms adapt from the second MoE layer on and evaluate with their running statistics. "
          f"Adam {study.lr:g} (cosine, {study.warmup_epochs:g} warm-up epochs), random shifts of up to "
          f"{study.shift} px, batch {study.batch_size}, {study.epochs} epochs on 4,000 MNIST-5k images; "
          f"{study.eval_images} test images; PGD-{study.pgd_steps} (steps of {study.pgd_step_frac:g}·ε, L∞, pixel "
          "space, the AC metric held constant by the attack). Flip: share of tokens whose last-MoE-layer routing "
          "changes under the noise.\n", markdown_table(header, rows), ""]
    first = next(iter(cells[arms[0]].values()))
    figs = []
    path = out / "figures" / "acmoe_vit_curves.png"
    line_figure(path, first["curve_epochs"], {a: [[v * 100 for v in r["curve"]] for r in cells[a].values()]
                                              for a in arms},
                xlabel="epoch", ylabel="test accuracy %", title="ViT-MoE on MNIST-5k: convergence")
    figs.append(path)
    path = out / "figures" / "acmoe_vit_pgd.png"
    line_figure(path, list(study.attack_eps), {a: [[r[f"pgd_e{e}"] * 100 for e in study.attack_eps]
                                                   for r in cells[a].values()] for a in arms},
                xlabel="ε (1/255)", ylabel="accuracy %", title="ViT-MoE under PGD")
    figs.append(path)
    shown = [a for a in ("stablemoe", "smoe", *ac_arms(arms)) if a in cells]
    _, _, x_te, _ = load_data(data_path, study.eval_images)
    index = first["picture"]["index"]
    images = (x_te[index, 0] * 255).round().to(torch.uint8).numpy()
    path = out / "figures" / "acmoe_vit_experts.png"
    assignment_figure(path, images, {a: next(iter(cells[a].values()))["picture"]["experts"] for a in shown},
                      study.patch_size, study.num_experts)
    figs.append(path)
    md.append("The expert-assignment picture shows, for the first test image of each digit, the top-1 expert of "
              "every patch token at the last MoE layer (expert numbers are arbitrary per model).")
    return Section("AC-MoE — ViT-MoE on MNIST-5k", "\n".join(md) + "\n", [str(p.relative_to(out)) for p in figs],
                   {})
