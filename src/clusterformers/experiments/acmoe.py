"""Adaptive Clustering (AC) routing for mixture-of-experts at CPU scale (the studies of ``docs/acmoe.md``).

Three studies, each a grid of (router arm × paired seed) cells with identical budgets and hyper-parameters:
(a) synthetic subspace clusters (``acmoe_synthetic``), (b) byte- and word-level MoE language models on the
Wikipedia sample (``acmoe_lm``), (c) ViT-MoE on MNIST-5k (``acmoe_vit``). ``stablemoe`` — the AC router with
M = I — is in every table, so AC against it changes one thing only. Every cell is cached in
``<out>/acmoe/<study>/<arm>/seed<s>/result.json`` next to its training checkpoint, so a killed study resumes.
The last section states, from the numbers, where the paper's claims hold at this scale.

``clusterformers reproduce --paper acmoe [--quick] [--seeds N]`` calls :func:`make_config` and :func:`run`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clusterformers.data.text import build_corpus
from clusterformers.experiments import acmoe_lm, acmoe_synthetic, acmoe_vit
from clusterformers.experiments.acmoe_common import (
    ARM_NOTES,
    PRESET_ARMS,
    check_arms,
    steps_to_reach,
    verdict,
)
from clusterformers.experiments.acmoe_lm import LmStudy
from clusterformers.experiments.acmoe_synthetic import SyntheticStudy
from clusterformers.experiments.acmoe_vit import VitStudy
from clusterformers.experiments.common import cached
from clusterformers.report import Section, fmt_diff, markdown_table
from clusterformers.train import resolve_device

log = logging.getLogger(__name__)

STUDIES = ("synthetic", "lm", "vit")


@dataclass
class AcmoeConfig:
    synthetic: SyntheticStudy = field(default_factory=SyntheticStudy)
    lm: LmStudy = field(default_factory=LmStudy)
    vit: VitStudy = field(default_factory=VitStudy)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    studies: tuple[str, ...] = STUDIES
    device: str = "auto"
    data_path: str | None = None
    text_path: str | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.studies if s not in STUDIES]
        if unknown:
            raise ValueError(f"studies: unknown {unknown}, expected a subset of {STUDIES}")
        for study in (self.synthetic, self.lm, self.vit):
            check_arms(study.arms)

    @classmethod
    def full(cls, seeds: int = 5) -> AcmoeConfig:
        """The full sizes (the dataclass defaults); xmoe only where cheap (not in the LM study). About 12 hours
        on an idle two-core CPU (measured ~0.4 s per LM step at these sizes: ~20 min per LM cell, 30 LM
        cells); the time scales linearly with ``--seeds``."""
        return cls(lm=LmStudy(arms=("smoe", "stablemoe", "ac")), seeds=tuple(range(seeds)))

    @classmethod
    def quick(cls, seeds: int = 2) -> AcmoeConfig:
        """The demo: arms smoe / stablemoe / ac, reduced sizes and steps (a few minutes on two cores)."""
        arms = ("smoe", "stablemoe", "ac")
        synthetic = SyntheticStudy(arms=arms, n_test=2000, steps=250, eval_every=25)
        lm = LmStudy(arms=arms, depth=2, dim=64, expert_hidden=128, dropout=0.0, byte_context=64, word_context=32,
                     batch_size=16, steps=100, eval_points=5, curve_tokens=4096, eval_tokens=8192, eval_batch=32,
                     max_vocab=4096, max_chars=1_000_000)
        vit = VitStudy(arms=arms, epochs=5, lr=2e-3, warmup_epochs=0.5, eval_images=500, pgd_steps=3,
                       pgd_step_frac=0.8)
        return cls(synthetic, lm, vit, seeds=tuple(range(seeds)))


def make_config(
    *, quick: bool, seeds: int | None = None, device: str = "auto", data_path: str | None = None,
    text_path: str | None = None,
) -> AcmoeConfig:
    """The study's configuration: quick (the demo) or full, with ``seeds`` paired seeds."""
    cfg = AcmoeConfig.quick(seeds or 2) if quick else AcmoeConfig.full(seeds or 5)
    cfg.device, cfg.data_path, cfg.text_path = device, data_path, text_path
    return cfg


def study_dir(root: Path, name: str, study: object, *extra: object) -> Path:
    """``root/<name>-<hash>``: the hash covers the study's settings (not its arms) and ``extra`` (data paths),
    so quick and full runs, or runs with changed hyper-parameters, never reuse each other's cells."""
    settings = {k: v for k, v in dataclasses.asdict(study).items() if k != "arms"}
    key = json.dumps([settings, [str(e) for e in extra]], sort_keys=True, default=str)
    return root / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _grid(root: Path, arms: Sequence[str], seeds: Sequence[int],
          compute: Callable[[str, int, Path], dict]) -> dict[str, list[dict]]:
    """``{arm: [result per seed]}``, each cell cached in ``root/<arm>/seed<s>/result.json``."""
    return {arm: [cached(root / arm / f"seed{s}" / "result.json",
                         lambda a=arm, s=s: compute(a, s, root / a / f"seed{s}")) for s in seeds]
            for arm in arms}


