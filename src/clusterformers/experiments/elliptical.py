"""Elliptical Attention at CPU scale: is attention with the estimated metric more robust, at equal accuracy?

(a) A ViT on MNIST-5k (4,000/1,000), softmax vs elliptical on paired seeds, with the temperature-matched
isotropic control on a subset of them. Every model is evaluated on all test images: clean, Gaussian noise,
PGD over an ε grid with the gradient through the metric (and, for elliptical, with it detached, as the
reference code does), SPSA (gradient-free) on a subset, and the token cosine per layer (representation
collapse). (b) A word-level causal LM on the Wikipedia sample: clean next-token loss and the loss under word
swap. Every arm shares the seeds, the data order and the hyper-parameters; only the attention metric differs.

Every cell goes through :mod:`~clusterformers.experiments.grid` (settings hashed into its directory, two
worker processes, resumable); per-item results (images, text windows) feed the intervals of
:mod:`~clusterformers.experiments.claims`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformers.attention import set_metric_grad
from clusterformers.data.augment import random_translate
from clusterformers.data.images import mnist5k_split
from clusterformers.data.text import TokenCorpus, build_corpus, random_windows, word_swap
from clusterformers.experiments.claims import Claim, compact, decide, verdict_json, verdict_table, without_items
from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.experiments.grid import Cell, run_grid
from clusterformers.metrics import collect_token_cosine
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.models.vit import ViT, ViTConfig
from clusterformers.report import Section, fmt, line_figure, markdown_table
from clusterformers.robust.attacks import correct_mask, pgd, spsa
from clusterformers.robust.corruptions import gaussian_noise
from clusterformers.train import TrainConfig, resolve_device, train

log = logging.getLogger(__name__)

STUDY = "elliptical"
VERSION = 2  # bump when a change to the code changes what a cell computes
# arm -> (attention, estimator)
VARIANTS = {
    "softmax": ("softmax", "mean"),
    "elliptical": ("elliptical", "mean"),
    "isotropic": ("elliptical", "isotropic"),
}


@dataclass
class VitStudy:
    """ViT on MNIST-5k. ``control_seeds``: how many of the seeds also train the isotropic control."""

    arms: tuple[str, ...] = ("softmax", "elliptical", "isotropic")
    control_seeds: int = 4
    patch_size: int = 7
    depth: int = 6
    dim: int = 64
    num_heads: int = 4
    epochs: int = 80
    shift: int = 2  # random translation of up to this many pixels (training only)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    eval_images: int = 1000
    noise_sigmas: tuple[float, ...] = (0.1, 0.2)
    attack_eps: tuple[int, ...] = (1, 2, 4, 8)  # in 1/255 units
    pgd_steps: int = 10
    spsa_images: int = 200
    spsa_eps: int = 4
    spsa_iters: int = 20
    spsa_samples: int = 64


@dataclass
class LmStudy:
    """Word-level causal LM on the Wikipedia sample."""

    arms: tuple[str, ...] = ("softmax", "elliptical")
    seeds: int = 5
    depth: int = 3
    dim: int = 64
    num_heads: int = 4
    context: int = 64
    dropout: float = 0.1
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    max_vocab: int = 5000
    max_chars: int | None = None
    swap_fractions: tuple[float, ...] = (0.015, 0.05)
    eval_tokens: int | None = 40_000


@dataclass
class EllipticalConfig:
    vit: VitStudy = field(default_factory=VitStudy)
    lm: LmStudy = field(default_factory=LmStudy)
    seeds: tuple[int, ...] = tuple(range(10))
    workers: int = 2
    device: str = "auto"
    data_path: str | None = None
    text_path: str | None = None

    def __post_init__(self) -> None:
        for study in (self.vit, self.lm):
            unknown = [a for a in study.arms if a not in VARIANTS]
            if unknown or "softmax" not in study.arms:
                raise ValueError(f"arms must include 'softmax' and come from {tuple(VARIANTS)}, got {study.arms}")

    @classmethod
    def full(cls, seeds: int = 10) -> EllipticalConfig:
        """The powered study: 10 paired ViT seeds (isotropic on 4), 5 LM seeds."""
        return cls(seeds=tuple(range(seeds)))

    @classmethod
    def quick(cls, seeds: int = 2) -> EllipticalConfig:
        """The smoke run (≈ 3 min on 2 cores): a shallower ViT for 6 epochs, a small LM for 250 steps."""
        vit = VitStudy(arms=("softmax", "elliptical"), depth=4, epochs=6, batch_size=64, lr=2e-3, eval_images=500,
                       attack_eps=(2, 8), pgd_steps=5, spsa_images=100, spsa_iters=10, spsa_samples=32)
        lm = LmStudy(seeds=seeds, steps=250, batch_size=16, max_vocab=5000, max_chars=1_500_000,
                     eval_tokens=30_000)
        return cls(vit, lm, seeds=tuple(range(seeds)))

    def cells(self) -> list[Cell]:
        """Every cell of the study, interleaved so that both workers stay busy to the end."""
        common = {"version": VERSION, "device": self.device}
        vit = {**common, "model": "vit", "study": asdict(self.vit), "data_path": self.data_path}
        lm = {**common, "model": "lm", "study": asdict(self.lm), "text_path": self.text_path}
        out = []
        for i, seed in enumerate(self.seeds):
            for arm in self.vit.arms:
                if arm == "isotropic" and i >= self.vit.control_seeds:
                    continue
                out.append(Cell(STUDY, f"vit-{arm}", seed, vit))
            if i < self.lm.seeds:
                out += [Cell(STUDY, f"lm-{arm}", seed, lm) for arm in self.lm.arms]
        return out


def run_cell(cell: Cell, cell_dir: Path) -> dict:
    """One trained and evaluated model (``cell.arm`` is ``vit-<arm>`` or ``lm-<arm>``)."""
    s = cell.settings
    device = resolve_device(s["device"])
    arm = cell.arm.split("-", 1)[1]
    if s["model"] == "vit":
        return run_vit_cell(VitStudy(**_tuples(s["study"])), arm, cell.seed, cell_dir, device, s["data_path"])
    corpus = _corpus(s["text_path"], s["study"]["max_vocab"], s["study"]["max_chars"])
    return run_lm_cell(LmStudy(**_tuples(s["study"])), arm, cell.seed, cell_dir, device, corpus)


def _tuples(d: Mapping) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------- ViT


def _vit_model(study: VitStudy, arm: str) -> ViT:
    attention, estimator = VARIANTS[arm]
    return ViT(ViTConfig(patch_size=study.patch_size, depth=study.depth, dim=study.dim, num_heads=study.num_heads,
                         attention=attention, estimator=estimator))


@functools.lru_cache(maxsize=2)
def _mnist(data_path: str | None, eval_images: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_tr, y_tr, x_te, y_te = mnist5k_split(data_path, seed=0)
    # The split keeps the file's label-sorted order: a fixed shuffle makes any prefix class-balanced.
    order = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(0))[:eval_images]
    x_te = torch.from_numpy(x_te).float().div(255).unsqueeze(1)[order]
    x_tr = torch.from_numpy(x_tr).float().div(255).unsqueeze(1)
    return x_tr, torch.from_numpy(y_tr), x_te, torch.from_numpy(y_te)[order]


def run_vit_cell(study: VitStudy, arm: str, seed: int, run_dir: Path, device: torch.device,
                 data_path: str | None) -> dict:
    """Train one ViT and evaluate it; scalar accuracies and, under ``items``, one 0/1 per test image."""
    x_tr, y_tr, x_te, y_te = _mnist(data_path, study.eval_images)
    torch.manual_seed(seed)
    model = _vit_model(study, arm)
    base, spe = epoch_batch_fn((x_tr, y_tr), study.batch_size, seed)

    def batch_fn(step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        xb, yb = base(step, rank, world)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
        return random_translate(xb, study.shift, gen), yb

    def loss_fn(model, batch):
        xb, yb = batch
        logits = model(xb)
        return F.cross_entropy(logits, yb), {"acc": (logits.argmax(-1) == yb).float().mean()}

    tcfg = TrainConfig(steps=study.epochs * spe, lr=study.lr, weight_decay=study.weight_decay, warmup_steps=spe,
                       schedule="cosine", log_every=spe, ckpt_every=spe * 5, seed=seed, device=str(device),
                       progress=False, name=f"{STUDY}/vit-{arm}/seed{seed}")
    train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, resume=(run_dir / "state.json").exists())
    model.eval()
    data = (x_te, y_te)
    items: dict[str, Tensor] = {"clean": correct_mask(model, data, None, batch_size=500, device=device)}
    gen = torch.Generator().manual_seed(1234)
    for sigma in study.noise_sigmas:
        noisy = (gaussian_noise(x_te, sigma, generator=gen), y_te)
        items[f"noise{sigma:g}"] = correct_mask(model, noisy, None, batch_size=500, device=device)
    modes = ("grad", "detached") if VARIANTS[arm][0] == "elliptical" else ("grad",)
    for mode in modes:
        set_metric_grad(model, mode == "grad")
        for eps in study.attack_eps:
            items[f"pgd_{mode}_e{eps}"] = correct_mask(
                model, data, pgd, batch_size=250, device=device, eps=eps / 255, steps=study.pgd_steps,
                generator=torch.Generator(device=device).manual_seed(seed))
        items[f"pgd_{mode}_mean"] = torch.stack([items[f"pgd_{mode}_e{e}"] for e in study.attack_eps]).double().mean(0)
    set_metric_grad(model, True)
    sub = (x_te[: study.spsa_images], y_te[: study.spsa_images])
    items["spsa"] = correct_mask(model, sub, spsa, batch_size=250, device=device, eps=study.spsa_eps / 255,
                                 iters=study.spsa_iters, samples=study.spsa_samples,
                                 generator=torch.Generator(device=device).manual_seed(seed))
    set_metric_grad(model, False)
    cosine = collect_token_cosine(model, batches((x_te,), 250), device)
    return {**{k: float(v.double().mean()) for k, v in items.items()}, "token_cosine": cosine,
            "token_cosine_last": cosine[-1], "items": {k: compact(v) for k, v in items.items()}}


# --------------------------------------------------------------------------------------------- LM


@functools.lru_cache(maxsize=2)
def _corpus(text_path: str | None, max_vocab: int, max_chars: int | None) -> TokenCorpus:
    return build_corpus("word", path=text_path, max_vocab=max_vocab, max_chars=max_chars)


def _lm_model(study: LmStudy, arm: str, vocab_size: int) -> TransformerLM:
    attention, estimator = VARIANTS[arm]
    return TransformerLM(TransformerLMConfig(vocab_size=vocab_size, context=study.context, dim=study.dim,
                                             depth=study.depth, num_heads=study.num_heads, dropout=study.dropout,
                                             attention=attention, estimator=estimator))


@torch.no_grad()
def lm_target_nll(model: torch.nn.Module, tokens: Tensor, context: int, device: torch.device, bs: int = 16) -> Tensor:
    """Next-token NLL of every target in non-overlapping windows of ``context`` tokens.

    Returns ``[n, context]`` values aligned with the targets ``tokens[1 : n·context + 1]``.
    """
    model.eval()
    n = (tokens.numel() - 1) // context
    if n == 0:
        raise ValueError(
            f"an evaluation split has {tokens.numel()} tokens, fewer than context + 1 = {context + 1}; "
            "use a larger corpus (or max_chars)"
        )
    x = tokens[: n * context].view(n, context)
    y = tokens[1 : n * context + 1].view(n, context)
    out = [F.cross_entropy(model(xb.to(device)).transpose(1, 2), yb.to(device), reduction="none").cpu()
           for xb, yb in batches((x, y), bs)]
    return torch.cat(out)


def run_lm_cell(study: LmStudy, arm: str, seed: int, run_dir: Path, device: torch.device,
                corpus: TokenCorpus) -> dict:
    """Train one LM and evaluate it; per-window mean NLL (nats) under ``items``."""
    torch.manual_seed(seed)
    model = _lm_model(study, arm, corpus.vocab_size)
    train_tokens = corpus.train

    def batch_fn(step: int, rank: int = 0, world: int = 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
        return random_windows(train_tokens, study.batch_size // world, study.context, gen)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()), {}

    tcfg = TrainConfig(steps=study.steps, lr=study.lr, weight_decay=0.01, warmup_steps=max(1, study.steps // 20),
                       schedule="cosine", log_every=max(1, study.steps // 20), ckpt_every=max(1, study.steps // 4),
                       seed=seed, device=str(device), progress=False, name=f"{STUDY}/lm-{arm}/seed{seed}")
    train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, resume=(run_dir / "state.json").exists())
    valid, test = corpus.valid, corpus.test
    if study.eval_tokens:
        valid, test = valid[: study.eval_tokens], test[: study.eval_tokens]
    clean = lm_target_nll(model, test, study.context, device)
    items = {"nll": clean.mean(1)}
    result = {"valid_ppl": math.exp(lm_target_nll(model, valid, study.context, device).mean().item()),
              "test_ppl": math.exp(clean.mean().item())}
    for frac in study.swap_fractions:
        corrupted, _ = word_swap(test, corpus.vocab, frac, seed=0)
        nll = lm_target_nll(model, corrupted, study.context, device)
        result[f"swap{frac:g}_ppl"] = math.exp(nll.mean().item())
        items[f"swap{frac:g}_excess_nll"] = nll.mean(1) - items["nll"]
    n = min(64, (test.numel() - 1) // study.context)
    windows = test[: n * study.context].view(n, study.context)
    cosine = collect_token_cosine(model, batches((windows,), 16), device)
    return {**result, "nll": float(items["nll"].mean()), "token_cosine": cosine, "token_cosine_last": cosine[-1],
            "items": {k: compact(v) for k, v in items.items()}}


# --------------------------------------------------------------------------------------------- report


def claims(cfg: EllipticalConfig, arms: list[str]) -> list[Claim]:
    """The study's claims (declared before any cell runs), confirmatory first."""
    vit, lm = cfg.vit, cfg.lm
    acc = {"scale": 100.0, "unit": " pts"}
    e_spsa = vit.spsa_eps
    out = [
        Claim("pgd", f"elliptical is more robust under PGD (mean accuracy over ε ∈ {list(vit.attack_eps)}/255, "
              "gradient through the metric)", "vit-elliptical", "vit-softmax", "pgd_grad_mean", 1, **acc),
        Claim("clean", "elliptical matches softmax's clean accuracy", "vit-elliptical", "vit-softmax", "clean", 0,
              margin=1.0, **acc),
        Claim("collapse", "elliptical has a lower last-layer token cosine (less collapse)", "vit-elliptical",
              "vit-softmax", "token_cosine_last", -1),
        Claim("lm", "the elliptical LM has a lower test loss (nats per token)", "lm-elliptical", "lm-softmax",
              "nll", -1),
    ]
    ex = {"confirmatory": False}
    out += [Claim(f"pgd{e}", f"elliptical is more robust under PGD at ε = {e}/255", "vit-elliptical", "vit-softmax",
                  f"pgd_grad_e{e}", 1, **acc, **ex) for e in vit.attack_eps]
    out += [Claim("spsa", f"elliptical is more robust under SPSA at ε = {e_spsa}/255 (gradient-free)",
                  "vit-elliptical", "vit-softmax", "spsa", 1, **acc, **ex)]
    out += [Claim(f"noise{s:g}", f"elliptical is more robust to Gaussian noise σ = {s:g}", "vit-elliptical",
                  "vit-softmax", f"noise{s:g}", 1, **acc, **ex) for s in vit.noise_sigmas]
    out += [Claim("iso-pgd", "the estimated metric beats the isotropic control under PGD", "vit-elliptical",
                  "vit-isotropic", "pgd_grad_mean", 1, **acc, **ex),
            Claim("iso-clean", "the isotropic control matches softmax's clean accuracy", "vit-isotropic",
                  "vit-softmax", "clean", 0, margin=1.0, **acc, **ex)]
    out += [Claim(f"lm-swap{f:g}", f"the elliptical LM degrades less under {100 * f:g}% word swap (excess nats)",
                  "lm-elliptical", "lm-softmax", f"swap{f:g}_excess_nll", -1, **ex) for f in lm.swap_fractions]
    return [c for c in out if c.a in arms and c.b in arms]


