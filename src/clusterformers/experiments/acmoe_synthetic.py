"""AC-MoE synthetic study: subspace clusters.

K latent clusters over ``id_features`` identity features: each cluster is tight on its own few features
(σ = 0.2 around means ±2) and loose on all the others (σ = 2 around 0), so the cluster is hard to read from
the raw input. The target is a cluster-specific linear map of a content vector c: ``y = A_z c``. A model
that routes each cluster to its own experts can learn every ``A_z``; a router that mixes clusters cannot.
The model is a linear embedding, pre-LN residual MoE layers (AC from the second one on), and a linear head;
every arm trains with the same load-balancing loss (``aux_coef``), without which two clusters often share an
expert and the first layer's purity stays below 0.9 (AC's premise: tight clusters at the previous layer).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.experiments.acmoe_common import (
    ARMS,
    ac_arms,
    eval_curve,
    fmt_steps,
    moe_layers,
    routing_of,
    shared_init,
    steps_to_reach,
    train_cell,
)
from clusterformers.experiments.claims import compact
from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.metrics import dispersion_ratio, expert_load_std, flip_rate, nmi, purity
from clusterformers.models.ffn import resolve_ac_option
from clusterformers.moe import MoE, total_aux_loss
from clusterformers.moe.adaptive import token_metric
from clusterformers.report import Section, fmt, line_figure, markdown_table
from clusterformers.state import share_state
from clusterformers.train import TrainConfig

NOISE_WHERE = ("all", "tight", "loose")
CONVERGENCE_FACTOR = 1.5


@dataclass
class SyntheticStudy:
    """Sizes and budget of the synthetic study; every arm gets the same."""

    arms: tuple[str, ...] = ("stablemoe", "ac", "ac-var")
    num_clusters: int = 8
    id_features: int = 96
    tight_features: int = 3
    content_dim: int = 8
    out_dim: int = 4
    sigma_tight: float = 0.2
    sigma_loose: float = 1.0
    mean: float = 2.0
    n_train: int = 20_000
    n_test: int = 4_000
    dim: int = 64
    depth: int = 3
    num_experts: int = 8
    k: int = 2
    hidden: int = 32
    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    aux_coef: float = 0.01  # load balancing for every arm: without it clusters share experts (purity < 0.9)
    schedule: str = "cosine"
    warmup_steps: int = 100
    eval_every: int = 50
    eval_batch: int = 1000
    noise_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    noise_draws: int = 5
    main_sigma: float = 0.5  # the corruption of the confirmatory claim (all identity features)


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

    def corrupt(self, x: Tensor, sigma: float, generator: torch.Generator, where: str = "all") -> Tensor:
        """Gaussian noise of std ``sigma`` on identity features only (the content is untouched): ``"all"`` of
        them, the clusters' ``"tight"`` own features, or the ``"loose"`` rest."""
        if where not in NOISE_WHERE:
            raise ValueError(f"where must be one of {NOISE_WHERE}, got {where!r}")
        noise = torch.zeros_like(x)
        noise[:, : self.id_features] = sigma * torch.randn(x.shape[0], self.id_features, generator=generator)
        tight = torch.zeros(x.shape[1], dtype=torch.bool)
        tight[self.own.flatten()] = True
        if where == "tight":
            noise[:, ~tight] = 0
        elif where == "loose":
            noise[:, tight] = 0
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
                 moe: dict, aux_coef: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.moes = nn.ModuleList(
            MoE(dim, num_experts, k, hidden, router=moe["router"], ac=resolve_ac_option(moe.get("ac")),
                aux_coef=aux_coef)
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
                              study.num_experts, study.k, study.hidden, ARMS[name], study.aux_coef)

    torch.manual_seed(seed)
    return shared_init(make(arm), lambda: make("stablemoe"), seed)