def run(cfg: AcmoeConfig, out: Path) -> list[Section]:
    """Run the configured studies (finished cells are reused) and return their report sections."""
    device = resolve_device(cfg.device)
    root = out / "acmoe"
    sections: list[Section] = []
    found: dict[str, dict] = {}
    if "synthetic" in cfg.studies:
        study = cfg.synthetic
        cells = _grid(study_dir(root, "synthetic", study), study.arms, cfg.seeds,
                      lambda a, s, d: acmoe_synthetic.run_cell(study, a, s, d, device))
        sections.append(acmoe_synthetic.section(study, cells, out))
        found["synthetic"] = cells
    if "lm" in cfg.studies:
        for level in cfg.lm.levels:
            corpus = functools.cache(lambda level=level: build_corpus(
                level, path=cfg.text_path, split="contiguous", fractions=(0.9, 0.05, 0.05),
                max_vocab=cfg.lm.max_vocab, min_count=1, max_chars=cfg.lm.max_chars))
            where = study_dir(root, f"lm-{level}", cfg.lm, cfg.text_path)
            info = cached(where / "corpus.json", lambda corpus=corpus: {
                "train": corpus().train.numel(), "valid": corpus().valid.numel(), "test": corpus().test.numel(),
                "vocab": corpus().vocab_size})
            cells = _grid(where, cfg.lm.arms, cfg.seeds,
                          lambda a, s, d, level=level, corpus=corpus: acmoe_lm.run_cell(
                              cfg.lm, level, a, s, d, device, corpus()))
            text = (f"contiguous 90/5/5 split of the cleaned article text: {info['train']:,}/{info['valid']:,}/"
                    f"{info['test']:,} train/valid/test {level}s" + (f", vocabulary {info['vocab']:,}"
                                                                     if level == "word" else ""))
            sections.append(acmoe_lm.section(cfg.lm, level, cells, text, out))
            found[f"lm-{level}"] = cells
    if "vit" in cfg.studies:
        study = cfg.vit
        cells = _grid(study_dir(root, "vit", study, cfg.data_path), study.arms, cfg.seeds,
                      lambda a, s, d: acmoe_vit.run_cell(study, a, s, d, device, cfg.data_path))
        sections.append(acmoe_vit.section(study, cells, out, cfg.data_path))
        found["vit"] = cells
    sections.append(claims_section(cfg, found))
    return sections


# --------------------------------------------------------------------------------------------- claims


def _race(ac: list[dict], base: list[dict], target: Callable[[dict], float]) -> tuple[int, int, int]:
    """Per seed, which curve reaches ``target(baseline cell)`` at an earlier evaluated step (a curve that never
    does counts as last): ``(AC first, baseline first, ties)``."""
    ac_first = base_first = 0
    for a, b in zip(ac, base, strict=True):
        t = target(b)
        sa = steps_to_reach(a["curve_steps"], a["curve"], t)
        sb = steps_to_reach(b["curve_steps"], b["curve"], t)
        sa, sb = math.inf if sa is None else sa, math.inf if sb is None else sb
        ac_first += sa < sb
        base_first += sb < sa
    return ac_first, base_first, len(ac) - ac_first - base_first


def _convergence_words(ac_first: int, base_first: int, ties: int) -> str:
    n = ac_first + base_first + ties
    counts = f"AC first in {ac_first}/{n} seeds, baseline first in {base_first}/{n}"
    if ac_first == n:
        return f"**holds** ({counts})"
    if base_first == n:
        return f"**does not hold** ({counts})"
    return f"no difference ({counts})" if ties == n else f"mixed ({counts})"