def _by_arm(cells: Mapping[Cell, dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for cell, result in cells.items():
        out.setdefault(cell.arm, {})[cell.seed] = result
    return out


def _spsa_check(study: VitStudy, soft: Mapping[int, dict]) -> str:
    """Is SPSA strong enough to check for gradient masking? Compare it with PGD on the same images."""
    key = f"pgd_grad_e{study.spsa_eps}"
    if not soft or key not in next(iter(soft.values()))["items"]:
        return ""
    n = study.spsa_images
    spsa_acc = [100 * r["spsa"] for r in soft.values()]
    pgd_acc = [100 * sum(r["items"][key][:n]) / len(r["items"][key][:n]) for r in soft.values()]
    gap = sum(spsa_acc) / len(spsa_acc) - sum(pgd_acc) / len(pgd_acc)
    strong = gap <= 5.0
    return (f"**SPSA strength** (softmax, the same {n} images at ε = {study.spsa_eps}/255): SPSA "
            f"{fmt(spsa_acc, 1)}%, PGD {fmt(pgd_acc, 1)}%; SPSA is {gap:+.1f} points above PGD, so it is "
            + ("strong enough to reveal gradient masking (within 5 points)." if strong else
               "**a weak check** (more than 5 points above PGD): a gradient-masking effect could hide under it.")
            + "\n")


def _vit_tables(study: VitStudy, arms: dict[str, dict[int, dict]]) -> str:
    vit = {a: arms[a] for a in arms if a.startswith("vit-")}
    header = ["arm", "seeds", "clean %", *[f"noise σ={s:g}" for s in study.noise_sigmas],
              *[f"PGD ε={e}/255" for e in study.attack_eps], f"SPSA ε={study.spsa_eps}/255", "last-layer cos"]
    rows = []
    for arm, cells in vit.items():
        rs = list(cells.values())
        rows.append([arm.removeprefix("vit-"), len(rs), fmt([r["clean"] for r in rs], 2, 100),
                     *[fmt([r[f"noise{s:g}"] for r in rs], 1, 100) for s in study.noise_sigmas],
                     *[fmt([r[f"pgd_grad_e{e}"] for r in rs], 1, 100) for e in study.attack_eps],
                     fmt([r["spsa"] for r in rs], 1, 100), fmt([r["token_cosine_last"] for r in rs], 3)])
    md = [markdown_table(header, rows), ""]
    ell = vit.get("vit-elliptical")
    if ell:
        rs = list(ell.values())
        md += ["PGD against elliptical with the metric **detached** (the reference code's setting; a weaker attack): "
               + ", ".join(f"ε={e}/255 {fmt([r[f'pgd_detached_e{e}'] for r in rs], 1, 100)}%"
                           for e in study.attack_eps) + ".\n"]
    return "\n".join(md)


def _lm_table(study: LmStudy, arms: dict[str, dict[int, dict]]) -> str:
    lm = {a: arms[a] for a in arms if a.startswith("lm-")}
    header = ["arm", "seeds", "valid PPL", "test PPL", *[f"swap {100 * f:g}% PPL" for f in study.swap_fractions],
              "last-layer cos"]
    rows = [[arm.removeprefix("lm-"), len(cells), fmt([r["valid_ppl"] for r in cells.values()], 1),
             fmt([r["test_ppl"] for r in cells.values()], 1),
             *[fmt([r[f"swap{f:g}_ppl"] for r in cells.values()], 1) for f in study.swap_fractions],
             fmt([r["token_cosine_last"] for r in cells.values()], 3)] for arm, cells in lm.items()]
    return markdown_table(header, rows)


def sections(cfg: EllipticalConfig, cells: Mapping[Cell, dict], out: Path, corpus_info: str) -> list[Section]:
    """The report: claims and verdicts, the ViT and LM tables, the PGD and token-cosine figures."""
    arms = _by_arm(cells)
    vit, lm = cfg.vit, cfg.lm
    verdicts = decide(claims(cfg, list(arms)), arms)
    intro = (f"ViT (depth {vit.depth}, width {vit.dim}, {vit.num_heads} heads, patch {vit.patch_size}) trained "
             f"{vit.epochs} epochs on MNIST-5k (random shifts of up to {vit.shift} px, AdamW lr {vit.lr:g}, weight "
             f"decay {vit.weight_decay:g}, batch "
             f"{vit.batch_size}), evaluated on {vit.eval_images} test images: Gaussian noise, PGD-{vit.pgd_steps} "
             f"(true labels, random start, pixel clipping) with the gradient through the metric, SPSA "
             f"({vit.spsa_iters} iterations × {vit.spsa_samples} samples) on the first {vit.spsa_images}. Word-level "
             f"causal LM ({lm.depth} layers, width {lm.dim}, context {lm.context}, {lm.steps} steps of batch "
             f"{lm.batch_size}); {corpus_info}; items are test windows of {lm.context} tokens. Intervals: 95%, "
             "two-level bootstrap over seeds and eval items (images, windows); the confirmatory p-values are "
             "Holm-corrected.\n")
    md = [intro, "### Claims\n", verdict_table(verdicts, digits=3), "", "### ViT on MNIST-5k\n",
          _vit_tables(vit, arms), _spsa_check(vit, arms.get("vit-softmax", {})),
          "### Word-level LM\n", _lm_table(lm, arms), ""]
    figs = []
    vit_arms = [a for a in arms if a.startswith("vit-")]
    path = out / "figures" / "elliptical_pgd.png"
    line_figure(path, list(vit.attack_eps),
                {a.removeprefix("vit-"): [[100 * r[f"pgd_grad_e{e}"] for e in vit.attack_eps]
                                          for r in arms[a].values()] for a in vit_arms},
                xlabel="ε (1/255)", ylabel="accuracy %", title="ViT on MNIST-5k under PGD (gradient through M)")
    figs.append(str(path.relative_to(out)))
    path = out / "figures" / "elliptical_token_cosine.png"
    line_figure(path, list(range(1, vit.depth + 1)),
                {a.removeprefix("vit-"): [r["token_cosine"] for r in arms[a].values()] for a in vit_arms},
                xlabel="layer", ylabel="mean pairwise token cosine", title="Representation collapse (ViT)")
    figs.append(str(path.relative_to(out)))
    results = {"cells": without_items(arms), "verdicts": verdict_json(verdicts)}
    return [Section("Elliptical Attention — ViT on MNIST-5k and a word-level LM", "\n".join(md), figs, results)]


def run(cfg: EllipticalConfig, out: Path) -> list[Section]:
    """Run every cell (resumable: finished cells are reused) and return the report sections."""
    cells = run_grid(cfg.cells(), run_cell, out, workers=cfg.workers, desc="elliptical")
    corpus = _corpus(cfg.text_path, cfg.lm.max_vocab, cfg.lm.max_chars)
    info = (f"{len(corpus.train):,}/{len(corpus.valid):,}/{len(corpus.test):,} train/valid/test tokens, "
            f"vocabulary {corpus.vocab_size:,}")
    return sections(cfg, cells, out, info)


def make_config(
    *, quick: bool, seeds: int | None = None, device: str = "auto", data_path: str | None = None,
    text_path: str | None = None, workers: int = 2,
) -> EllipticalConfig:
    """The study's configuration: quick (the smoke run) or full, with ``seeds`` paired seeds."""
    cfg = EllipticalConfig.quick(seeds or 2) if quick else EllipticalConfig.full(seeds or 10)
    cfg.device, cfg.data_path, cfg.text_path, cfg.workers = device, data_path, text_path, workers
    return cfg
