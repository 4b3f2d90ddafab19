"""One training run from the command line (``clusterformers train lm|vit``), on shipped or user data, and
sampling from a trained language model (``clusterformers generate``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clusterformers.checkpoint import load_checkpoint, write_json
from clusterformers.distributed import setup_distributed
from clusterformers.experiments.common import batches, epoch_batch_fn
from clusterformers.moe import expert_parallel
from clusterformers.train import CONFIG_FILE, TrainConfig, resolve_device, train

VOCAB_FILE = "vocab.json"


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
        classes = np.unique(labels)
        if classes.size == 0:
            raise ValueError(f"{args.data}: no samples (labels is empty)")
        if classes.size != int(classes.max()) + 1:
            raise ValueError(
                f"{args.data}: labels must be the classes 0..C-1, each present; got {classes.size} distinct labels "
                f"with max {int(classes.max())} (a {int(classes.max()) + 1}-class model would be trained); "
                "relabel them with np.unique(labels, return_inverse=True)[1]"
            )
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
    created = False
    if getattr(args, "expert_parallel", False):
        if ffn != "moe":
            raise ValueError(f"--expert-parallel needs --moe with a top-k router (smoe, xmoe, stablemoe, random, "
                             f"ac), got --moe {args.moe}")
        _, _, _, created = setup_distributed(device)  # the group the experts are sharded over
        expert_parallel(model)

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
    run_dir = _run_dir(args)
    if corpus.vocab is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / VOCAB_FILE, corpus.vocab.itos)
    extra = {"model": "lm", "level": args.level, "lm": dataclasses.asdict(cfg)}
    res = train(model, loss_fn, batch_fn, tcfg, out_dir=run_dir, eval_fn=eval_fn, resume=args.resume,
                extra_config=extra)
    if created:
        dist.barrier()  # rank 0 may still be writing the last checkpoint
        dist.destroy_process_group()
    return {"run_dir": str(run_dir), "steps": res.step, **res.eval}


def load_lm(run_dir: str | Path, device: str = "auto") -> tuple[torch.nn.Module, str, list[str] | None]:
    """The language model of a ``clusterformers train lm`` run directory, in eval mode on ``device``.

    Returns ``(model, level, itos)``; ``itos`` is the word vocabulary (None at byte level)."""
    from clusterformers.models.transformer import TransformerLM, TransformerLMConfig

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: pass the run directory of `clusterformers train lm`")
    extra = json.loads(config_path.read_text()).get("extra") or {}
    if extra.get("model") != "lm" or "lm" not in extra:
        raise ValueError(f"{config_path} does not describe a language model run (made by `clusterformers train lm`)")
    model = TransformerLM(TransformerLMConfig(**extra["lm"]))
    load_checkpoint(model, run_dir)
    itos = None
    if extra["level"] == "word":
        vocab_path = run_dir / VOCAB_FILE
        if not vocab_path.exists():
            raise FileNotFoundError(f"{vocab_path} not found: a word-level run keeps its vocabulary there")
        itos = json.loads(vocab_path.read_text())
    return model.to(resolve_device(device)).eval(), extra["level"], itos


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
                  top_k: int | None = 40, seed: int = 0, device: str = "auto") -> str:
    """Continue ``prompt`` with the model of ``run_dir``; returns the prompt and its continuation."""
    from clusterformers.data.text import Vocab, tokenize

    model, level, itos = load_lm(run_dir, device)
    if level == "byte":
        ids = list(prompt.encode("utf-8"))
    else:
        vocab = Vocab(itos)
        ids = vocab.encode(tokenize(prompt)).tolist()
    if not ids:
        raise ValueError("prompt: got no tokens; give some text to continue")
    dev = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator(device=dev).manual_seed(seed))[0].cpu()
    if level == "byte":
        return bytes(out.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
    return " ".join(Vocab(itos).decode(out))
