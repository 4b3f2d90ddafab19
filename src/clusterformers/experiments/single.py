"""One training run from the command line (``clusterformers train lm|vit``), on shipped or user data."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.train import TrainConfig, resolve_device, train


def _ffn(args: argparse.Namespace) -> tuple[str, dict]:
    """Map ``--moe`` to the models' FFN fields."""
    if args.moe in ("none", "dense"):
        return "dense", {}
    if args.moe == "softmoe":
        return "softmoe", {}
    return "moe", {"router": "stablemoe" if args.moe == "ac" else args.moe, "ac": "lm" if args.moe == "ac" else None}


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/train/{args.model}-{args.attention}-{args.moe}")


def train_vit(args: argparse.Namespace) -> dict:
    """Train a ViT on MNIST-5k (or the user's ``.npz``) and report test accuracy."""
    from clusterformers.data.images import load_npz, mnist5k_split, stratified_split
    from clusterformers.models.vit import ViT, ViTConfig

    if args.data:
        images, labels = load_npz(args.data)
        tr, te = stratified_split(labels, test_size=0.2, seed=0)
        x_tr, y_tr, x_te, y_te = images[tr], labels[tr], images[te], labels[te]
    else:
        x_tr, y_tr, x_te, y_te = mnist5k_split()

    def to_tensor(x):
        t = torch.from_numpy(x).float().div(255)
        return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)

    x_tr, x_te = to_tensor(x_tr), to_tensor(x_te)
    y_tr, y_te = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    ffn, ffn_kwargs = _ffn(args)
    torch.manual_seed(args.seed)
    cfg = ViTConfig(image_size=x_tr.shape[-1], in_chans=x_tr.shape[1], num_classes=int(y_tr.max()) + 1,
                    patch_size=7 if x_tr.shape[-1] % 7 == 0 else 4, attention=args.attention,
                    estimator=args.estimator, ffn=ffn, ffn_kwargs=ffn_kwargs)
    model = ViT(cfg)
    bs = args.batch_size or 128
    batch_fn, spe = epoch_batch_fn((x_tr, y_tr), bs, args.seed)
    device = resolve_device(args.device)

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean().item()}

    @torch.no_grad()
    def eval_fn(model):
        correct = sum(
            (model(x.to(device)).argmax(-1) == y.to(device)).sum().item() for x, y in batches((x_te, y_te), 500)
        )
        return {"test_acc": correct / len(y_te)}

    tcfg = TrainConfig(steps=args.epochs * spe, lr=args.lr, weight_decay=0.05, warmup_steps=spe, log_every=spe,
                       eval_every=spe, ckpt_every=spe, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    res = train(model, loss_fn, batch_fn, tcfg, out_dir=_run_dir(args), eval_fn=eval_fn, resume=args.resume)
    return {"run_dir": str(_run_dir(args)), "steps": res.step, **res.eval}


def train_lm(args: argparse.Namespace) -> dict:
    """Train a causal LM on the Wikipedia sample (or the user's text file) and report perplexity."""
    from clusterformers.data.text import build_corpus, random_windows
    from clusterformers.experiments.elliptical import lm_target_nll
    from clusterformers.models.transformer import TransformerLM, TransformerLMConfig

    corpus = build_corpus(args.level, path=args.data)
    ffn, ffn_kwargs = _ffn(args)
    torch.manual_seed(args.seed)
    context = 128
    cfg = TransformerLMConfig(vocab_size=corpus.vocab_size, context=context, attention=args.attention,
                              estimator=args.estimator, ffn=ffn, ffn_kwargs=ffn_kwargs)
    model = TransformerLM(cfg)
    bs = args.batch_size or 32
    device = resolve_device(args.device)

    def batch_fn(step: int, rank: int = 0, world: int = 1):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + rank)
        return random_windows(corpus.train, bs // world, context, gen)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()), {}

    def eval_fn(model):
        nll = lm_target_nll(model, corpus.valid[: 200 * context], context, device).mean().item()
        key = "valid_bpc" if args.level == "byte" else "valid_ppl"
        return {key: nll / math.log(2) if args.level == "byte" else math.exp(nll)}

    every = max(1, args.steps // 10)
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=0.01, warmup_steps=every, log_every=every,
                       eval_every=every, ckpt_every=every, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    res = train(model, loss_fn, batch_fn, tcfg, out_dir=_run_dir(args), eval_fn=eval_fn, resume=args.resume)
    return {"run_dir": str(_run_dir(args)), "steps": res.step, **res.eval}
