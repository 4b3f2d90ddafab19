"""Fair contrastive learning at CPU scale: does weighting the negatives by the sensitive attribute remove it?

The LeNet encoder and head of CCLK are trained on ColorMNIST-5k with InfoNCE, Fair-InfoNCE (k-means, k = 10,
on the training colours ``c/255``), CCLK-cosine, FARE and SparseFARE (neighbours 0 and 1); the frozen encoder
of the **final** epoch is probed (linear digit accuracy, colour MSE in 0–255 units, R²). A seed fixes the
initialisation, data order, augmentations and LSH draws identically for every loss, and every loss gets the
same budget, so only the weights of the negatives differ. The untrained encoder each seed starts from is a
row too: random LeNet features are already a strong digit probe, and the paper's claims are about what
training adds.

Settings are chosen on a validation split (1,000 of the 4,000 training images, stratified by digit; the
test images are never looked at), in two stages, on seeds that are not the study's:

1. the training **regime** (learning rate and crop scale): the candidate whose InfoNCE encoder has the best
   validation digit accuracy (the regime that learns digits rather than colour);
2. FARE's and SparseFARE's temperature **ρ**: the candidate with the highest validation colour MSE among
   those within 2 accuracy points of InfoNCE's (the paper's claim is fairness at equal accuracy).

The study's cells then train on all 4,000 images and probe the 1,000 test images. Every cell goes through
:mod:`~clusterformers.experiments.grid` (hashed settings, two worker processes, resumable); the claims and
their verdicts are in :mod:`~clusterformers.experiments.fare_report`.

``clusterformers reproduce --paper fare [--quick] [--seeds N]`` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from clusterformers.bench.cost import cost_curve
from clusterformers.contrastive import (
    CCLKLoss,
    ContrastiveLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    KMeansDiscretizer,
    SparseFARELoss,
)
from clusterformers.data.colormnist import ColorMNIST, color_digits, color_mnist5k, eval_transform, train_transform
from clusterformers.data.images import stratified_split
from clusterformers.experiments.common import epoch_batch_fn
from clusterformers.experiments.grid import Cell, run_grid
from clusterformers.models.encoders import ContrastiveNet
from clusterformers.probes import linear_eval
from clusterformers.report import Section
from clusterformers.train import TrainConfig, resolve_device, train

log = logging.getLogger(__name__)

STUDY = "fare"
VERSION = 3  # bump when a change to the code changes what a cell computes
SENSITIVE_DIM = 3
DIAGNOSTIC_KEYS = ("spearman", "dist_ratio", "entropy", "eff_support")
LOGGED_STATS = (*DIAGNOSTIC_KEYS, "support", "empty_rows", "fallback_rows")
# the trained arms: arm -> (loss kind, constructor settings); "rho" is filled in from the validation stage
ARMS: dict[str, tuple[str, dict]] = {
    "info_nce": ("info_nce", {}),
    "fair_info_nce": ("fair_info_nce", {"k": 10}),
    "cclk": ("cclk", {"kernel": "cosine", "lam": 1e-2}),
    "fare": ("fare", {"score": "dot"}),
    "fare_rho4": ("fare", {"score": "dot", "rho": 4.0}),
    "sparse_fare": ("sparse_fare", {"score": "dot", "n_buckets": 4, "neighbours": 0}),
    "sparse_fare_nb1": ("sparse_fare", {"score": "dot", "n_buckets": 4, "neighbours": 1}),
}
TUNED_RHO = ("fare", "sparse_fare", "sparse_fare_nb1")  # arms whose ρ comes from the validation stage
RHO_FROM = {"fare": "fare", "sparse_fare": "sparse_fare", "sparse_fare_nb1": "sparse_fare"}
ACCURACY_MARGIN = 0.02  # "equal accuracy": within 2 points


@dataclass
class FareConfig:
    """The study. Every loss: τ = 0.1, b = 256, drop-last, Adam (weight decay 1e-6), cosine with warm-up.

    ``regimes`` maps a name to ``(lr, smallest crop area fraction)``; ``rhos`` are FARE's candidate
    temperatures. With one candidate a stage is skipped and that candidate is used.
    """

    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = tuple(range(8))
    tune_seeds: tuple[int, ...] = (1000, 1001, 1002)
    regimes: dict[str, tuple[float, float]] = dataclasses.field(default_factory=lambda: {
        "cclk-crops": (1e-3, 0.08), "mild-crops": (1e-3, 0.5), "mild-crops-small-step": (1e-4, 0.5)})
    rhos: tuple[float, ...] = (0.25, 1.0, 4.0)
    epochs: int = 30
    warmup_epochs: int = 3
    batch_size: int = 256
    weight_decay: float = 1e-6
    temperature: float = 0.1
    probe_steps: int = 500
    val_size: int = 1000
    dataset: str = "colormnist5k"  # or "digits": the sklearn 8×8 fixture (tests)
    cost_batches: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    cost_losses: tuple[str, ...] = ("cclk", "fare", "sparse_fare")
    cost_attributes: tuple[str, ...] = ("gaussian", "colormnist")
    cost_reps: int | None = None
    cost_threads: int = 2
    cost_timeout_s: float = 120.0
    workers: int = 2
    device: str = "auto"
    data_path: str | None = None
    text_path: str | None = None

    def __post_init__(self) -> None:
        unknown = [k for k in self.arms if k not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown {unknown}, expected a subset of {tuple(ARMS)}")
        if "info_nce" not in self.arms:
            raise ValueError("arms must include 'info_nce' (every claim is against it)")
        if self.dataset not in ("colormnist5k", "digits"):
            raise ValueError(f"dataset must be 'colormnist5k' or 'digits', got {self.dataset!r}")
        if not self.regimes or not self.rhos:
            raise ValueError("regimes and rhos need at least one candidate each")
        bad_attr = [a for a in self.cost_attributes if a not in ("gaussian", "colormnist")]
        if bad_attr:
            raise ValueError(f"cost_attributes: unknown {bad_attr}, expected 'gaussian' or 'colormnist'")

    @classmethod
    def full(cls, seeds: int = 8) -> FareConfig:
        """The powered study: 8 paired seeds, 30 epochs (450 steps), both validation stages (3 seeds each)."""
        return cls(seeds=tuple(range(seeds)))

    @classmethod
    def quick(cls, seeds: int = 2) -> FareConfig:
        """The smoke run (≈ 2 min on 2 cores): 6 epochs, a 100-step probe, no validation stages (mild crops,
        lr 1e-3, ρ = 0.25), no SparseFARE with neighbours, a cost curve up to b = 2,048."""
        return cls(
            arms=("info_nce", "fair_info_nce", "cclk", "fare", "sparse_fare"),
            seeds=tuple(range(seeds)),
            regimes={"mild-crops": (1e-3, 0.5)},
            rhos=(0.25,),
            epochs=6,
            warmup_epochs=1,
            probe_steps=100,
            cost_batches=(256, 512, 1024, 2048),
            cost_attributes=("gaussian",),
            cost_reps=3,
        )

    def base_settings(self, split: str, regime: str) -> dict:
        """What every trained cell depends on besides its loss."""
        lr, crop_min = self.regimes[regime]
        return {"version": VERSION, "split": split, "val_size": self.val_size, "dataset": self.dataset,
                "data_path": self.data_path, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs,
                "batch_size": self.batch_size, "lr": lr, "crop_min": crop_min, "weight_decay": self.weight_decay,
                "temperature": self.temperature, "probe_steps": self.probe_steps, "device": self.device}


# --------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, data_path: str | None, split: str, val_size: int) -> tuple[ColorMNIST, ColorMNIST]:
    """``(train, eval)``. ``split="test"``: the training images and the test images. ``split="val"``: a
    stratified split of the training images (``val_size`` of them, every digit in proportion) into the rest
    and the validation images. The training images come sorted by digit, so a plain cut would not do."""
    train_set, test_set = color_mnist5k(data_path) if dataset == "colormnist5k" else color_digits()
    if split == "test":
        return train_set, test_set
    if split != "val":
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    n = len(train_set)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must lie in 1..{n - 1} (the training images), got {val_size}")
    rest, val = stratified_split(train_set.labels.numpy(), val_size, seed=1)
    return train_set.subset(rest), train_set.subset(val)


def make_batch_fn(
    train_set: ColorMNIST, batch_size: int, seed: int, crop_min: float = 0.08
) -> tuple[Callable[[int, int, int], tuple[Tensor, Tensor, Tensor, int]], int]:
    """``batch_fn(step, rank, world) -> (view1 [B,3,32,32], view2, sensitive [B,3], step)`` and steps/epoch.

    Data order and augmentations (crops of area fraction ``crop_min``–1, flips) are functions of
    ``(seed, step)`` only, so every loss sees bitwise the same batches for the same seed, and a resumed run
    the same as an uninterrupted one. Each rank gets every ``world``-th sample of the global batch.
    """
    base, steps_per_epoch = epoch_batch_fn((train_set.images, train_set.sensitive), batch_size, seed)

    def batch_fn(step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor, Tensor, int]:
        images, sensitive = base(step, 0, 1)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        view1 = train_transform(images, scale=(crop_min, 1.0), generator=gen)
        view2 = train_transform(images, scale=(crop_min, 1.0), generator=gen)
        share = slice(rank, None, world)
        return view1[share], view2[share], sensitive[share], step

    return batch_fn, steps_per_epoch


def build_loss(kind: str, options: dict, temperature: float, train_set: ColorMNIST) -> ContrastiveLoss:
    """A loss module (diagnostics on every ``return_stats=True`` call; the training loop asks once per
    logged step). Fair-InfoNCE's ``k`` is the k-means discretiser fitted on the training ``c/255``."""
    common = {"temperature": temperature, "log_every": 1}
    if kind == "info_nce":
        return InfoNCELoss(**common)
    if kind == "fair_info_nce":
        disc = KMeansDiscretizer(k=int(options["k"]), seed=0).fit(train_set.sensitive)
        return FairInfoNCELoss(discretizer=disc, **common)
    if kind == "cclk":
        return CCLKLoss(**common, **options)
    if kind == "fare":
        return FARELoss(SENSITIVE_DIM, **common, **options)
    if kind == "sparse_fare":
        return SparseFARELoss(SENSITIVE_DIM, **common, **options)
    raise ValueError(f"kind must be one of info_nce, fair_info_nce, cclk, fare, sparse_fare, got {kind!r}")


