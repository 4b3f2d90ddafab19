"""Settings-hashed cells and the grid runner every study uses.

A :class:`Cell` is one unit of work: one arm of a study at one seed, under settings that fix everything its
result depends on. Its directory name carries a hash of the study, the arm and the settings, so two runs
with different settings (a smoke run and a powered one, say) never share a result. :func:`run_grid` runs
the cells that have no result yet in worker processes, one thread each, and writes each result atomically
when the cell finishes: a killed study loses at most the cells in flight, and those resume from their own
training checkpoints.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clusterformers.checkpoint import write_json

log = logging.getLogger(__name__)

RESULT = "result.json"
_PR_SET_PDEATHSIG = 1
RunCell = Callable[["Cell", Path], dict]


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


@dataclass(frozen=True)
class Cell:
    """One arm of a study at one seed.

    Args:
        study: the study's name (the first directory level), e.g. ``"fare"``.
        arm: what is compared, e.g. ``"info_nce"``; cells of one arm differ only in ``seed``.
        seed: the paired seed (initialisation, data order, augmentations).
        settings: every setting the result depends on, JSON-serialisable; hashed into the directory name.
    """

    study: str
    arm: str
    seed: int
    settings: Mapping = field(default_factory=dict, hash=False, compare=False)

    @property
    def digest(self) -> str:
        """Ten hex digits of SHA-1 over the study, the arm and the settings (not the seed)."""
        key = _canonical({"study": self.study, "arm": self.arm, "settings": self.settings})
        return hashlib.sha1(key.encode()).hexdigest()[:10]

    def path(self, root: Path) -> Path:
        """``root / study / <arm>-<digest> / seed<seed>``."""
        return Path(root) / self.study / f"{self.arm}-{self.digest}" / f"seed{self.seed}"

    def __hash__(self) -> int:
        return hash((self.study, self.arm, self.seed, self.digest))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and (self.study, self.arm, self.seed, self.digest) == (
            other.study, other.arm, other.seed, other.digest)


def load_result(cell: Cell, root: Path) -> dict | None:
    """The finished result of ``cell`` under ``root``, or ``None`` if it has not finished."""
    path = cell.path(root) / RESULT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to rerun that cell") from err


def load_cells(root: Path, study: str) -> dict[str, dict[int, dict]]:
    """Every finished cell of ``study`` under ``root``, with its per-item values: ``{arm: {seed: result}}``
    (all settings; an arm that ran under two settings appears once per setting, the later overwriting)."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(Path(root, study).glob(f"*/seed*/{RESULT}")):
        cell = json.loads((path.parent / "cell.json").read_text())
        out.setdefault(cell["arm"], {})[int(cell["seed"])] = json.loads(path.read_text())
    return out


def run_one(run_cell: RunCell, cell: Cell, root: Path) -> dict:
    """Run ``cell`` (unless finished) and write its result; what each worker process executes."""
    done = load_result(cell, root)
    if done is not None:
        return done
    path = cell.path(root)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "cell.json", {"study": cell.study, "arm": cell.arm, "seed": cell.seed,
                                    "settings": cell.settings})
    started = time.time()
    result = run_cell(cell, path)
    result = {**result, "cell_wall_s": time.time() - started}
    write_json(path / RESULT, result)
    return result


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    if sys.platform.startswith("linux"):  # a worker dies with the study process instead of finishing its cell
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_grid(
    cells: Sequence[Cell],
    run_cell: RunCell,
    root: Path,
    *,
    workers: int = 2,
    threads: int = 1,
    desc: str = "cells",
) -> dict[Cell, dict]:
    """Every cell's result, running those without one.

    Args:
        cells: the grid (duplicates are run once).
        run_cell: ``run_cell(cell, cell_dir) -> dict`` (JSON-serialisable); a module-level function, so
            worker processes can import it. It must be deterministic given the cell and may resume from
            files it left in ``cell_dir``.
        root: the study's output root.
        workers: worker processes; ``<= 1`` runs in this process (the torch thread count is left alone).
        threads: torch threads per worker process.

    On an exception or interrupt the cells in flight are abandoned and the error is raised; every finished
    cell is already on disk, so rerunning the same command continues where it stopped.
    """
    unique = list(dict.fromkeys(cells))
    results: dict[Cell, dict] = {}
    todo = []
    for cell in unique:
        done = load_result(cell, root)
        if done is None:
            todo.append(cell)
        else:
            results[cell] = done
    if todo:
        log.info("%s: %d of %d cells to run (%d finished earlier)", desc, len(todo), len(unique), len(results))
    bar = tqdm(total=len(todo), desc=desc, unit="cell", disable=not todo)
    try:
        if workers <= 1 or len(todo) <= 1:
            for cell in todo:
                bar.set_postfix_str(f"{cell.arm} seed {cell.seed}")
                results[cell] = run_one(run_cell, cell, root)
                bar.update()
        else:
            _run_parallel(todo, run_cell, root, workers, threads, results, bar)
    finally:
        bar.close()
    return {cell: results[cell] for cell in unique}


def _run_parallel(
    todo: list[Cell], run_cell: RunCell, root: Path, workers: int, threads: int, results: dict[Cell, dict],
    bar: tqdm,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                               initargs=(threads,))
    pending: dict[Future, Cell] = {}
    try:
        pending = {pool.submit(run_one, run_cell, cell, root): cell for cell in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = pending.pop(fut)
                try:
                    results[cell] = fut.result()
                except Exception as err:
                    raise RuntimeError(f"cell {cell.study}/{cell.arm} seed {cell.seed} failed "
                                       f"(its directory: {cell.path(root)}): {err}") from err
                bar.update()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
