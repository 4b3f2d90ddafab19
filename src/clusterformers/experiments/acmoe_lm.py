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
from clusterformers.experiments.acmoe_common import arm_options, eval_curve, shared_init, train_cell
from clusterformers.experiments.claims import compact
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.report import Section, fmt, line_figure, markdown_table
from clusterformers.train import TrainConfig

LEVELS = ("byte", "word")


@dataclass
class LmStudy:
    """Sizes and budget of the language-model study, per level; every arm gets the same."""

    arms: tuple[str, ...] = ("stablemoe", "ac")
    levels: tuple[str, ...] = LEVELS
    ac_stats: str = "running"  # causal: each position routes with statistics of earlier steps only
    depth: int = 3
    dim: int = 64
    num_heads: int = 4
    num_experts: int = 8
    k: int = 2
    expert_hidden: int = 128
    dropout: float = 0.0
    byte_context: int = 64
    word_context: int = 64
    batch_size: int = 16
    steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_points: int = 20
    curve_tokens: int = 16_384
    eval_tokens: int | None = 65_536
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
            ffn="moe", ffn_kwargs={"num_experts": study.num_experts, "top_k": study.k,
                                   **arm_options(name, study.ac_stats)},
        )
        return TransformerLM(cfg)

    torch.manual_seed(seed)
    return shared_init(make(arm), lambda: make("stablemoe"), seed)


@torch.no_grad()
def window_nll(model: nn.Module, tokens: Tensor, context: int, device: torch.device, bs: int) -> Tensor:
    """Mean next-token NLL of each full non-overlapping window of ``tokens`` (``[windows]``, CPU), with the AC
    statistics the model is configured with (running ones: causal and batch-independent)."""
    model.eval()
    out = []
    for x, y in eval_windows(tokens, context, bs):
        if x.shape[1] < context:
            break  # the short last window would weigh its few tokens like a full one
        logits = model(x.to(device))
        out.append(F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none").mean(1).cpu())
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
        return {"val_loss": float(window_nll(net, curve_tokens, context, device, study.eval_batch).mean())}

    every = max(1, study.steps // study.eval_points)
    tcfg = TrainConfig(steps=study.steps, lr=study.lr, weight_decay=study.weight_decay,
                       warmup_steps=max(1, study.steps // 20), schedule="cosine", log_every=every,
                       eval_every=every, ckpt_every=max(1, study.steps // 4), seed=seed, device=str(device),
                       progress=False, name=f"lm-{level}/{arm}/seed{seed}")
    config = {"study": asdict(study), "level": level, "arm": arm, "moe": arm_options(arm, study.ac_stats),
              "seed": seed}
    res = train_cell(model, loss_fn, batch_fn, tcfg, cell_dir, config, eval_fn)
    steps, curve = eval_curve(res.history, "val_loss")
    valid, test = corpus.valid, corpus.test
    if study.eval_tokens:
        valid, test = valid[: study.eval_tokens + 1], test[: study.eval_tokens + 1]
    items = {"nll": window_nll(model, test, context, device, study.eval_batch)}
    if level == "word":
        corrupted, _ = word_swap(test, corpus.vocab, study.swap_fraction, seed=0)
        items["swap_excess_nll"] = window_nll(model, corrupted, context, device, study.eval_batch) - items["nll"]
    result = {"curve_steps": steps, "curve": curve,
              "valid_loss": float(window_nll(model, valid, context, device, study.eval_batch).mean()),
              "test_loss": float(items["nll"].mean()), **{k: float(v.mean()) for k, v in items.items()},
              "items": {k: compact(v) for k, v in items.items()}}
    if level == "word":
        result["swap_loss"] = result["test_loss"] + result["swap_excess_nll"]
    return result


def _metric(level: str, loss: float) -> float:
    return loss / math.log(2) if level == "byte" else math.exp(loss)


def section(study: LmStudy, level: str, cells: dict[str, dict[int, dict]], corpus_info: str, out: Path) -> Section:
    """Tables and the validation curves of one level (``cells``: ``{arm: {seed: result}}``)."""
    arms = list(cells)
    unit = "BPC" if level == "byte" else "PPL"
    digits = 3 if level == "byte" else 1
    header = ["arm", "seeds", f"valid {unit}", f"test {unit}"]
    if level == "word":
        header.append(f"test PPL, {study.swap_fraction * 100:g}% word swap")
    rows = []
    for a in arms:
        rs = list(cells[a].values())
        row = [a, len(rs), fmt([_metric(level, r["valid_loss"]) for r in rs], digits),
               fmt([_metric(level, r["test_loss"]) for r in rs], digits)]
        if level == "word":
            row.append(fmt([_metric(level, r["swap_loss"]) for r in rs], digits))
        rows.append(row)
    what = ("bits per character (UTF-8 byte) of the cleaned article text — not the raw XML of enwik8"
            if level == "byte" else f"perplexity, vocabulary top-{study.max_vocab} words + `<unk>`, `<eos>`")
    md = [f"{level.capitalize()}-level causal MoE LM: {study.depth} layers, d={study.dim}, {study.num_heads} heads, "
          f"every FFN an MoE (E={study.num_experts}, k={study.k}, experts d→{study.expert_hidden}→d; AC from the "
          f"2nd MoE layer with `stats={study.ac_stats!r}`, so routing is causal and batch-independent), context "
          f"{study.context(level)}, batch {study.batch_size}, {study.steps} AdamW steps (lr {study.lr:g}, cosine); "
          f"{corpus_info}. Metric: {what}; items of the intervals are test windows.\n",
          markdown_table(header, rows), ""]
    if level == "word":
        md += [f"Word swap: {study.swap_fraction * 100:g}% of the test split's content words (not stop words, "
               "punctuation or `<eos>`; fixed seed, the same for every model) become `<unk>`. `<unk>` is a frequent "
               "training token, so the swapped text can score a lower perplexity than the clean one: compare arms "
               "within the column.\n"]
    path = out / "figures" / f"acmoe_lm_{level}_curves.png"
    scale = 1 / math.log(2) if level == "byte" else 1.0
    first = next(iter(cells[arms[0]].values()))
    line_figure(path, first["curve_steps"],
                {a: [[v * scale for v in r["curve"]] for r in cells[a].values()] for a in arms}, xlabel="step",
                ylabel="validation bits/char" if level == "byte" else "validation loss (nats/token)",
                title=f"{level}-level MoE LM: validation curves")
    return Section(f"AC-MoE — {level}-level MoE LM on the Wikipedia sample", "\n".join(md) + "\n",
                   [str(path.relative_to(out))], {})
