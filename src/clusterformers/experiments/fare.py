"""Fair contrastive learning at CPU scale (the studies of ``docs/fare.md``): three report sections.

- **Five losses**: the LeNet encoder and head of CCLK trained on ColorMNIST-5k with each of InfoNCE,
  Fair-InfoNCE (k-means, k = 10, on the training colours ``c/255``), CCLK-cosine, FARE and SparseFARE
  (neighbours 0 and 1). A seed fixes the initialisation, the data order, the augmentations and the LSH
  draws identically for every loss, and every loss gets the same budget, so only the weights of the
  negatives differ. The frozen encoder of the **final** epoch is probed: linear digit accuracy, colour MSE
  (0–255 units) and R².
- **Trade-off**: the fairness/accuracy plane (and, in full mode, knob sweeps of each fair loss).
- **Cost**: loss-only time and peak memory against the batch size (``contrastive.cost.cost_curve``).

Every (loss, seed) cell is cached in ``<out>/fare/e1-<hash>/<loss>/seed<s>/result.json`` next to its
training checkpoint, so a killed study resumes; the hash covers the training settings, so quick and full
runs never reuse each other's cells. The attention diagnostics of the losses that have them (does the
weighting of the negatives follow the protected attribute?) go into each cell's ``metrics.csv``. The
report (``fare_report``) sets the results beside the paper's Table 1 and decides from the numbers which
of its orderings reproduce.

``clusterformers reproduce --paper fare [--quick] [--seeds N]`` calls :func:`make_config` and :func:`run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from clusterformers.contrastive import (
    CCLKLoss,
    ContrastiveLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    KMeansDiscretizer,
    SparseFARELoss,
)
from clusterformers.contrastive.cost import cost_curve
from clusterformers.data.colormnist import ColorMNIST, color_digits, color_mnist5k, eval_transform, train_transform
from clusterformers.experiments.common import cached, epoch_batch_fn
from clusterformers.models.encoders import ContrastiveNet
from clusterformers.probes import linear_eval
from clusterformers.report import Section
from clusterformers.train import TrainConfig, resolve_device, train

log = logging.getLogger(__name__)

# the trained losses: key -> (loss kind, constructor overrides)
LOSS_VARIANTS: dict[str, tuple[str, dict]] = {
    "info_nce": ("info_nce", {}),
    "fair_info_nce": ("fair_info_nce", {}),
    "cclk": ("cclk", {}),
    "fare": ("fare", {}),
    "sparse_fare": ("sparse_fare", {}),
    "sparse_fare_nb1": ("sparse_fare", {"neighbours": 1}),
}
FAIR_LOSSES = ("fair_info_nce", "cclk", "fare", "sparse_fare", "sparse_fare_nb1")
# knob sweeps (full mode): kind -> (constructor argument, values, the default of the five-loss cells)
SWEEPS: dict[str, tuple[str, tuple[float, ...], float]] = {
    "fair_info_nce": ("k", (2, 5, 10, 20), 10),
    "cclk": ("lam", (1e-3, 1e-2, 0.1, 1.0), 1e-2),
    "fare": ("rho", (0.25, 1.0, 4.0), 4.0),
    "sparse_fare": ("n_buckets", (2, 4, 8, 16), 4),
}
DIAGNOSTIC_KEYS = ("spearman", "dist_ratio", "entropy", "eff_support")
LOGGED_STATS = (*DIAGNOSTIC_KEYS, "support", "empty_rows", "fallback_rows")
SENSITIVE_DIM = 3


@dataclass
class FareConfig:
    """The study. Training: τ = 0.1, b = 256, drop-last, Adam lr 1e-3 wd 1e-6, cosine with warm-up, the same
    for every loss; ``epochs`` is what fits the time budget (see :meth:`full`)."""

    losses: tuple[str, ...] = tuple(LOSS_VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 200
    warmup_epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.1
    probe_steps: int = 500
    dataset: str = "colormnist5k"  # or "digits": the sklearn 8×8 fixture (tests)
    train_subset: int | None = None
    ckpt_every_epochs: int = 10
    sweeps: bool = False
    sweep_seeds: int = 3
    cost_batches: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    cost_losses: tuple[str, ...] = ("cclk", "fare", "sparse_fare")
    cost_attributes: tuple[str, ...] = ("gaussian", "colormnist")
    cost_reps: int | None = None
    cost_threads: int = 2
    cost_timeout_s: float = 120.0
    device: str = "auto"
    data_path: str | None = None
    text_path: str | None = None

    def __post_init__(self) -> None:
        unknown = [k for k in self.losses if k not in LOSS_VARIANTS]
        if unknown:
            raise ValueError(f"losses: unknown {unknown}, expected a subset of {tuple(LOSS_VARIANTS)}")
        if self.dataset not in ("colormnist5k", "digits"):
            raise ValueError(f"dataset must be 'colormnist5k' or 'digits', got {self.dataset!r}")
        bad_attr = [a for a in self.cost_attributes if a not in ("gaussian", "colormnist")]
        if bad_attr:
            raise ValueError(f"cost_attributes: unknown {bad_attr}, expected 'gaussian' or 'colormnist'")

    @classmethod
    def full(cls, seeds: int = 5) -> FareConfig:
        """The full study: ≥ 5 seeds, 200 epochs (3,000 steps of two views of 256 images). Measured 70–100 ms
        per step on 2 cores (LeNet), so a run takes ≈ 3.6–5 min with its probes, within a 5-minute budget per run.
        Knob sweeps on (3 seeds each). The whole study is ≈ 4–5 h on 2 cores."""
        return cls(seeds=tuple(range(seeds)), sweeps=True)

    @classmethod
    def quick(cls, seeds: int = 2) -> FareConfig:
        """The demo (≈ 2–2.5 min on 2 idle cores): five losses (no SparseFARE neighbours = 1), 6 epochs, a
        100-step digit probe, a cost curve up to b = 2,048."""
        return cls(
            losses=("info_nce", "fair_info_nce", "cclk", "fare", "sparse_fare"),
            seeds=tuple(range(seeds)),
            epochs=6,
            warmup_epochs=1,
            probe_steps=100,
            ckpt_every_epochs=0,
            cost_batches=(256, 512, 1024, 2048),
            cost_attributes=("gaussian",),
            cost_reps=3,
        )

    def train_settings(self) -> dict:
        """The settings a trained cell depends on (hashed into its directory)."""
        keep = ("epochs", "warmup_epochs", "batch_size", "lr", "weight_decay", "temperature", "probe_steps",
                "dataset", "train_subset", "data_path")
        return {k: getattr(self, k) for k in keep}


def _hashed(root: Path, name: str, settings: dict) -> Path:
    key = json.dumps(settings, sort_keys=True, default=str)
    return root / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------------------------- data


def load_data(cfg: FareConfig) -> tuple[ColorMNIST, ColorMNIST]:
    """``(train, test)``: ColorMNIST-5k (4,000/1,000) or the digits fixture; ``train_subset`` keeps the first
    that many training images (the stratified split is already shuffled)."""
    train_set, test_set = color_mnist5k(cfg.data_path) if cfg.dataset == "colormnist5k" else color_digits()
    if cfg.train_subset is not None:
        train_set = train_set.subset(torch.arange(min(cfg.train_subset, len(train_set))))
    return train_set, test_set


def make_batch_fn(
    train_set: ColorMNIST, batch_size: int, seed: int
) -> tuple[Callable[[int, int, int], tuple[Tensor, Tensor, Tensor, int]], int]:
    """``batch_fn(step, rank, world) -> (view1 [B,3,32,32], view2, sensitive [B,3], step)`` and steps/epoch.

    Data order and augmentations are functions of ``(seed, step)`` only, so every loss sees bitwise the
    same batches for the same seed, and a resumed run the same as an uninterrupted one. Each rank gets
    every ``world``-th sample of the global batch.
    """
    base, steps_per_epoch = epoch_batch_fn((train_set.images, train_set.sensitive), batch_size, seed)

    def batch_fn(step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor, Tensor, int]:
        images, sensitive = base(step, 0, 1)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        view1 = train_transform(images, generator=gen)
        view2 = train_transform(images, generator=gen)
        share = slice(rank, None, world)
        return view1[share], view2[share], sensitive[share], step

    return batch_fn, steps_per_epoch


# --------------------------------------------------------------------------------------------- losses


def variants(cfg: FareConfig) -> dict[str, tuple[str, dict]]:
    """Every trained variant: the five-loss cells, then (with ``sweeps``) the knob sweeps. A sweep point at
    a loss's default is that loss's cell itself."""
    out = {key: LOSS_VARIANTS[key] for key in cfg.losses}
    if cfg.sweeps:
        for key, (kind, overrides) in sweep_points().items():
            out.setdefault(key, (kind, overrides))
    return out


def sweep_points() -> dict[str, tuple[str, dict]]:
    """``{key: (kind, overrides)}`` of the knob sweeps; the default value maps to the loss's own key."""
    out = {}
    for kind, (knob, values, default) in SWEEPS.items():
        for value in values:
            key = kind if value == default else f"{kind}_{knob}{value:g}"
            out[key] = (kind, {knob: value})
    return out


