"""Elliptical Attention at CPU scale (the studies of ``docs/elliptical.md``).

(a) A tiny ViT on MNIST-5k: softmax vs elliptical vs identity-M vs random-M vs isotropic, clean and under
Gaussian noise, FGSM, PGD (each with the metric detached and differentiable) and SPSA, plus the token cosine
per layer. (b) A word-level causal LM on the Wikipedia sample: clean perplexity and perplexity under word
swap. Every variant shares the seeds, the data order and the hyper-parameters; only the attention metric
differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformers.attention import set_metric_grad
from clusterformers.data.images import mnist5k_split
from clusterformers.data.text import build_corpus, random_windows, word_swap
from clusterformers.experiments.common import batches, cached, epoch_batch_fn
from clusterformers.metrics import collect_token_cosine
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.models.vit import ViT, ViTConfig
from clusterformers.report import Section, fmt, fmt_diff, line_figure, markdown_table, verdict
from clusterformers.robust.attacks import fgsm, pgd, robust_accuracy, spsa
from clusterformers.robust.corruptions import gaussian_noise
from clusterformers.train import TrainConfig, resolve_device, train

log = logging.getLogger(__name__)

# variant name -> (attention, estimator)
VARIANTS = {
    "softmax": ("softmax", "mean"),
    "elliptical": ("elliptical", "mean"),
    "identity-M": ("elliptical", "identity"),
    "random-M": ("elliptical", "random"),
    "isotropic": ("elliptical", "isotropic"),
}


@dataclass
class VitStudy:
    """Tiny ViT on MNIST-5k."""

    variants: tuple[str, ...] = ("softmax", "elliptical", "identity-M", "random-M", "isotropic")
    patch_size: int = 7
    depth: int = 6
    dim: int = 64
    num_heads: int = 4
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    eval_images: int = 1000
    noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    attack_eps: tuple[int, ...] = (1, 2, 4, 8, 16)  # in 1/255 units
    pgd_steps: int = 10
    spsa_images: int = 200
    spsa_iters: int = 20
    spsa_samples: int = 128


@dataclass
class LmStudy:
    """Word-level causal LM on the Wikipedia sample."""

    variants: tuple[str, ...] = ("softmax", "elliptical", "random-M", "isotropic")
    depth: int = 4
    dim: int = 128
    num_heads: int = 4
    context: int = 128
    dropout: float = 0.1
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    max_vocab: int = 20000
    max_chars: int | None = None
    swap_fractions: tuple[float, ...] = (0.015, 0.05)
    eval_tokens: int | None = None


@dataclass
class EllipticalConfig:
    vit: VitStudy
    lm: LmStudy
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"
    data_path: str | None = None
    text_path: str | None = None

    @classmethod
    def full(cls, seeds: int = 3) -> EllipticalConfig:
        return cls(VitStudy(), LmStudy(), seeds=tuple(range(seeds)))

    @classmethod
    def quick(cls, seeds: int = 2) -> EllipticalConfig:
        vit = VitStudy(
            variants=("softmax", "elliptical", "random-M"),
            depth=4,
            epochs=6,
            batch_size=64,
            lr=2e-3,
            eval_images=500,
            noise_sigmas=(0.1, 0.2),
            attack_eps=(2, 8),
            pgd_steps=5,
            spsa_images=100,
            spsa_iters=10,
            spsa_samples=32,
        )
        lm = LmStudy(
            variants=("softmax", "elliptical"),
            depth=3,
            dim=64,
            context=64,
            steps=250,
            batch_size=16,
            max_vocab=5000,
            max_chars=1_500_000,
            eval_tokens=30_000,
        )
        return cls(vit, lm, seeds=tuple(range(seeds)))


# --------------------------------------------------------------------------------------------- ViT


def _vit_model(study: VitStudy, variant: str) -> ViT:
    attention, estimator = VARIANTS[variant]
    cfg = ViTConfig(
        patch_size=study.patch_size,
        depth=study.depth,
        dim=study.dim,
        num_heads=study.num_heads,
        attention=attention,
        estimator=estimator,
    )
    return ViT(cfg)


def run_vit_cell(study: VitStudy, variant: str, seed: int, run_dir: Path, device: torch.device, data_path) -> dict:
    """Train one (variant, seed) ViT and evaluate it; returns a JSON-able dict."""
    x_tr, y_tr, x_te, y_te = mnist5k_split(data_path, seed=0)
    x_tr = torch.from_numpy(x_tr).float().div(255).unsqueeze(1)
    # The split keeps the file's label-sorted order: a fixed shuffle makes any prefix class-balanced.
    order = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(0))[: study.eval_images]
    x_te = torch.from_numpy(x_te).float().div(255).unsqueeze(1)[order]
    y_tr, y_te = torch.from_numpy(y_tr), torch.from_numpy(y_te)[order]
    torch.manual_seed(seed)
    model = _vit_model(study, variant)
    batch_fn, spe = epoch_batch_fn((x_tr, y_tr), study.batch_size, seed)

    def loss_fn(model, batch):
        xb, yb = batch
        logits = model(xb)
        return F.cross_entropy(logits, yb), {"acc": (logits.argmax(-1) == yb).float().mean().item()}

    steps = study.epochs * spe
    tcfg = TrainConfig(
        steps=steps,
        lr=study.lr,
        weight_decay=study.weight_decay,
        warmup_steps=spe,
        schedule="cosine",
        log_every=spe,
        ckpt_every=spe * 5,
        seed=seed,
        device=str(device),
        progress=False,
    )
    train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, resume=(run_dir / "state.json").exists())
    model.eval()
    result: dict = {"clean": robust_accuracy(model, (x_te, y_te), None, batch_size=500, device=device)}
    gen = torch.Generator().manual_seed(1234)
    result["noise"] = {
        str(s): robust_accuracy(model, (gaussian_noise(x_te, s, generator=gen), y_te), None, batch_size=500,
                                device=device)
        for s in study.noise_sigmas
    }
    elliptical = VARIANTS[variant][0] == "elliptical"
    modes = (False, True) if elliptical else (False,)
    for grad in modes:
        set_metric_grad(model, grad)
        tag = "grad" if grad else "detached"
        result[f"fgsm_{tag}"] = {
            str(e): robust_accuracy(model, (x_te, y_te), fgsm, batch_size=250, device=device, eps=e / 255)
            for e in study.attack_eps
        }
        result[f"pgd_{tag}"] = {
            str(e): robust_accuracy(
                model, (x_te, y_te), pgd, batch_size=250, device=device, eps=e / 255, steps=study.pgd_steps,
                generator=torch.Generator(device=device).manual_seed(seed),
            )
            for e in study.attack_eps
        }
    set_metric_grad(model, False)
    if not elliptical:
        result["fgsm_grad"], result["pgd_grad"] = result["fgsm_detached"], result["pgd_detached"]
    xs, ys = x_te[: study.spsa_images], y_te[: study.spsa_images]
    result["spsa"] = robust_accuracy(
        model, (xs, ys), spsa, batch_size=250, device=device, eps=8 / 255, iters=study.spsa_iters,
        samples=study.spsa_samples,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    result["token_cosine"] = collect_token_cosine(model, batches((x_te,), 250), device)
    return result


def _vit_section(study: VitStudy, cells: dict[str, list[dict]], out: Path) -> Section:
    variants = list(cells)
    rows = []
    for v in variants:
        rs = cells[v]
        rows.append([
            v,
            fmt([r["clean"] for r in rs], 2, 100),
            *[fmt([r["noise"][str(s)] for r in rs], 1, 100) for s in study.noise_sigmas],
            fmt([r["spsa"] for r in rs], 1, 100),
            fmt([r["token_cosine"][-1] for r in rs], 3),
        ])
    header = ["variant", "clean acc %", *[f"noise σ={s}" for s in study.noise_sigmas], "SPSA 8/255", "last-layer cos"]
    md = [f"Test accuracy (%) on {study.eval_images} MNIST-5k test images, mean ± std over {len(cells[variants[0]])} "
          f"paired seeds; {study.epochs} epochs, depth {study.depth}, width {study.dim}, patch {study.patch_size}.\n",
          markdown_table(header, rows), ""]
    for attack in ("fgsm", "pgd"):
        for tag in ("detached", "grad"):
            arows = [[v, *[fmt([r[f"{attack}_{tag}"][str(e)] for r in cells[v]], 1, 100) for e in study.attack_eps]]
                     for v in variants]
            what = "metric detached (reference setting)" if tag == "detached" else "gradient through the metric"
            md += [f"**{attack.upper()}**, {what}:\n",
                   markdown_table(["variant", *[f"ε={e}/255" for e in study.attack_eps]], arows), ""]
    figs = []
    for attack in ("fgsm", "pgd"):
        path = out / "figures" / f"vit_{attack}.png"
        line_figure(path, list(study.attack_eps),
                    {f"{v} ({t})": [[r[f"{attack}_{t}"][str(e)] * 100 for e in study.attack_eps] for r in cells[v]]
                     for v in variants for t in (("detached", "grad") if v != "softmax" else ("detached",))
                     if v in ("softmax", "elliptical")},
                    xlabel="ε (1/255)", ylabel="accuracy %", title=f"ViT on MNIST-5k under {attack.upper()}")
        figs.append(str(path.relative_to(out)))
    path = out / "figures" / "vit_token_cosine.png"
    line_figure(path, list(range(1, study.depth + 1)), {v: [r["token_cosine"] for r in cells[v]] for v in variants},
                xlabel="layer", ylabel="mean pairwise token cosine", title="Representation collapse (ViT)")
    figs.append(str(path.relative_to(out)))
    md.append(_vit_verdict(cells, study))
    return Section("Elliptical Attention — ViT on MNIST-5k", "\n".join(md), figs, {"vit": cells})


def _vit_verdict(cells: dict[str, list[dict]], study: VitStudy) -> str:
    soft, ell = cells.get("softmax"), cells.get("elliptical")
    if not soft or not ell:
        return ""
    e = study.attack_eps[len(study.attack_eps) // 2]
    lines = ["**Paired differences, elliptical − softmax** (accuracy points, 95% t-interval):\n",
             f"- clean: {fmt_diff([r['clean'] for r in ell], [r['clean'] for r in soft], 2, 100)}",
             f"- PGD ε={e}/255, metric detached: "
             f"{fmt_diff([r['pgd_detached'][str(e)] for r in ell], [r['pgd_detached'][str(e)] for r in soft], 2, 100)}",
             f"- PGD ε={e}/255, gradient through the metric: "
             f"{fmt_diff([r['pgd_grad'][str(e)] for r in ell], [r['pgd_grad'][str(e)] for r in soft], 2, 100)}",
             f"- SPSA: {fmt_diff([r['spsa'] for r in ell], [r['spsa'] for r in soft], 2, 100)}",
             f"- last-layer token cosine: "
             f"{fmt_diff([r['token_cosine'][-1] for r in ell], [r['token_cosine'][-1] for r in soft], 3)}"]
    pgd = [r["pgd_grad"][str(e)] for r in ell], [r["pgd_grad"][str(e)] for r in soft]
    lines += ["", "**Against the paper's claims** (elliptical vs softmax, same seeds and budget):\n",
              "- " + verdict([r["clean"] for r in ell], [r["clean"] for r in soft], higher_is_better=True,
                             claim="clean accuracy higher (paper: on par)"),
              "- " + verdict(*pgd, higher_is_better=True,
                             claim=f"more robust under PGD ε={e}/255 with gradient through the metric"),
              "- " + verdict([r["spsa"] for r in ell], [r["spsa"] for r in soft], higher_is_better=True,
                             claim="more robust under SPSA (gradient-free)"),
              "- " + verdict([r["token_cosine"][-1] for r in ell], [r["token_cosine"][-1] for r in soft],
                             higher_is_better=False, claim="lower deep-layer token cosine (less collapse)")]
    rand = cells.get("random-M")
    if rand:
        lines.append("- " + verdict([r["pgd_grad"][str(e)] for r in ell], [r["pgd_grad"][str(e)] for r in rand],
                                    higher_is_better=True, claim="estimated M beats random M under PGD"))
    ident = cells.get("identity-M")
    if ident:
        same = all(abs(a["clean"] - b["clean"]) < 1e-12 for a, b in zip(ident, soft))
        lines.append(f"- identity-M reproduces softmax exactly (determinism check): {'yes' if same else 'NO'}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- LM


def _lm_model(study: LmStudy, variant: str, vocab_size: int) -> TransformerLM:
    attention, estimator = VARIANTS[variant]
    cfg = TransformerLMConfig(
        vocab_size=vocab_size,
        context=study.context,
        dim=study.dim,
        depth=study.depth,
        num_heads=study.num_heads,
        dropout=study.dropout,
        attention=attention,
        estimator=estimator,
    )
    return TransformerLM(cfg)


@torch.no_grad()
def lm_target_nll(model: torch.nn.Module, tokens: Tensor, context: int, device: torch.device, bs: int = 16) -> Tensor:
    """Next-token NLL of every target in non-overlapping windows of ``context`` tokens.

    Returns ``[n·context]`` values aligned with the targets ``tokens[1 : n·context + 1]``.
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
    out = [
        F.cross_entropy(model(xb.to(device)).flatten(0, 1), yb.to(device).flatten(), reduction="none").cpu()
        for xb, yb in batches((x, y), bs)
    ]
    return torch.cat(out)