# --------------------------------------------------------------------------------------------- cells


def run_cell(cell: Cell, cell_dir: Path) -> dict:
    """One cell: the untrained encoder's probes (``kind == "init"``), the cost curve (``kind == "cost"``),
    or a loss trained to the final epoch and probed. A JSON-able dict with per-item probe values."""
    s = cell.settings
    if s["kind"] == "cost":
        return {"rows": run_cost(s, resolve_device(s["device"]))}
    device = resolve_device(s["device"])
    train_set, eval_set = load_data(s["dataset"], s["data_path"], s["split"], s["val_size"])
    if s["kind"] == "init":
        torch.manual_seed(cell.seed)
        return probe(ContrastiveNet().to(device), train_set, eval_set, s["probe_steps"])
    torch.manual_seed(cell.seed)  # the same encoder and head for every loss; the loss's own W_Q, W_K come next
    model = ContrastiveNet()
    loss_mod = build_loss(s["kind"], s["options"], s["temperature"], train_set).to(device)
    batch_fn, steps_per_epoch = make_batch_fn(train_set, s["batch_size"], cell.seed, s["crop_min"])
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
        steps=s["epochs"] * steps_per_epoch,
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        warmup_steps=min(s["warmup_epochs"], s["epochs"]) * steps_per_epoch,
        schedule="cosine",
        optimizer="adam",
        grad_clip=0.0,
        log_every=steps_per_epoch,
        ckpt_every=5 * steps_per_epoch,
        seed=cell.seed,
        device=str(device),
        progress=False,
        name=f"{STUDY}/{cell.arm}/seed{cell.seed}",
    )
    extra = {"cell": {"arm": cell.arm, "seed": cell.seed, "settings": s}, "loss_module": repr(loss_mod)}
    result = train(model, loss_fn, batch_fn, tcfg, out_dir=cell_dir, resume=(cell_dir / "state.json").exists(),
                   extra_params=list(loss_mod.parameters()), extra_config=extra)
    history = result.history
    last = history[-1] if history else {}
    return {
        **probe(model, train_set, eval_set, s["probe_steps"]),
        "final_loss": last.get("loss"),
        "steps": result.step,
        "d12": {k: last[k] for k in LOGGED_STATS if k in last},
        "curve": {k: [row.get(k) for row in history] for k in ("step", "loss", *DIAGNOSTIC_KEYS)
                  if any(k in row for row in history)},
    }


