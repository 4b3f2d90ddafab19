"""Markdown tables, summaries and matplotlib figures for a run directory (the statistics behind verdicts
are in ``experiments.claims``).

Every experiment returns a :class:`Section`; :func:`write_report` joins them into ``report.md``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Section:
    """One experiment's part of the report: markdown text, figure paths (relative to the run dir), results."""

    title: str
    markdown: str
    figures: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` of ``values × scale``."""
    m, s = mean_std([v * scale for v in values])
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def line_figure(
    path: Path,
    x: Sequence[float],
    series: dict[str, list[Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
) -> None:
    """Mean ± std bands over seeds: ``series[name]`` is a list (one per seed) of y values aligned with ``x``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, per_seed in series.items():
        cols = list(zip(*per_seed))
        means = [mean_std(c)[0] for c in cols]
        stds = [mean_std(c)[1] for c in cols]
        ax.plot(x, means, marker="o", ms=3, label=name)
        ax.fill_between(x, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, sections: Sequence[Section], *, header: str) -> Path:
    """Write ``report.md`` (the sections in order) and ``results.json`` (their results) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [header]
    for sec in sections:
        parts.append(f"## {sec.title}\n\n{sec.markdown.strip()}\n")
        parts += [f"![{Path(f).stem}]({f})\n" for f in sec.figures]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    (out_dir / "results.json").write_text(json.dumps({s.title: s.results for s in sections}, indent=1))
    return path


def section_verdicts(sections: Sequence[Section]) -> list[dict]:
    """Every verdict (``experiments.claims.verdict_json`` rows) the sections carry."""
    return [v for sec in sections for v in sec.results.get("verdicts", [])]


def beside_committed(paper: str, sections: Sequence[Section], committed: Path) -> Section | None:
    """A smoke run's effects beside the committed powered run's (``committed/<paper>/results.json``), claim by
    claim; ``None`` when nothing is committed for ``paper``."""
    path = Path(committed) / paper / "results.json"
    if not path.exists():
        return None
    committed_results = json.loads(path.read_text()).values()
    powered = {v["claim"]: v for results in committed_results for v in results.get("verdicts", [])}
    rows = []
    for v in section_verdicts(sections):
        p = powered.get(v["claim"])
        theirs = (f"{p['mean']:+.3g} [{p['lo']:+.3g}, {p['hi']:+.3g}] ({p['seeds']} seeds)", f"**{p['verdict']}**"
                  if p["verdict"] != "not resolved" else p["verdict"]) if p else ("–", "not in the committed run")
        rows.append([v["text"], "confirmatory" if v["confirmatory"] else "exploratory",
                     f"{v['mean']:+.3g} ({v['seeds']} seeds)", *theirs])
    md = (f"This smoke run decides no claim: it has few seeds, far shorter training and settings of its own. Its "
          f"effects sit beside those of the committed powered run (`results/{paper}/report.md` in the "
          "repository, with that run's settings), whose verdicts are the evidence:\n\n"
          + markdown_table(["claim", "kind", "smoke run Δ", "powered run Δ [95% CI]", "powered verdict"], rows))
    return Section(f"{paper}: smoke run beside the committed results", md, [], {})
