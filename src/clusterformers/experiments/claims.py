"""Claims, paired effects with intervals over seeds and eval items, multiplicity, and one verdict vocabulary.

Every study declares its claims up front (:class:`Claim`): which two arms, which metric, the direction the
paper predicts, and whether the claim is **confirmatory** (one of the few the study is powered for; Holm's
correction runs over these) or **exploratory** (reported with the same statistics, uncorrected, and labelled
so). A verdict is computed from the numbers only:

- ``reproduced``: the corrected test rejects "no effect" and the effect has the paper's sign (directional
  claims), or it rejects "a difference beyond the declared margin" (equivalence claims);
- ``contradicted``: the effect is significant in the other direction, or lies wholly outside the margin;
- ``not resolved``: anything else, and every claim of a run with fewer than ``MIN_SEEDS`` paired seeds. The
  report then says which effects the interval rules out.

The standard error comes from a two-level ("crossed") bootstrap: each replicate resamples the seeds and,
independently, the eval items, with the same items for every seed (they were evaluated on the same items).
This covers both the training-seed spread and the sampling of the eval set; it is slightly conservative.
At the seed level the replicates are widened by ``sqrt(S / (S - 1))``, the usual small-sample correction.
Intervals and p-values then use Student's t with ``S − 1`` degrees of freedom, since a study has only 5–10
seeds and a percentile bootstrap over so few is too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

VERDICTS = ("reproduced", "contradicted", "not resolved")
ALPHA = 0.05
MIN_SEEDS = 5  # fewer paired seeds give no verdict: their interval rests on a guess of the seed spread


@dataclass(frozen=True)
class Claim:
    """A comparison ``a − b`` on ``metric`` that the paper makes.

    Args:
        name: a short identifier, unique in the study.
        text: the claim in words, e.g. ``"FARE keeps less colour than InfoNCE"``.
        a, b: the arms compared (paired by seed).
        metric: the per-item (or per-cell) metric key in each cell's result.
        direction: ``+1`` (the paper predicts ``a > b``), ``-1`` (``a < b``) or ``0`` (``a ≈ b``).
        margin: for ``direction=0``, the largest ``|a − b|`` that counts as equal (in ``scale`` units).
        confirmatory: counted in the multiplicity correction; otherwise exploratory.
        scale: reported values are ``metric × scale`` (e.g. 100 for accuracy in points).
        unit: the unit of the scaled metric, for the report.
    """

    name: str
    text: str
    a: str
    b: str
    metric: str
    direction: int
    margin: float = 0.0
    confirmatory: bool = True
    scale: float = 1.0
    unit: str = ""

    def __post_init__(self) -> None:
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"direction must be -1, 0 or +1, got {self.direction}")
        if self.direction == 0 and not self.margin > 0:
            raise ValueError(f"an equivalence claim (direction=0) needs a margin > 0, got {self.margin}")


@dataclass(frozen=True)
class Effect:
    """The paired effect ``a − b`` (scaled): its mean, 95% interval, and the test's p-value (uncorrected)."""

    mean: float
    lo: float
    hi: float
    p: float
    seeds: int
    items: int


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    effect: Effect
    p_adjusted: float
    verdict: str

    def explanation(self) -> str:
        """Why a claim is ``not resolved``: too few seeds, or what its interval still excludes."""
        e, unit = self.effect, self.claim.unit
        if e.seeds < MIN_SEEDS:
            return f"{e.seeds} seeds decide nothing (a verdict needs at least {MIN_SEEDS})"
        return f"rules out Δ < {e.lo:+.3g}{unit} and Δ > {e.hi:+.3g}{unit}"


def bootstrap(d: np.ndarray, *, n_boot: int = 4000, seed: int = 0) -> np.ndarray:
    """Replicates of the mean of ``d [seeds, items]`` under the crossed two-level bootstrap (see the module),
    widened at the seed level by ``sqrt(S / (S - 1))``."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 1:
        raise ValueError(f"d must be [seeds >= 2, items >= 1], got shape {list(d.shape)}")
    if not np.isfinite(d).all():
        raise ValueError("d contains NaN or inf; a cell's metric is missing or broken")
    s, n = d.shape
    rng = np.random.default_rng(seed)
    w_seed = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)
    w_item = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) if n > 1 else np.ones((n_boot, 1))
    boot = ((w_seed @ d) * w_item).sum(1) / (s * n)
    mean = d.mean()
    return mean + (boot - mean) * math.sqrt(s / (s - 1))


def paired_effect(a: np.ndarray, b: np.ndarray, *, direction: int = 1, margin: float = 0.0, n_boot: int = 4000,
                  seed: int = 0) -> Effect:
    """The effect ``a − b`` for ``[seeds, items]`` arrays of the same cells (paired seeds and items).

    Its standard error is the spread of the two-level bootstrap; the interval and the p-value use Student's
    t with ``seeds − 1`` degrees of freedom, which keeps them honest at 5–10 seeds. The p-value is two-sided
    for ``direction != 0``, and for ``direction == 0`` the TOST p-value of "``|a − b| < margin``".
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired [seeds, items] arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    mean = float(d.mean())
    se = float(bootstrap(d, n_boot=n_boot, seed=seed).std(ddof=1))
    df = d.shape[0] - 1
    dist = stats.t(df)
    if se == 0.0:
        p = 0.0 if (abs(mean) < margin if direction == 0 else mean != 0) else 1.0
        return Effect(mean, mean, mean, p, d.shape[0], d.shape[1])
    if direction == 0:
        p = max(dist.sf((mean + margin) / se), dist.cdf((mean - margin) / se))
    else:
        p = 2 * dist.sf(abs(mean) / se)
    half = dist.ppf(1 - ALPHA / 2) * se
    return Effect(mean, mean - half, mean + half, float(min(1.0, p)), d.shape[0], d.shape[1])