def build_loss(kind: str, overrides: dict, cfg: FareConfig, train_set: ColorMNIST) -> ContrastiveLoss:
    """A loss module (diagnostics on every ``return_stats=True`` call; the training loop asks once per
    logged step). Fair-InfoNCE's ``k`` is the k-means discretiser fitted on the training ``c/255``."""
    common = {"temperature": cfg.temperature, "log_every": 1}
    if kind == "info_nce":
        return InfoNCELoss(**common)
    if kind == "fair_info_nce":
        disc = KMeansDiscretizer(k=int(overrides.get("k", 10)), seed=0).fit(train_set.sensitive)
        return FairInfoNCELoss(discretizer=disc, **common)
    if kind == "cclk":
        return CCLKLoss(kernel="cosine", **{**common, **overrides})
    if kind == "fare":
        return FARELoss(SENSITIVE_DIM, **{**common, **overrides})
    if kind == "sparse_fare":
        return SparseFARELoss(SENSITIVE_DIM, **{"n_buckets": 4, **common, **overrides})
    raise ValueError(f"kind must be one of info_nce, fair_info_nce, cclk, fare, sparse_fare, got {kind!r}")


# --------------------------------------------------------------------------------------------- one cell


def run_cell(
    cfg: FareConfig,
    key: str,
    seed: int,
    run_dir: Path,
    device: torch.device,
    data: tuple[ColorMNIST, ColorMNIST],
    spec: tuple[str, dict] | None = None,
) -> dict:
    """Train one (variant, seed) cell to the final epoch and probe its frozen encoder; a JSON-able dict."""
    kind, overrides = spec if spec is not None else LOSS_VARIANTS[key]
    train_set = data[0]
    torch.manual_seed(seed)  # the same encoder and head for every loss; the loss's own W_Q, W_K come next
    model = ContrastiveNet()
    loss_mod = build_loss(kind, overrides, cfg, train_set).to(device)
    batch_fn, steps_per_epoch = make_batch_fn(train_set, cfg.batch_size, seed)
    logged: dict[str, float] = {}

    def loss_fn(net: torch.nn.Module, batch: tuple) -> tuple[Tensor, dict[str, float]]:
        view1, view2, sensitive, step = batch
        _, z = net(torch.cat([view1, view2]))
        z1, z2 = z.chunk(2)
        # Stats (and the attention diagnostics) once per logged row, at its first step; held over the row so
        # the row mean is them.
        if logged and step % steps_per_epoch:
            return loss_mod(z1, z2, sensitive), dict(logged)
        loss, stats = loss_mod(z1, z2, sensitive, return_stats=True)
        logged.clear()
        logged.update({k: float(stats[k]) for k in LOGGED_STATS if k in stats})
        return loss, dict(logged)

    tcfg = TrainConfig(
        steps=cfg.epochs * steps_per_epoch,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch,
        schedule="cosine",
        optimizer="adam",
        grad_clip=0.0,
        log_every=steps_per_epoch,
        ckpt_every=cfg.ckpt_every_epochs * steps_per_epoch,
        seed=seed,
        device=str(device),
        progress=False,
        name=f"fare/{key}/seed{seed}",
    )
    extra = {"study": dataclasses.asdict(cfg), "variant": key, "loss": kind, "overrides": overrides,
             "seed": seed, "loss_module": repr(loss_mod)}
    result = train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, resume=(run_dir / "state.json").exists(),
                   extra_params=list(loss_mod.parameters()), extra_config=extra)
    history = result.history
    last = history[-1] if history else {}
    return {
        **probe_cell(cfg, model, data),
        "final_loss": last.get("loss"),
        "steps": result.step,
        "wall_s": result.wall_time,
        "d12": {k: last[k] for k in LOGGED_STATS if k in last},
        "curve": {k: [row.get(k) for row in history] for k in ("step", "loss", *DIAGNOSTIC_KEYS)
                  if any(k in row for row in history)},
    }


