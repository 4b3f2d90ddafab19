"""AC-MoE language-model study: byte-level and word-level MoE language models on the Wikipedia sample.

Switch-style causal transformer whose every FFN is an MoE (AC from the second MoE layer on), trained on the
contiguous 90/5/5 split of the cleaned article text shipped with gensim. Byte level reports bits per
character (bits per UTF-8 byte of the cleaned text, the enwik8 convention; *not* the raw XML that enwik8
is), word level reports perplexity, clean and with 2.5% of the content words of the test split replaced by
``<unk>`` (models trained on clean text). Validation loss is evaluated along training on a fixed slice of the
validation split, which gives the convergence curves and the steps AC needs to reach each baseline's final
validation loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.data.text import TokenCorpus, eval_windows, random_windows, word_swap
from clusterformers.experiments.acmoe_common import (
    ARMS,
    ac_stats,
    eval_curve,
    fmt_steps,
    shared_init,
    steps_to_reach,
    train_cell,
)
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.report import Section, fmt, fmt_diff, line_figure, markdown_table
from clusterformers.train import TrainConfig

LEVELS = ("byte", "word")


@dataclass
class LmStudy:
    """Sizes and budget of the language-model study, per level; every arm gets the same."""

    arms: tuple[str, ...] = ("smoe", "xmoe", "stablemoe", "ac")
    levels: tuple[str, ...] = LEVELS
    depth: int = 4
    dim: int = 128
    num_heads: int = 4
    num_experts: int = 8
    k: int = 2
    expert_hidden: int = 256
    dropout: float = 0.1
    byte_context: int = 128
    word_context: int = 64
    batch_size: int = 32
    steps: int = 3000
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_points: int = 20
    curve_tokens: int = 32_768
    eval_tokens: int | None = None
    eval_batch: int = 16
    max_vocab: int = 8192
    max_chars: int | None = None
    swap_fraction: float = 0.025

    def context(self, level: str) -> int:
        return self.byte_context if level == "byte" else self.word_context


def build_model(study: LmStudy, level: str, arm: str, vocab_size: int, seed: int) -> TransformerLM:
    def make(name: str) -> TransformerLM:
        cfg = TransformerLMConfig(
            vocab_size=vocab_size, context=study.context(level), dim=study.dim, depth=study.depth,
            num_heads=study.num_heads, mlp_ratio=study.expert_hidden / study.dim, dropout=study.dropout,
            ffn="moe", ffn_kwargs={"num_experts": study.num_experts, "top_k": study.k, **ARMS[name]},
        )
        return TransformerLM(cfg)

    torch.manual_seed(seed)
    return shared_init(make(arm), lambda: make("stablemoe"), seed)


@torch.no_grad()
def target_nll(model: nn.Module, tokens: Tensor, context: int, device: torch.device, bs: int) -> Tensor:
    """Next-token NLL of every target of ``tokens[1:]`` in non-overlapping windows (batch statistics of
    ``bs`` windows for AC); returns ``[len(tokens) - 1]`` on the CPU."""
    model.eval()
    out = []
    with ac_stats(model, "batch"):
        for x, y in eval_windows(tokens, context, bs):
            logits = model(x.to(device))
            out.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none").cpu())
    return torch.cat(out)


def run_cell(study: LmStudy, level: str, arm: str, seed: int, cell_dir: Path, device: torch.device,
             corpus: TokenCorpus) -> dict:
    """Train one (level, arm, seed) LM and evaluate it; returns a JSON-able dict (losses in nats/token)."""
    context = study.context(level)
    model = build_model(study, level, arm, corpus.vocab_size, seed)
    train_tokens = corpus.train
    curve_tokens = corpus.valid[: study.curve_tokens + 1]

    def batch_fn(step: int, rank: int = 0, world: int = 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank)
        return random_windows(train_tokens, study.batch_size // world, context, gen)

    def loss_fn(net, batch):
        x, y = batch
        return F.cross_entropy(net(x).flatten(0, 1), y.flatten()), {}

    def eval_fn(net):
        return {"val_loss": float(target_nll(net, curve_tokens, context, device, study.eval_batch).mean())}

    every = max(1, study.steps // study.eval_points)
    tcfg = TrainConfig(steps=study.steps, lr=study.lr, weight_decay=study.weight_decay,
                       warmup_steps=max(1, study.steps // 20), schedule="cosine", log_every=every,
                       eval_every=every, ckpt_every=max(1, study.steps // 4), seed=seed, device=str(device),
                       progress=False, name=f"lm-{level}/{arm}/seed{seed}")
    config = {"study": asdict(study), "level": level, "arm": arm, "moe": ARMS[arm], "seed": seed}
    res = train_cell(model, loss_fn, batch_fn, tcfg, cell_dir, config, eval_fn)
    steps, curve = eval_curve(res.history, "val_loss")
    valid, test = corpus.valid, corpus.test
    if study.eval_tokens:
        valid, test = valid[: study.eval_tokens + 1], test[: study.eval_tokens + 1]
    result = {
        "curve_steps": steps,
        "curve": curve,
        "valid_loss": float(target_nll(model, valid, context, device, study.eval_batch).mean()),
        "test_loss": float(target_nll(model, test, context, device, study.eval_batch).mean()),
    }
    if level == "word":
        corrupted, _ = word_swap(test, corpus.vocab, study.swap_fraction, seed=0)
        result["swap_loss"] = float(target_nll(model, corrupted, context, device, study.eval_batch).mean())
    return result


def _metric(level: str, loss: float) -> float:
    return loss / math.log(2) if level == "byte" else math.exp(loss)


def _diff(level: str, key: str, ours: list[dict], theirs: list[dict], digits: int) -> str:
    return fmt_diff([_metric(level, r[key]) for r in ours], [_metric(level, r[key]) for r in theirs], digits)


def section(study: LmStudy, level: str, cells: dict[str, list[dict]], corpus_info: str, out: Path) -> Section:
    arms = list(cells)
    unit = "BPC" if level == "byte" else "PPL"
    digits = 3 if level == "byte" else 1
    n_seeds = len(cells[arms[0]])
    header = ["arm", f"valid {unit}", f"test {unit}"]
    if level == "word":
        header.append(f"test PPL, {study.swap_fraction * 100:g}% word swap")
    rows = []
    for a in arms:
        rs = cells[a]
        row = [a, fmt([_metric(level, r["valid_loss"]) for r in rs], digits),
               fmt([_metric(level, r["test_loss"]) for r in rs], digits)]
        if level == "word":
            row.append(fmt([_metric(level, r["swap_loss"]) for r in rs], digits))
        rows.append(row)
    what = ("bits per character (UTF-8 byte) of the cleaned article text — not the raw XML of enwik8"
            if level == "byte" else f"perplexity, vocabulary top-{study.max_vocab} words + `<unk>`, `<eos>`")
    md = [f"{level.capitalize()}-level causal MoE LM: {study.depth} layers, d={study.dim}, {study.num_heads} heads, "
          f"every FFN an MoE (E={study.num_experts}, k={study.k}, experts d→{study.expert_hidden}→d; AC from the "
          f"2nd MoE layer), context {study.context(level)}, batch {study.batch_size}, {study.steps} AdamW steps "
          f"(lr {study.lr:g}, cosine); {corpus_info}. Metric: {what}. Mean ± std over {n_seeds} paired seeds; "
          f"batch statistics at evaluation ({study.eval_batch} windows per batch).\n",
          markdown_table(header, rows), ""]
    if level == "word":
        md += [f"Word swap: {study.swap_fraction * 100:g}% of the test split's content words (not stop words, "
               "punctuation or `<eos>`; fixed seed, the same for every model) become `<unk>`. `<unk>` is a frequent "
               "training token, so the swapped text can score a lower perplexity than the clean one: compare arms "
               "within the column.\n"]
    reach: dict[str, dict[str, list[int | None]]] = {}
    for a in (x for x in arms if x.startswith("ac")):
        reach[a] = {}
        for base in (b for b in arms if not b.startswith("ac")):
            reach[a][base] = [steps_to_reach(r["curve_steps"], r["curve"], b["curve"][-1])
                              for r, b in zip(cells[a], cells[base], strict=True)]
    if reach:
        md.append(f"**Convergence**: the step at which AC's validation loss (evaluated every "
                  f"{study.steps // study.eval_points} steps on {study.curve_tokens:,} validation tokens) first "
                  "reaches each baseline's final validation loss, per seed (median over the seeds that do):\n")
        md.append(markdown_table(["AC arm", *[f"to {b}'s final" for b in reach[next(iter(reach))]]],
                                 [[a, *[fmt_steps(v, study.steps) for v in per.values()]] for a, per in reach.items()]))
        md.append("")
        md.append(f"**Paired differences** ({unit}), 95% t-intervals:\n")
        for a in reach:
            for base in ("stablemoe", "smoe"):
                if base not in cells:
                    continue
                line = f"- {a} − {base}: test {_diff(level, 'test_loss', cells[a], cells[base], digits + 1)}"
                if level == "word":
                    line += f"; word swap {_diff(level, 'swap_loss', cells[a], cells[base], digits + 1)}"
                md.append(line)
    path = out / "figures" / f"acmoe_lm_{level}_curves.png"
    scale = 1 / math.log(2) if level == "byte" else 1.0
    line_figure(path, cells[arms[0]][0]["curve_steps"],
                {a: [[v * scale for v in r["curve"]] for r in cells[a]] for a in arms}, xlabel="step",
                ylabel="validation bits/char" if level == "byte" else "validation loss (nats/token)",
                title=f"{level}-level MoE LM: validation curves")
    return Section(f"AC-MoE — {level}-level MoE LM on the Wikipedia sample", "\n".join(md) + "\n",
                   [str(path.relative_to(out))], {"cells": cells, "steps_to_baseline_final": reach})