def compact(values: np.ndarray | Sequence[float] | object) -> list:
    """Per-item values for a cell's JSON: ``0``/``1`` ints when every value is 0 or 1 (correctness), else
    floats rounded to 5 significant digits (far finer than any effect the intervals resolve)."""
    arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    if np.isin(arr, (0.0, 1.0)).all():
        return arr.astype(np.int64).tolist()
    return [float(f"{v:.5g}") for v in arr]


def without_items(arms: Mapping[str, Mapping[int, Mapping]]) -> dict:
    """``arms`` with every cell's per-item ``items`` dropped (for a report's ``results.json``; the per-item
    values stay in each cell's ``result.json``)."""
    return {arm: {seed: {k: v for k, v in r.items() if k != "items"} for seed, r in cells.items()}
            for arm, cells in arms.items()}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def metric_matrix(cells: Mapping[int, Mapping], metric: str, scale: float = 1.0) -> np.ndarray:
    """``[seeds, items]`` of ``metric`` over one arm's cells ``{seed: result}``, in seed order.

    A metric is looked up in ``result["items"]`` (one value per eval item) and then in ``result`` itself (one
    value per cell).
    """
    rows = []
    for seed in sorted(cells):
        result = cells[seed]
        value = result.get("items", {}).get(metric, result.get(metric))
        if value is None:
            raise KeyError(f"metric {metric!r} is missing from the result of seed {seed}")
        rows.append(np.atleast_1d(np.asarray(value, dtype=np.float64)) * scale)
    if len({r.shape for r in rows}) > 1:
        raise ValueError(f"metric {metric!r} has a different number of items in different seeds")
    return np.stack(rows)


def decide(claims: Sequence[Claim], arms: Mapping[str, Mapping[int, Mapping]], *, n_boot: int = 4000
           ) -> list[Verdict]:
    """A verdict for every claim; Holm's correction runs over the confirmatory ones only.

    Args:
        arms: ``{arm: {seed: result}}``; each claim pairs the seeds its two arms share.
    """
    effects = []
    for claim in claims:
        if claim.a not in arms or claim.b not in arms:
            raise KeyError(f"claim {claim.name!r} compares arms {claim.a!r} and {claim.b!r}; ran {sorted(arms)}")
        seeds = sorted(set(arms[claim.a]) & set(arms[claim.b]))
        a = metric_matrix({s: arms[claim.a][s] for s in seeds}, claim.metric, claim.scale)
        b = metric_matrix({s: arms[claim.b][s] for s in seeds}, claim.metric, claim.scale)
        effects.append(paired_effect(a, b, direction=claim.direction, margin=claim.margin, n_boot=n_boot))
    confirmatory = [i for i, c in enumerate(claims) if c.confirmatory]
    adjusted = dict(zip(confirmatory, holm([effects[i].p for i in confirmatory])))
    out = []
    for i, (claim, effect) in enumerate(zip(claims, effects)):
        p_adj = adjusted.get(i, effect.p)
        out.append(Verdict(claim, effect, p_adj, _word(claim, effect, p_adj)))
    return out


def _word(claim: Claim, e: Effect, p_adj: float) -> str:
    if e.seeds < MIN_SEEDS:
        return "not resolved"
    if claim.direction == 0:
        if p_adj < ALPHA:
            return "reproduced"
        if e.lo > claim.margin or e.hi < -claim.margin:
            return "contradicted"
        return "not resolved"
    if p_adj < ALPHA:
        return "reproduced" if math.copysign(1, e.mean) == claim.direction else "contradicted"
    return "not resolved"


def verdict_table(verdicts: Sequence[Verdict], digits: int = 2) -> str:
    """A markdown table: claim, kind, expected, Δ [95% CI], p (Holm-adjusted for confirmatory), verdict."""
    lines = ["| claim | kind | paper predicts | Δ = a − b [95% CI] | seeds × items | p (adj.) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        c, e = v.claim, v.effect
        expect = {1: "Δ > 0", -1: "Δ < 0", 0: f"\\|Δ\\| < {c.margin:g}{c.unit}"}[c.direction]
        word = f"**{v.verdict}**" if v.verdict != "not resolved" else f"not resolved; {v.explanation()}"
        lines.append(
            f"| {c.text} | {'confirmatory' if c.confirmatory else 'exploratory'} | {expect} | "
            f"{e.mean:+.{digits}f} [{e.lo:+.{digits}f}, {e.hi:+.{digits}f}]{c.unit} | {e.seeds} × {e.items} | "
            f"{v.p_adjusted:.3g} | {word} |"
        )
    return "\n".join(lines)


def verdict_json(verdicts: Sequence[Verdict]) -> list[dict]:
    """The verdicts as JSON-able dicts (for ``results.json``)."""
    return [{"claim": v.claim.name, "text": v.claim.text, "a": v.claim.a, "b": v.claim.b,
             "metric": v.claim.metric, "direction": v.claim.direction, "margin": v.claim.margin,
             "confirmatory": v.claim.confirmatory, "mean": v.effect.mean, "lo": v.effect.lo, "hi": v.effect.hi,
             "p": v.effect.p, "p_adjusted": v.p_adjusted, "seeds": v.effect.seeds, "items": v.effect.items,
             "verdict": v.verdict} for v in verdicts]