def probe(model: ContrastiveNet, train_set: ColorMNIST, eval_set: ColorMNIST, steps: int) -> dict:
    """Linear probes of the frozen encoder: ``accuracy``, ``mse``, ``r2``, the eval colour variance, and
    per-item ``items["correct"]`` and ``items["sq_error"]``."""
    probes = linear_eval(
        model.encoder,
        (train_set.images, train_set.labels, train_set.colors),
        (eval_set.images, eval_set.labels, eval_set.colors),
        transform=eval_transform,
        steps=steps,
        return_items=True,
    )
    colors = eval_set.colors.double()
    return {**probes, "color_var": float(((colors - colors.mean(0)) ** 2).mean())}


def run_cost(settings: dict, device: torch.device) -> list[dict]:
    """Cost rows (``cost_curve``'s, plus ``attribute``) with ``torch`` threads fixed at ``threads``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        rows = []
        for attribute in settings["attributes"]:
            sampler = None
            if attribute == "colormnist":
                pool = load_data(settings["dataset"], settings["data_path"], "test", 1)[0].sensitive

                def sampler(b: int, pool: Tensor = pool) -> Tensor:
                    gen = torch.Generator().manual_seed(b)
                    return pool[torch.randint(pool.shape[0], (b,), generator=gen)]

            curve = cost_curve(settings["batches"], settings["losses"], device, settings["reps"], sensitive=sampler,
                               timeout_s=settings["timeout_s"])
            rows += [{**row, "attribute": attribute, "threads": settings["threads"]} for row in curve]
        return rows
    finally:
        torch.set_num_threads(threads)


def trained_cell(cfg: FareConfig, arm: str, seed: int, split: str, regime: str, rho: float | None = None,
                 name: str | None = None) -> Cell:
    kind, options = ARMS[arm]
    options = {**options, **({"rho": rho} if rho is not None else {})}
    settings = {**cfg.base_settings(split, regime), "kind": kind, "options": options}
    return Cell(STUDY, name or arm, seed, settings)


def init_cell(cfg: FareConfig, seed: int, split: str) -> Cell:
    return Cell(STUDY, "init", seed, {"version": VERSION, "kind": "init", "split": split, "val_size": cfg.val_size,
                                      "dataset": cfg.dataset, "data_path": cfg.data_path,
                                      "probe_steps": cfg.probe_steps, "device": cfg.device})


# --------------------------------------------------------------------------------------------- selection


def choose_regime(cfg: FareConfig, out: Path) -> tuple[str, dict]:
    """The regime whose InfoNCE encoder has the best mean validation accuracy; ``(name, table)``."""
    if len(cfg.regimes) == 1:
        return next(iter(cfg.regimes)), {}
    cells = {name: [trained_cell(cfg, "info_nce", s, "val", name, name=f"val-regime-{name}") for s in cfg.tune_seeds]
             for name in cfg.regimes}
    done = run_grid([c for cs in cells.values() for c in cs], run_cell, out, workers=cfg.workers,
                    desc="fare: regime (validation)")
    table = {name: _summary([done[c] for c in cs]) for name, cs in cells.items()}
    best = max(table, key=lambda name: table[name]["accuracy"])
    return best, table


def choose_rho(cfg: FareConfig, regime: str, out: Path) -> tuple[dict[str, float], dict]:
    """Per tuned loss, the ρ with the highest validation colour MSE among those within 2 accuracy points of
    InfoNCE's (else the most accurate one); ``({loss: rho}, table)``."""
    losses = sorted({RHO_FROM[a] for a in cfg.arms if a in TUNED_RHO})
    if len(cfg.rhos) == 1 or not losses:
        return {loss: cfg.rhos[0] for loss in losses}, {}
    base = [trained_cell(cfg, "info_nce", s, "val", regime, name=f"val-regime-{regime}") for s in cfg.tune_seeds]
    cells = {(loss, rho): [trained_cell(cfg, loss, s, "val", regime, rho, name=f"val-{loss}-rho{rho:g}")
                           for s in cfg.tune_seeds] for loss in losses for rho in cfg.rhos}
    done = run_grid([*base, *(c for cs in cells.values() for c in cs)], run_cell, out, workers=cfg.workers,
                    desc="fare: rho (validation)")
    reference = _summary([done[c] for c in base])
    table = {"info_nce": reference, **{f"{loss} rho={rho:g}": _summary([done[c] for c in cs])
                                       for (loss, rho), cs in cells.items()}}
    chosen = {}
    for loss in losses:
        rows = {rho: table[f"{loss} rho={rho:g}"] for rho in cfg.rhos}
        fair = [rho for rho, r in rows.items() if r["accuracy"] >= reference["accuracy"] - ACCURACY_MARGIN]
        chosen[loss] = (max(fair, key=lambda rho: rows[rho]["mse"]) if fair
                        else max(rows, key=lambda rho: rows[rho]["accuracy"]))
    return chosen, table


