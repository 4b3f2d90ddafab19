"""AC-MoE synthetic study: subspace clusters.

K latent clusters over ``id_features`` identity features: each cluster is tight on its own few features
(σ = 0.2 around means ±2) and loose on all the others (σ = 2 around 0), so the cluster is hard to read from
the raw input. The target is a cluster-specific linear map of a content vector c: ``y = A_z c``. A model
that routes each cluster to its own experts can learn every ``A_z``; a router that mixes clusters cannot.
The model is a linear embedding, pre-LN residual MoE layers (AC from the second one on), and a linear head.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.experiments.acmoe_common import (
    ARM_NOTES,
    ARMS,
    ac_arms,
    ac_stats,
    eval_curve,
    fmt_steps,
    moe_layers,
    routing_of,
    shared_init,
    steps_to_reach,
    train_cell,
)
from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.metrics import dispersion_ratio, expert_load_std, flip_rate, nmi, purity
from clusterformers.models.ffn import resolve_ac_option
from clusterformers.moe import MoE
from clusterformers.moe.adaptive import token_metric
from clusterformers.report import Section, fmt, fmt_diff, line_figure, markdown_table
from clusterformers.state import share_state
from clusterformers.train import TrainConfig


@dataclass
class SyntheticStudy:
    """Sizes and budget of the synthetic study; every arm gets the same."""

    arms: tuple[str, ...] = ("smoe", "xmoe", "stablemoe", "ac", "ac-var", "ac-global", "ac-moe-input",
                             "ac-unmasked")
    num_clusters: int = 8
    id_features: int = 96
    tight_features: int = 3
    content_dim: int = 8
    out_dim: int = 4
    sigma_tight: float = 0.2
    sigma_loose: float = 2.0
    mean: float = 2.0
    n_train: int = 20_000
    n_test: int = 4_000
    dim: int = 64
    depth: int = 3
    num_experts: int = 8
    k: int = 2
    hidden: int = 32
    steps: int = 1000
    batch_size: int = 256
    lr: float = 3e-3
    eval_every: int = 25
    eval_batch: int = 1000
    noise_sigma: float = 0.5


# --------------------------------------------------------------------------------------------- data


@dataclass
class SubspaceTask:
    """The latent structure: ``means[K, F]`` (±mean on each cluster's own features, 0 elsewhere),
    ``own[K, t]`` the own feature indices, ``maps[K, out, c]`` the per-cluster linear maps."""

    means: Tensor
    own: Tensor
    maps: Tensor
    sigma_tight: float
    sigma_loose: float

    @property
    def id_features(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``x[n, F + c]`` (identity features, then content), ``y[n, out]`` and latent ``z[n]``."""
        K, feats = self.means.shape
        z = torch.randint(K, (n,), generator=generator)
        scale = torch.full((K, feats), self.sigma_loose)
        scale.scatter_(1, self.own, self.sigma_tight)
        ident = self.means[z] + scale[z] * torch.randn(n, feats, generator=generator)
        c = torch.randn(n, self.maps.shape[2], generator=generator)
        y = torch.einsum("noc,nc->no", self.maps[z], c)
        return torch.cat([ident, c], dim=1), y, z

    def corrupt(self, x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
        """Gaussian noise of std ``sigma`` on the identity features only (the content is untouched)."""
        noise = torch.zeros_like(x)
        noise[:, : self.id_features] = sigma * torch.randn(x.shape[0], self.id_features, generator=generator)
        return x + noise


def make_task(study: SyntheticStudy, seed: int) -> SubspaceTask:
    """Draw the clusters' own features (disjoint), their mean signs and the maps ``A_z`` from ``seed``."""
    K, t, feats = study.num_clusters, study.tight_features, study.id_features
    if K * t > feats:
        raise ValueError(f"num_clusters·tight_features = {K * t} exceeds id_features = {feats}")
    gen = torch.Generator().manual_seed(10_000 + seed)
    own = torch.randperm(feats, generator=gen)[: K * t].view(K, t)
    signs = torch.randint(2, (K, t), generator=gen).float() * 2 - 1
    means = torch.zeros(K, feats).scatter_(1, own, study.mean * signs)
    maps = torch.randn(K, study.out_dim, study.content_dim, generator=gen) / math.sqrt(study.content_dim)
    return SubspaceTask(means, own, maps, study.sigma_tight, study.sigma_loose)


# --------------------------------------------------------------------------------------------- model


class ResidualMoENet(nn.Module):
    """``Linear(in, d)``, then ``depth`` pre-LN residual MoE layers ``x + MoE(LN(x))`` threading their routing
    state through the shared ``self.layer_state``, then ``LN`` and a linear head. ``forward(x[B, in]) -> [B, out]``."""

    def __init__(self, in_dim: int, out_dim: int, dim: int, depth: int, num_experts: int, k: int, hidden: int,
                 moe: dict) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.moes = nn.ModuleList(
            MoE(dim, num_experts, k, hidden, router=moe["router"], ac=resolve_ac_option(moe.get("ac")))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        share_state(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            h = h + moe(norm(h))
        return self.head(self.norm(h))


def build_model(study: SyntheticStudy, arm: str, seed: int) -> ResidualMoENet:
    def make(name: str) -> ResidualMoENet:
        return ResidualMoENet(study.id_features + study.content_dim, study.out_dim, study.dim, study.depth,
                              study.num_experts, study.k, study.hidden, ARMS[name])

    torch.manual_seed(seed)
    return shared_init(make(arm), lambda: make("stablemoe"), seed)


# --------------------------------------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    """Test MSE, and per MoE layer: routing ``[T, k]``, router input ``h[T, d]`` and ``u = m(i) ⊙ h_i``."""

    mse: float
    routes: list[Tensor]
    h: list[Tensor]
    u: list[Tensor]


@torch.no_grad()
def evaluate(model: ResidualMoENet, x: Tensor, y: Tensor, bs: int, device: torch.device,
             diagnostics: bool = True) -> Evaluation:
    """Evaluate in batches of ``bs`` (the AC statistics are those of each batch unless in EMA mode)."""
    model.eval()
    layers = moe_layers(model)
    inputs: list[list[Tensor]] = [[] for _ in layers]
    mults: list[list[Tensor | None]] = [[] for _ in layers]
    routes: list[list[Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach().cpu()))
             for i, layer in enumerate(layers)] if diagnostics else []
    se = 0.0
    try:
        for xb, yb in batches((x, y), bs):
            se += float((model(xb.to(device)).cpu() - yb).square().sum())
            if not diagnostics:
                continue
            for i, r in enumerate(routing_of(model)):
                routes[i].append(r)
            for i, layer in enumerate(layers):
                stats = layer.last_stats  # None: routed without AC (first layer, or a non-AC router)
                if stats is None:
                    mults[i].append(None)
                    continue
                prev = layers[i - 1].last_state
                mults[i].append(token_metric(stats.metric.cpu(), prev.indices.cpu(), prev.weights.cpu(),
                                             layer.router.ac.mix))
    finally:
        for hook in hooks:
            hook.remove()
    if not diagnostics:
        return Evaluation(se / y.numel(), [], [], [])
    h = [torch.cat(parts) for parts in inputs]
    u = [hi * torch.cat(m) if m[0] is not None else hi for hi, m in zip(h, mults, strict=True)]
    return Evaluation(se / y.numel(), [torch.cat(r) for r in routes], h, u)


def run_cell(study: SyntheticStudy, arm: str, seed: int, cell_dir: Path, device: torch.device) -> dict:
    """Train one (arm, seed) cell and measure it; returns a JSON-able dict."""
    task = make_task(study, seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x_tr, y_tr, _ = task.sample(study.n_train, gen)
    x_te, y_te, z_te = task.sample(study.n_test, gen)
    x_noisy = task.corrupt(x_te, study.noise_sigma, torch.Generator().manual_seed(30_000 + seed))
    model = build_model(study, arm, seed)
    batch_fn, _ = epoch_batch_fn((x_tr, y_tr), study.batch_size, seed)

    def loss_fn(net, batch):
        xb, yb = batch
        return F.mse_loss(net(xb), yb), {}

    def eval_fn(net):
        with ac_stats(net, "batch"):
            return {"test_mse": evaluate(net, x_te, y_te, study.eval_batch, device, diagnostics=False).mse}

    tcfg = TrainConfig(steps=study.steps, lr=study.lr, optimizer="adam", schedule="constant", grad_clip=1.0,
                       log_every=study.eval_every, eval_every=study.eval_every, ckpt_every=max(1, study.steps // 2),
                       seed=seed, device=str(device), progress=False, name=f"synthetic/{arm}/seed{seed}")
    res = train_cell(model, loss_fn, batch_fn, tcfg, cell_dir, {"study": asdict(study), "arm": arm,
                                                               "moe": ARMS[arm], "seed": seed}, eval_fn)
    steps, curve = eval_curve(res.history, "test_mse")
    with ac_stats(model, "batch"):
        clean = evaluate(model, x_te, y_te, study.eval_batch, device)
        noisy = evaluate(model, x_noisy, y_te, study.eval_batch, device)
    routes = clean.routes
    flips = [flip_rate(a, b) for a, b in zip(routes, noisy.routes, strict=True)]
    result = {
        "test_mse": clean.mse,
        "noisy_mse": noisy.mse,
        "curve_steps": steps,
        "curve": curve,
        "purity": [purity(r[:, 0], z_te) for r in routes],
        "nmi": [nmi(r[:, 0], z_te) for r in routes],
        "flip_top1": [f[0] for f in flips],
        "flip_topk": [f[1] for f in flips],
        "load_std": expert_load_std(routes, study.num_experts),
        "dispersion_h": dispersion_ratio(clean.h[-1], z_te),
        "dispersion_mh": dispersion_ratio(clean.u[-1], z_te),
    }
    if arm in ac_arms(study.arms):
        with ac_stats(model, "ema"):
            result["test_mse_ema"] = evaluate(model, x_te, y_te, study.eval_batch, device, False).mse
            result["noisy_mse_ema"] = evaluate(model, x_noisy, y_te, study.eval_batch, device, False).mse
    return result


# --------------------------------------------------------------------------------------------- report


def section(study: SyntheticStudy, cells: dict[str, list[dict]], out: Path) -> Section:
    arms = list(cells)
    n_seeds = len(cells[arms[0]])
    threshold = statistics.median(r["test_mse"] for r in cells["stablemoe"])
    reach = {a: [steps_to_reach(r["curve_steps"], r["curve"], threshold) for r in cells[a]] for a in arms}
    last = study.depth - 1
    rows = []
    for a in arms:
        rs = cells[a]
        rows.append([
            a, fmt_steps(reach[a], study.steps), fmt([r["test_mse"] for r in rs], 4),
            fmt([r["noisy_mse"] for r in rs], 4),
            *[fmt([r["purity"][i] for r in rs], 3) for i in range(study.depth)],
            fmt([r["nmi"][last] for r in rs], 3), fmt([r["flip_top1"][last] for r in rs], 3),
            fmt([r["load_std"] for r in rs], 2), fmt([r["dispersion_mh"] for r in rs], 2),
            fmt([r["dispersion_h"] for r in rs], 2),
        ])
    header = ["arm", f"steps to MSE ≤ {threshold:.4f}", "test MSE", f"MSE, noise σ={study.noise_sigma}",
              *[f"purity L{i + 1}" for i in range(study.depth)], f"NMI L{study.depth}", f"flip L{study.depth}",
              "load std %", f"disp. ratio M⊙h L{study.depth}", f"disp. ratio h L{study.depth}"]
    md = [f"{study.num_clusters} latent clusters over {study.id_features} identity features (each tight, σ="
          f"{study.sigma_tight}, on its own {study.tight_features}; σ={study.sigma_loose} elsewhere) plus a "
          f"{study.content_dim}-d content vector; target y = A_z c. Model: linear to d={study.dim}, "
          f"{study.depth} pre-LN residual MoE layers (E={study.num_experts}, k={study.k}, experts "
          f"d→{study.hidden}→d; AC from layer 2), linear head. Adam {study.lr:g}, batch {study.batch_size}, "
          f"{study.steps} steps, {study.n_train:,}/{study.n_test:,} train/test samples; mean ± std over "
          f"{n_seeds} paired seeds. The threshold is the stablemoe median final test MSE (test MSE evaluated "
          f"every {study.eval_every} steps). Batch statistics at evaluation (eval batch {study.eval_batch}). "
          f"Purity/NMI: top-1 expert vs latent cluster; flip: share of tokens whose top-1 expert changes under "
          f"the noise; dispersion ratio: within/between-cluster scatter of the router input at the last layer "
          f"with and without the AC multiplier (equal for non-AC arms).\n", markdown_table(header, rows), ""]
    ema = [a for a in arms if "test_mse_ema" in cells[a][0]]
    if ema:
        md += ["AC arms evaluated with the running (EMA) statistics instead of batch statistics:\n",
               markdown_table(["arm", "test MSE (EMA)", f"noise σ={study.noise_sigma} (EMA)"],
                              [[a, fmt([r["test_mse_ema"] for r in cells[a]], 4),
                                fmt([r["noisy_mse_ema"] for r in cells[a]], 4)] for a in ema]), ""]
    md.append("**Paired differences** (MSE; purity at the last layer), 95% t-intervals:\n")
    for a in ac_arms(arms):
        for base in ("stablemoe", "smoe"):
            if base not in cells:
                continue
            ours, theirs = cells[a], cells[base]

            def diff(key: str, digits: int, ours=ours, theirs=theirs) -> str:
                pick = (lambda r: r[key][last]) if key == "purity" else (lambda r: r[key])
                return fmt_diff([pick(r) for r in ours], [pick(r) for r in theirs], digits)

            md.append(f"- {a} − {base}: test MSE {diff('test_mse', 4)}; noisy MSE {diff('noisy_mse', 4)}; "
                      f"purity L{study.depth} {diff('purity', 3)}")
    ablations = [a for a in ac_arms(arms) if a not in ("ac", "ac-swin")]
    if ablations and "ac" in cells:
        md.append("\n**Ablations against `ac`** (one AC setting changed each; M = I is `stablemoe` above):\n")
        md.append(markdown_table(
            ["arm", "change", "Δ test MSE", "Δ noisy MSE", f"Δ purity L{study.depth}"],
            [[a, ARM_NOTES[a], fmt_diff([r["test_mse"] for r in cells[a]], [r["test_mse"] for r in cells["ac"]], 4),
              fmt_diff([r["noisy_mse"] for r in cells[a]], [r["noisy_mse"] for r in cells["ac"]], 4),
              fmt_diff([r["purity"][last] for r in cells[a]], [r["purity"][last] for r in cells["ac"]], 3)]
             for a in ablations]))
    path = out / "figures" / "acmoe_synthetic_curves.png"
    steps = cells[arms[0]][0]["curve_steps"]
    line_figure(path, steps, {a: [r["curve"] for r in cells[a]] for a in arms}, xlabel="step",
                ylabel="test MSE", title="Synthetic subspace clusters: convergence", logy=True)
    results = {"cells": cells, "threshold": threshold, "steps_to_threshold": reach}
    return Section("AC-MoE — synthetic subspace clusters", "\n".join(md) + "\n", [str(path.relative_to(out))],
                   results)
