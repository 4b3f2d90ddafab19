"""What causal AC statistics cost: a byte-level MoE LM with the AC router on running statistics (the causal
default) against the papers' batch statistics (and ema), 3 paired seeds, and each model's leak figures.

usage: python docs/evidence/ac_causal.py OUT_DIR WORKER/WORKERS [STEPS]
(e.g. two workers: ``... out 0/2 1000 & ... out 1/2 1000``); each (arm, seed) cell writes OUT_DIR/<arm>-seed<s>.json
and is skipped when present, so an interrupted run resumes. ``ac_causal.json`` beside this file holds the
cells of the run quoted in docs/acmoe.md.
"""

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterformers.data.text import build_corpus, eval_windows, random_windows
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.train import TrainConfig, train

torch.set_num_threads(1)
ARMS = {
    "stablemoe": {"router": "stablemoe"},
    "ac-batch": {"router": "ac", "ac": {"preset": "lm", "stats": "batch"}},
    "ac-ema": {"router": "ac", "ac": {"preset": "lm", "stats": "ema"}},
    "ac-running": {"router": "ac", "ac": {"preset": "lm", "stats": "running"}},
}
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
BS, CTX, SEEDS = 16, 64, 3


def model_for(arm: str, seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = TransformerLMConfig(vocab_size=256, context=CTX, dim=64, depth=3, num_heads=4, mlp_ratio=2.0, dropout=0.0,
                              ffn="moe", ffn_kwargs={"num_experts": 8, "top_k": 2, **ARMS[arm]})
    return TransformerLM(cfg)


@torch.no_grad()
def bits_per_byte(model: TransformerLM, tokens: torch.Tensor, bs: int = 32) -> float:
    """Mean next-byte NLL in bits over non-overlapping windows, ``bs`` windows per batch."""
    model.eval()
    nll = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none") for x, y in
           eval_windows(tokens, CTX, bs)]
    return torch.cat(nll).mean().item() / math.log(2)


def leaks(model: TransformerLM) -> dict:
    """Max logit change at positions < CTX/2 when later bytes change (future), and of sequence 0 when its
    batch-mates change, in train and eval mode; each forward on a copy, so no statistic moves in between."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (8, CTX), generator=g)
    b, c = a.clone(), a.clone()
    b[:, CTX // 2 :] = torch.randint(0, 256, (8, CTX // 2), generator=g)
    c[1:] = torch.randint(0, 256, (7, CTX), generator=g)
    res = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            ya, yb, yc = (copy.deepcopy(model)(x) for x in (a, b, c))
        res[mode] = {"future": (ya[:, : CTX // 2] - yb[:, : CTX // 2]).abs().max().item(),
                     "batchmates": (ya[0] - yc[0]).abs().max().item()}
    return res


def cell(corpus, arm: str, seed: int, out: Path) -> None:
    path = out / f"{arm}-seed{seed}.json"
    if path.exists():
        return
    model = model_for(arm, seed)

    def batch_fn(step, rank=0, world=1):
        return random_windows(corpus.train, BS, CTX, torch.Generator().manual_seed(seed * 1_000_003 + step * 7919))

    def loss_fn(net, batch):
        x, y = batch
        return F.cross_entropy(net(x).flatten(0, 1), y.flatten()), {}

    t0 = time.time()
    cfg = TrainConfig(steps=STEPS, lr=2e-3, warmup_steps=min(30, STEPS), schedule="cosine", log_every=STEPS,
                      seed=seed, device="cpu", progress=False)
    train(model, loss_fn, batch_fn, cfg)
    res = {"arm": arm, "seed": seed, "steps": STEPS, "test_bpc": bits_per_byte(model, corpus.test[:32769]),
           "valid_bpc": bits_per_byte(model, corpus.valid[:32769]), "leaks_after_training": leaks(model),
           "train_s": time.time() - t0}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    worker, workers = map(int, sys.argv[2].split("/"))
    corpus = build_corpus("byte", max_chars=1_000_000)
    jobs = [(a, s) for s in range(SEEDS) for a in ARMS]
    for i, (a, s) in enumerate(jobs):
        if i % workers == worker:
            cell(corpus, a, s, out)