def _summary(results: list[dict]) -> dict:
    return {k: statistics.fmean(r[k] for r in results) for k in ("accuracy", "mse")} | {"seeds": len(results)}


# --------------------------------------------------------------------------------------------- study


def run(cfg: FareConfig, out: Path) -> list[Section]:
    """Choose the settings on the validation split, train every arm on the paired seeds, measure the cost
    (resumable: finished cells are reused); the report sections."""
    from clusterformers.experiments.fare_report import fare_sections

    regime, regime_table = choose_regime(cfg, out)
    rho, rho_table = choose_rho(cfg, regime, out)
    arms = {"init": [init_cell(cfg, s, "test") for s in cfg.seeds]}
    for arm in cfg.arms:
        tuned = rho[RHO_FROM[arm]] if arm in TUNED_RHO else None
        if arm == "fare_rho4" and rho.get("fare") == 4.0:
            continue  # the old default was chosen: this ablation is the FARE arm itself
        arms[arm] = [trained_cell(cfg, arm, s, "test", regime, tuned) for s in cfg.seeds]
    cost = Cell(STUDY, "cost", 0, {"version": VERSION, "kind": "cost", "batches": list(cfg.cost_batches),
                                   "losses": list(cfg.cost_losses), "attributes": list(cfg.cost_attributes),
                                   "reps": cfg.cost_reps, "threads": cfg.cost_threads, "timeout_s": cfg.cost_timeout_s,
                                   "dataset": cfg.dataset, "data_path": cfg.data_path, "device": cfg.device})
    done = run_grid([c for cs in arms.values() for c in cs], run_cell, out, workers=cfg.workers,
                    desc="fare: study (test)")
    cost_rows = run_grid([cost], run_cell, out, workers=1, desc="fare: cost")[cost]["rows"]
    results = {arm: {c.seed: done[c] for c in cs} for arm, cs in arms.items()}
    selection = {"regime": regime, "regime_table": regime_table, "rho": rho, "rho_table": rho_table}
    return fare_sections(cfg, results, selection, cost_rows, out)


def make_config(
    *, quick: bool, seeds: int | None = None, device: str = "auto", data_path: str | None = None,
    text_path: str | None = None, workers: int = 2,
) -> FareConfig:
    """The study's configuration: quick (the smoke run) or full, with ``seeds`` paired seeds."""
    cfg = FareConfig.quick(seeds or 2) if quick else FareConfig.full(seeds or 8)
    cfg.device, cfg.data_path, cfg.text_path, cfg.workers = device, data_path, text_path, workers
    return cfg