def probe_cell(cfg: FareConfig, model: ContrastiveNet, data: tuple[ColorMNIST, ColorMNIST]) -> dict[str, float]:
    """Linear probes of the frozen encoder: ``accuracy``, ``mse``, ``r2`` and the test colour variance."""
    train_set, test_set = data
    probes = linear_eval(
        model.encoder,
        (train_set.images, train_set.labels, train_set.colors),
        (test_set.images, test_set.labels, test_set.colors),
        transform=eval_transform,
        steps=cfg.probe_steps,
    )
    colors = test_set.colors.double()
    return {**probes, "color_var": float(((colors - colors.mean(0)) ** 2).mean())}


def run_init_cell(cfg: FareConfig, seed: int, device: torch.device, data: tuple[ColorMNIST, ColorMNIST]) -> dict:
    """Probes of the untrained encoder every loss starts from for ``seed`` (the reference "epoch 0")."""
    torch.manual_seed(seed)
    return probe_cell(cfg, ContrastiveNet().to(device), data)


# --------------------------------------------------------------------------------------------- cost


def run_cost(cfg: FareConfig, device: torch.device, train_set: ColorMNIST | None) -> list[dict]:
    """Cost rows (``cost_curve``'s, plus ``attribute``) with ``torch`` threads fixed at ``cost_threads``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cost_threads)
    try:
        rows = []
        for attribute in cfg.cost_attributes:
            sampler = None
            if attribute == "colormnist":
                if train_set is None:
                    raise ValueError("cost_attributes 'colormnist' needs the training colours")
                pool = train_set.sensitive

                def sampler(b: int, pool: Tensor = pool) -> Tensor:
                    gen = torch.Generator().manual_seed(b)
                    return pool[torch.randint(pool.shape[0], (b,), generator=gen)]

            curve = cost_curve(cfg.cost_batches, cfg.cost_losses, device, cfg.cost_reps, sensitive=sampler,
                               timeout_s=cfg.cost_timeout_s)
            rows += [{**row, "attribute": attribute, "threads": cfg.cost_threads} for row in curve]
        return rows
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- study


def run(cfg: FareConfig, out: Path) -> list[Section]:
    """Train the five losses (+ the knob sweeps in full mode) and measure their cost (resumable: finished
    cells are reused); the report sections."""
    from clusterformers.experiments.fare_report import fare_sections

    device = resolve_device(cfg.device)
    root = out / "fare"
    cells_dir = _hashed(root, "e1", cfg.train_settings())
    data: list[tuple[ColorMNIST, ColorMNIST]] = []

    def get_data() -> tuple[ColorMNIST, ColorMNIST]:
        if not data:
            data.append(load_data(cfg))
        return data[0]

    def cell(key: str, spec: tuple[str, dict], seed: int) -> dict:
        cell_dir = cells_dir / key / f"seed{seed}"
        return cached(cell_dir / "result.json",
                      lambda: run_cell(cfg, key, seed, cell_dir, device, get_data(), spec))

    init = [cached(cells_dir / "init" / f"seed{s}" / "result.json",
                   lambda s=s: run_init_cell(cfg, s, device, get_data()))
            for s in cfg.seeds]
    all_variants = variants(cfg)
    cells = {key: [cell(key, all_variants[key], s) for s in cfg.seeds] for key in cfg.losses}
    sweeps: dict[str, list[dict]] = {}
    if cfg.sweeps:
        sweep_seeds = cfg.seeds[: cfg.sweep_seeds]
        for key in sweep_points():
            sweeps[key] = (cells[key][: len(sweep_seeds)] if key in cells
                           else [cell(key, all_variants[key], s) for s in sweep_seeds])
    cost_settings = {k: getattr(cfg, k) for k in ("cost_batches", "cost_losses", "cost_attributes", "cost_reps",
                                                  "cost_threads", "cost_timeout_s", "data_path", "dataset")}
    cost_settings["device"] = str(device)
    needs_colours = "colormnist" in cfg.cost_attributes
    cost = cached(_hashed(root, "e4", cost_settings) / "cost.json",
                  lambda: {"rows": run_cost(cfg, device, get_data()[0] if needs_colours else None)})
    return fare_sections(cfg, cells, init, sweeps, cost["rows"], out)


def make_config(
    *, quick: bool, seeds: int | None = None, device: str = "auto", data_path: str | None = None,
    text_path: str | None = None,
) -> FareConfig:
    """The study's configuration: quick (the demo) or full, with ``seeds`` paired seeds."""
    cfg = FareConfig.quick(seeds or 2) if quick else FareConfig.full(seeds or 5)
    cfg.device, cfg.data_path, cfg.text_path = device, data_path, text_path
    return cfg