# --------------------------------------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    """Per test item squared error ``[N]`` (mean over outputs), and per MoE layer: routing ``[T, k]``, router
    input ``h[T, d]`` and ``u = m(i) ⊙ h_i``."""

    sq_error: Tensor
    routes: list[Tensor]
    h: list[Tensor]
    u: list[Tensor]

    @property
    def mse(self) -> float:
        return float(self.sq_error.mean())


@torch.no_grad()
def evaluate(model: ResidualMoENet, x: Tensor, y: Tensor, bs: int, device: torch.device,
             diagnostics: bool = True, oracle_x: Tensor | None = None) -> Evaluation:
    """Evaluate in batches of ``bs``, with the AC statistics the model is configured with (in eval mode the
    running ones: no test item affects another).

    ``oracle_x``: the clean inputs of ``x``; each AC layer then routes ``x`` with the metric chosen by the
    routing of the clean input at the previous layer (the routing-oracle control).
    """
    if oracle_x is not None and diagnostics:
        raise ValueError("the routing oracle (oracle_x) is evaluated without diagnostics")
    model.eval()
    layers = moe_layers(model)
    inputs: list[list[Tensor]] = [[] for _ in layers]
    mults: list[list[Tensor | None]] = [[] for _ in layers]
    routes: list[list[Tensor]] = [[] for _ in layers]
    clean_states: list = []  # filled by the clean pass of each batch; read by the oracle's noisy pass
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach().cpu()))
             for i, layer in enumerate(layers)] if diagnostics else []
    if oracle_x is not None:
        def inject(module, args, kwargs, i):
            if i == 0 or not clean_states:
                return None
            return args, {**kwargs, "prev": clean_states[i - 1]}

        hooks += [layer.register_forward_pre_hook(functools.partial(inject, i=i), with_kwargs=True)
                  for i, layer in enumerate(layers)]
    errors = []
    try:
        for i, (xb, yb) in enumerate(batches((x, y), bs)):
            if oracle_x is not None:
                clean_states.clear()
                model(oracle_x[i * bs : i * bs + xb.shape[0]].to(device))
                clean_states.extend(layer.last_state for layer in layers)
            errors.append((model(xb.to(device)).cpu() - yb).square().mean(1))
            if not diagnostics:
                continue
            for j, r in enumerate(routing_of(model)):
                routes[j].append(r)
            for j, layer in enumerate(layers):
                stats = layer.last_stats  # None: routed without AC (first layer, or a non-AC router)
                if stats is None:
                    mults[j].append(None)
                    continue
                prev = layers[j - 1].last_state
                mults[j].append(token_metric(stats.metric.cpu(), prev.indices.cpu(), prev.weights.cpu(),
                                             layer.router.ac.mix))
    finally:
        for hook in hooks:
            hook.remove()
    sq_error = torch.cat(errors)
    if not diagnostics:
        return Evaluation(sq_error, [], [], [])
    h = [torch.cat(parts) for parts in inputs]
    u = [hi * torch.cat(m) if m[0] is not None else hi for hi, m in zip(h, mults, strict=True)]
    return Evaluation(sq_error, [torch.cat(r) for r in routes], h, u)


def run_cell(study: SyntheticStudy, arm: str, seed: int, cell_dir: Path, device: torch.device) -> dict:
    """Train one (arm, seed) cell and measure it: a JSON-able dict, per-test-item squared errors under
    ``items`` (clean; each corruption averaged over ``noise_draws`` draws)."""
    task = make_task(study, seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x_tr, y_tr, _ = task.sample(study.n_train, gen)
    x_te, y_te, z_te = task.sample(study.n_test, gen)
    model = build_model(study, arm, seed)
    batch_fn, _ = epoch_batch_fn((x_tr, y_tr), study.batch_size, seed)

    def loss_fn(net, batch):
        xb, yb = batch
        mse = F.mse_loss(net(xb), yb)
        return mse + total_aux_loss(net), {"mse": mse.detach()}

    def eval_fn(net):
        return {"test_mse": evaluate(net, x_te, y_te, study.eval_batch, device, diagnostics=False).mse}

    tcfg = TrainConfig(steps=study.steps, lr=study.lr, optimizer="adam", schedule=study.schedule,
                       warmup_steps=min(study.warmup_steps, study.steps), grad_clip=1.0,
                       log_every=study.eval_every, eval_every=study.eval_every, ckpt_every=max(1, study.steps // 4),
                       seed=seed, device=str(device), progress=False, name=f"synthetic/{arm}/seed{seed}")
    res = train_cell(model, loss_fn, batch_fn, tcfg, cell_dir, {"study": asdict(study), "arm": arm,
                                                               "moe": ARMS[arm], "seed": seed}, eval_fn)
    steps, curve = eval_curve(res.history, "test_mse")
    clean = evaluate(model, x_te, y_te, study.eval_batch, device)
    items = {"clean": clean.sq_error}
    for where in NOISE_WHERE:
        for sigma in study.noise_sigmas:
            draws = [evaluate(model, task.corrupt(x_te, sigma, _noise_gen(seed, where, sigma, d), where), y_te,
                              study.eval_batch, device, diagnostics=False).sq_error for d in range(study.noise_draws)]
            items[f"noisy_{where}_{sigma:g}"] = torch.stack(draws).mean(0)
    main = task.corrupt(x_te, study.main_sigma, _noise_gen(seed, "all", study.main_sigma, 0))
    noisy = evaluate(model, main, y_te, study.eval_batch, device)
    if arm in ac_arms(study.arms):
        draws = [evaluate(model, task.corrupt(x_te, study.main_sigma, _noise_gen(seed, "all", study.main_sigma, d)),
                          y_te, study.eval_batch, device, diagnostics=False, oracle_x=x_te).sq_error
                 for d in range(study.noise_draws)]
        items[f"oracle_all_{study.main_sigma:g}"] = torch.stack(draws).mean(0)
    flips = [flip_rate(a, b) for a, b in zip(clean.routes, noisy.routes, strict=True)]
    scalars = {k: float(v.mean()) for k, v in items.items()}
    return {
        **scalars,
        "test_mse": scalars["clean"],
        "curve_steps": steps,
        "curve": curve,
        "purity": [purity(r[:, 0], z_te) for r in clean.routes],
        "purity_last": purity(clean.routes[-1][:, 0], z_te),
        "nmi": [nmi(r[:, 0], z_te) for r in clean.routes],
        "flip_top1": [f[0] for f in flips],
        "flip_topk": [f[1] for f in flips],
        "load_std": expert_load_std(clean.routes, study.num_experts),
        "dispersion_h": dispersion_ratio(clean.h[-1], z_te),
        "dispersion_mh": dispersion_ratio(clean.u[-1], z_te),
        "items": {k: compact(v) for k, v in items.items()},
    }


def _noise_gen(seed: int, where: str, sigma: float, draw: int) -> torch.Generator:
    """The same noise draws for every arm of a seed (paired), distinct across corruptions and draws."""
    key = 30_000 + seed * 1000 + NOISE_WHERE.index(where) * 100 + round(sigma * 16) * 5 + draw
    return torch.Generator().manual_seed(key)


# --------------------------------------------------------------------------------------------- report


def add_convergence(cells: dict[str, dict[int, dict]], study: SyntheticStudy) -> float:
    """Set each cell's ``steps_to_threshold``: the first evaluated step whose test MSE is at most the threshold,
    1.5 × the median final test MSE of ``stablemoe`` (a curve that never gets there counts as
    ``steps + eval_every``). Returns the threshold."""
    threshold = CONVERGENCE_FACTOR * statistics.median(r["test_mse"] for r in cells["stablemoe"].values())
    for arm_cells in cells.values():
        for r in arm_cells.values():
            reached = steps_to_reach(r["curve_steps"], r["curve"], threshold)
            r["steps_to_threshold"] = reached if reached is not None else study.steps + study.eval_every
    return threshold


def section(study: SyntheticStudy, cells: dict[str, dict[int, dict]], out: Path) -> Section:
    """Tables of the synthetic study (``cells``: ``{arm: {seed: result}}``, arms without the study prefix)."""
    arms = list(cells)
    n_seeds = len(cells["stablemoe"])
    threshold = add_convergence(cells, study)
    last = study.depth - 1
    main = f"{study.main_sigma:g}"
    rows = []
    for a in arms:
        rs = list(cells[a].values())
        reach = [r["steps_to_threshold"] if r["steps_to_threshold"] <= study.steps else None for r in rs]
        oracle = f"oracle_all_{main}"
        rows.append([
            a, len(rs), fmt_steps(reach, study.steps), fmt([r["clean"] for r in rs], 4),
            fmt([r[f"noisy_all_{main}"] for r in rs], 4),
            fmt([r[oracle] for r in rs], 4) if oracle in rs[0] else "–",
            *[fmt([r["purity"][i] for r in rs], 3) for i in range(study.depth)],
            fmt([r["flip_top1"][last] for r in rs], 3), fmt([r["load_std"] for r in rs], 2),
            fmt([r["dispersion_mh"] for r in rs], 2), fmt([r["dispersion_h"] for r in rs], 2),
        ])
    header = ["arm", "seeds", f"steps to MSE ≤ {threshold:.4f}", "clean MSE", f"MSE, noise σ={main} (all)",
              "same, routing oracle", *[f"purity L{i + 1}" for i in range(study.depth)], f"flip L{study.depth}",
              "load std %", f"disp. ratio M⊙h L{study.depth}", f"disp. ratio h L{study.depth}"]
    noise_rows = [[a, where, *[fmt([r[f"noisy_{where}_{s:g}"] - r["clean"] for r in cells[a].values()], 4)
                               for s in study.noise_sigmas]] for where in NOISE_WHERE for a in arms]
    md = [f"{study.num_clusters} latent clusters over {study.id_features} identity features (each tight, σ="
          f"{study.sigma_tight}, on its own {study.tight_features}; σ={study.sigma_loose} elsewhere) plus a "
          f"{study.content_dim}-d content vector; target y = A_z c. Model: linear to d={study.dim}, "
          f"{study.depth} pre-LN residual MoE layers (E={study.num_experts}, k={study.k}, experts "
          f"d→{study.hidden}→d; AC from layer 2), linear head; load-balancing loss {study.aux_coef:g} for every "
          f"arm. Adam {study.lr:g} ({study.schedule}, "
          f"{study.warmup_steps} warm-up steps), batch {study.batch_size}, {study.steps} steps, "
          f"{study.n_train:,}/{study.n_test:,} train/test samples; mean ± std over {n_seeds} paired seeds. "
          f"Convergence threshold: {CONVERGENCE_FACTOR:g} × the stablemoe median final test MSE (evaluated every "
          f"{study.eval_every} steps). AC arms evaluate with their running statistics. Noise: Gaussian on the "
          f"identity features, averaged over {study.noise_draws} draws (the same draws for every arm); the "
          "routing oracle routes the noisy input with the metric the clean input's previous-layer routing "
          "selects. Purity: top-1 expert vs latent cluster; flip: share of tokens whose top-1 expert changes "
          "under the noise; dispersion ratio: within/between-cluster scatter of the router input at the last "
          "layer with and without the AC multiplier (equal for non-AC arms).\n", markdown_table(header, rows), "",
          "**Degradation under noise** (noisy − clean test MSE; `tight` = the clusters' own features, `loose` = "
          "the rest):\n",
          markdown_table(["arm", "features", *[f"σ={s:g}" for s in study.noise_sigmas]], noise_rows), ""]
    path = out / "figures" / "acmoe_synthetic_curves.png"
    steps = next(iter(cells["stablemoe"].values()))["curve_steps"]
    line_figure(path, steps, {a: [r["curve"] for r in cells[a].values()] for a in arms}, xlabel="step",
                ylabel="test MSE", title="Synthetic subspace clusters: convergence", logy=True)
    return Section("AC-MoE — synthetic subspace clusters", "\n".join(md) + "\n", [str(path.relative_to(out))],
                   {"threshold": threshold})