def run_lm_cell(study: LmStudy, variant: str, seed: int, run_dir: Path, device: torch.device, corpus) -> dict:
    torch.manual_seed(seed)
    model = _lm_model(study, variant, corpus.vocab_size)
    train_tokens = corpus.train

    def batch_fn(step: int, rank: int = 0, world: int = 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
        return random_windows(train_tokens, study.batch_size // world, study.context, gen)

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), {}

    tcfg = TrainConfig(
        steps=study.steps, lr=study.lr, weight_decay=0.01, warmup_steps=max(1, study.steps // 20),
        schedule="cosine", log_every=max(1, study.steps // 20), ckpt_every=max(1, study.steps // 4),
        seed=seed, device=str(device), progress=False,
    )
    train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, resume=(run_dir / "state.json").exists())
    valid, test = corpus.valid, corpus.test
    if study.eval_tokens:
        valid, test = valid[: study.eval_tokens], test[: study.eval_tokens]
    result = {"valid_ppl": math.exp(lm_target_nll(model, valid, study.context, device).mean().item()),
              "test_ppl": math.exp(lm_target_nll(model, test, study.context, device).mean().item())}
    for frac in study.swap_fractions:
        corrupted, changed = word_swap(test, corpus.vocab, frac, seed=0)
        nll = lm_target_nll(model, corrupted, study.context, device)
        clean_target = ~changed[1 : nll.numel() + 1]
        result[f"swap{frac}_ppl"] = math.exp(nll.mean().item())
        result[f"swap{frac}_ppl_uncorrupted"] = math.exp(nll[clean_target].mean().item())
    n = min(64, (test.numel() - 1) // study.context)
    windows = test[: n * study.context].view(n, study.context)
    result["token_cosine"] = collect_token_cosine(model, batches((windows,), 16), device)
    return result


def _lm_section(study: LmStudy, cells: dict[str, list[dict]], corpus_info: str) -> Section:
    variants = list(cells)
    header = ["variant", "valid PPL", "test PPL"]
    for f in study.swap_fractions:
        header += [f"swap {f * 100:g}% PPL (all)", f"swap {f * 100:g}% PPL (uncorrupted targets)"]
    header.append("last-layer cos")
    rows = []
    for v in variants:
        rs = cells[v]
        row = [v, fmt([r["valid_ppl"] for r in rs], 1), fmt([r["test_ppl"] for r in rs], 1)]
        for f in study.swap_fractions:
            row += [fmt([r[f"swap{f}_ppl"] for r in rs], 1), fmt([r[f"swap{f}_ppl_uncorrupted"] for r in rs], 1)]
        rows.append([*row, fmt([r["token_cosine"][-1] for r in rs], 3)])
    md = [f"Word-level causal LM ({study.depth} layers, width {study.dim}, context {study.context}, "
          f"{study.steps} steps of batch {study.batch_size}); {corpus_info}. Word swap replaces the given share "
          "of non-stop-word test tokens by `<unk>` (trained on clean text; same corruption for every model).\n",
          markdown_table(header, rows), ""]
    if "softmax" in cells and "elliptical" in cells:
        s, e = cells["softmax"], cells["elliptical"]
        md.append("**Paired differences, elliptical − softmax** (PPL):\n")
        md.append(f"- test: {fmt_diff([r['test_ppl'] for r in e], [r['test_ppl'] for r in s], 2)}")
        for f in study.swap_fractions:
            k = f"swap{f}_ppl"
            md.append(f"- swap {f * 100:g}%: {fmt_diff([r[k] for r in e], [r[k] for r in s], 2)}")
        md += ["", "**Against the paper's claims** (its WikiText-103 results; the reference LM lacked 1/√D and "
               "leaked the future into M, so a smaller or zero gain here is a legitimate result):\n",
               "- " + verdict([r["test_ppl"] for r in e], [r["test_ppl"] for r in s], higher_is_better=False,
                              claim="lower clean test perplexity")]
        last = f"swap{study.swap_fractions[-1]}_ppl"
        md.append("- " + verdict([r[last] / r["test_ppl"] for r in e], [r[last] / r["test_ppl"] for r in s],
                                 higher_is_better=False,
                                 claim=f"less degradation under {study.swap_fractions[-1] * 100:g}% word swap "
                                       "(ratio of swapped to clean PPL)"))
    return Section("Elliptical Attention — word-level LM on the Wikipedia sample", "\n".join(md), [], {"lm": cells})


def run(cfg: EllipticalConfig, out: Path) -> list[Section]:
    """Run both studies (resumable: finished cells are reused) and return their report sections."""
    device = resolve_device(cfg.device)
    root = out / "elliptical"
    vit_cells: dict[str, list[dict]] = {}
    for variant in cfg.vit.variants:
        vit_cells[variant] = [
            cached(root / "vit" / variant / f"seed{seed}" / "result.json",
                   lambda v=variant, s=seed: run_vit_cell(cfg.vit, v, s, root / "vit" / v / f"seed{s}", device,
                                                          cfg.data_path))
            for seed in cfg.seeds
        ]
    corpus = build_corpus("word", path=cfg.text_path, max_vocab=cfg.lm.max_vocab, max_chars=cfg.lm.max_chars)
    info = (f"{len(corpus.train):,}/{len(corpus.valid):,}/{len(corpus.test):,} train/valid/test tokens, "
            f"vocabulary {corpus.vocab_size:,}")
    lm_cells: dict[str, list[dict]] = {}
    for variant in cfg.lm.variants:
        lm_cells[variant] = [
            cached(root / "lm" / variant / f"seed{seed}" / "result.json",
                   lambda v=variant, s=seed: run_lm_cell(cfg.lm, v, s, root / "lm" / v / f"seed{s}", device, corpus))
            for seed in cfg.seeds
        ]
    return [_vit_section(cfg.vit, vit_cells, out), _lm_section(cfg.lm, lm_cells, info)]

def make_config(
    *, quick: bool, seeds: int | None = None, device: str = "auto", data_path: str | None = None,
    text_path: str | None = None,
) -> EllipticalConfig:
    """The study's configuration: quick (the demo) or full, with ``seeds`` paired seeds."""
    cfg = EllipticalConfig.quick(seeds or 2) if quick else EllipticalConfig.full(seeds or 3)
    cfg.device, cfg.data_path, cfg.text_path = device, data_path, text_path
    return cfg