def claims_section(cfg: AcmoeConfig, found: dict[str, dict]) -> Section:
    """Where the claims (faster convergence, robustness to corruption, specialised experts, better overall)
    hold at this scale: every row is a paired comparison of a preset AC arm (``PRESET_ARMS``; the ablations
    have their own lines in the study sections) against ``stablemoe`` and ``smoe``, judged by its 95%
    t-interval (or, for convergence, by the seeds in which AC gets there first)."""
    rows: list[list[str]] = []

    def add(claim: str, what: str, ac: list[float], base: list[float], lower: bool, digits: int, scale=1.0,
            arms: str = "") -> None:
        rows.append([claim, what, arms, fmt_diff(ac, base, digits, scale), verdict(ac, base, lower_is_better=lower)])

    syn = found.get("synthetic")
    if syn:
        threshold = statistics.median(r["test_mse"] for r in syn["stablemoe"])
        last = cfg.synthetic.depth - 1
        for a in (x for x in PRESET_ARMS if x in syn):
            for b in (x for x in ("stablemoe", "smoe") if x in syn):
                pair = f"{a} − {b}"
                rows.append(["faster convergence", "synthetic: steps to the stablemoe median final MSE", pair, "–",
                             _convergence_words(*_race(syn[a], syn[b], lambda _: threshold))])
                ours, theirs = syn[a], syn[b]
                add("better overall", "synthetic: test MSE", [r["test_mse"] for r in ours],
                    [r["test_mse"] for r in theirs], True, 4, arms=pair)
                add("robust to corruption", f"synthetic: MSE, noise σ={cfg.synthetic.noise_sigma}",
                    [r["noisy_mse"] for r in ours], [r["noisy_mse"] for r in theirs], True, 4, arms=pair)
                add("specialised experts", f"synthetic: purity at layer {last + 1}",
                    [r["purity"][last] for r in syn[a]], [r["purity"][last] for r in syn[b]], False, 3, arms=pair)
            mh, h = [r["dispersion_mh"] for r in syn[a]], [r["dispersion_h"] for r in syn[a]]
            add("tight clusters", "synthetic: dispersion ratio of M⊙h vs h (same model)", mh, h, True, 3,
                arms=f"{a}: M⊙h − h")
    for level in ("byte", "word"):
        cells = found.get(f"lm-{level}")
        if not cells:
            continue
        unit, to = ("BPC", lambda v: v / math.log(2)) if level == "byte" else ("PPL", math.exp)
        for a in (x for x in PRESET_ARMS if x in cells):
            for b in (x for x in ("stablemoe", "smoe") if x in cells):
                pair = f"{a} − {b}"
                race = _race(cells[a], cells[b], lambda cell: cell["curve"][-1])
                rows.append(["faster convergence", f"{level} LM: steps to the baseline's final valid loss", pair,
                             "–", _convergence_words(*race)])
                add("better overall", f"{level} LM: test {unit}", [to(r["test_loss"]) for r in cells[a]],
                    [to(r["test_loss"]) for r in cells[b]], True, 3, arms=pair)
                if level == "word":
                    add("robust to corruption", f"word LM: PPL under {cfg.lm.swap_fraction * 100:g}% word swap",
                        [to(r["swap_loss"]) for r in cells[a]], [to(r["swap_loss"]) for r in cells[b]], True, 2,
                        arms=pair)
    vit = found.get("vit")
    if vit:
        hi = str(cfg.vit.noise_sigmas[-1])
        e = str(cfg.vit.attack_eps[len(cfg.vit.attack_eps) // 2])
        for a in (x for x in PRESET_ARMS if x in vit):
            for b in (x for x in ("stablemoe", "smoe") if x in vit):
                pair = f"{a} − {b}"
                add("better overall", "ViT: clean accuracy (points)", [r["clean"] for r in vit[a]],
                    [r["clean"] for r in vit[b]], False, 2, 100, pair)
                for key, what in (("noise", f"noise σ={hi}"), ("fgsm", f"FGSM ε={e}/255"), ("pgd", f"PGD ε={e}/255")):
                    k = hi if key == "noise" else e
                    add("robust to corruption", f"ViT: accuracy under {what}", [r[key][k] for r in vit[a]],
                        [r[key][k] for r in vit[b]], False, 2, 100, pair)
    n_seeds = len(cfg.seeds)
    md = [f"Each row is a paired comparison over {n_seeds} seeds (AC arm minus baseline, 95% t-interval; with "
          f"so few seeds at this scale an interval must exclude 0 for a claim to count as holding). "
          "stablemoe is the like-for-like baseline (AC with M = I); smoe also changes the score function. "
          "Convergence counts the seeds in which AC reaches the target loss at an earlier evaluated step than "
          "the baseline. Nothing here is hard-coded: rerunning with other seeds or sizes rewrites it.\n",
          markdown_table(["claim", "measurement", "arms", "Δ [95% CI]", "verdict"], rows), "",
          "Arms: " + "; ".join(f"`{a}` = {ARM_NOTES[a]}" for a in sorted({a for c in found.values() for a in c})),
          ""]
    md.append(_summary(rows))
    return Section("AC-MoE — where the claims hold at this scale", "\n".join(md) + "\n", [],
                   {"rows": [dict(zip(("claim", "measurement", "arms", "diff", "verdict"), r, strict=True))
                             for r in rows]})


def _summary(rows: list[list[str]]) -> str:
    """One line per claim: how many of its comparisons hold, how many do not (a significant opposite, or the
    baseline first in every seed), and how many are inconclusive."""
    lines = ["**Summary** (comparisons per claim):\n"]
    for claim in dict.fromkeys(r[0] for r in rows):
        verdicts = [r[4] for r in rows if r[0] == claim]
        held = sum("**holds**" in v for v in verdicts)
        against = sum("**does not hold**" in v for v in verdicts)
        lines.append(f"- {claim}: holds in {held} of {len(verdicts)} comparisons, does not hold in {against}, "
                     f"inconclusive (no significant difference, or mixed across seeds) in "
                     f"{len(verdicts) - held - against}.")
    return "\n".join(lines)


__all__ = ["AcmoeConfig", "LmStudy", "SyntheticStudy", "VitStudy", "claims_section", "make_config", "run"]
