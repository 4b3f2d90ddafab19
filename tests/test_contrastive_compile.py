"""The five contrastive losses under ``torch.compile(fullgraph=True)`` with ``check_inputs=False`` (CPU).

Compiled and eager agree on the loss and the gradients; new data of the same shape reuses the graph (a
recompile raises: ``torch._dynamo.config.error_on_recompile``); without value checks the eager forward and
backward read no tensor on the host (no ``aten._local_scalar_dense``, which ``.item()``, ``bool()``, ``int()``
and ``float()`` of a tensor dispatch to).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from host_reads import HostReads  # tests/host_reads.py: the tests folder is on sys.path

from clusterformers.contrastive import (
    CCLKLoss,
    FairInfoNCELoss,
    FARELoss,
    GridDiscretizer,
    InfoNCELoss,
    KMeansDiscretizer,
    SparseFARELoss,
    sparse,
)

B, D, S = 32, 16, 3
ATOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(seed: int, groups: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=g).requires_grad_(True)
    z2 = torch.randn(B, D, generator=g).requires_grad_(True)
    sensitive = torch.randint(0, S, (B,), generator=g) if groups else torch.rand(B, S, generator=g)
    return z1, z2, sensitive


def _step(loss_fn, z1, z2, sensitive, seed):
    torch.manual_seed(seed)  # SparseFARE's training-mode projections come from the global RNG
    loss = loss_fn(z1, z2, sensitive)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [z1, z2, *params])


def _check_compiled(make, groups: bool, backend: str, calls: int = 4) -> None:
    """Eager vs ``torch.compile(fullgraph=True)`` on ``calls`` batches; every call after the first must reuse
    the first graph. The compiled module is a copy, so module state (running statistics) evolves alike."""
    eager = make()
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=backend)
    for i in range(calls):
        z1, z2, sensitive = _batch(i, groups)
        want, want_grads = _step(eager, z1, z2, sensitive, i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_grads = _step(compiled, z1, z2, sensitive, i)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        for g_got, g_want in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=0)
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(dict(compiled_mod.named_buffers())[name], buf, atol=ATOL, rtol=0)


FIVE = {
    "info_nce": (lambda: InfoNCELoss(check_inputs=False), False),
    "fair_info_nce": (lambda: FairInfoNCELoss(check_inputs=False), True),
    "cclk": (lambda: CCLKLoss(check_inputs=False), False),
    "fare": (lambda: FARELoss(S, check_inputs=False), False),
    "sparse_fare": (lambda: SparseFARELoss(S, check_inputs=False), False),  # impl="sorted", training mode
}


@pytest.mark.parametrize("name", list(FIVE))
def test_inductor_fullgraph_matches_eager_without_recompiles(name):
    make, groups = FIVE[name]
    # fallback_random: compiled code draws SparseFARE's projections with the eager RNG, so both see one set.
    # vec_isa_ok=False: scalar C++ kernels, about half the g++ time of vectorised ones on 2 cores; the traced
    # graph, guards and lowering are the same (and a data-dependent-shape miscompile of PyTorch 2.13 that the
    # sorted SparseFARE path had to avoid shows up with scalar kernels too).
    with torch._inductor.config.patch({"fallback_random": True, "cpp.vec_isa_ok": False}):
        _check_compiled(make, groups, backend="inductor")


def _eval_sparse(**kwargs):
    return SparseFARELoss(S, check_inputs=False, **kwargs).eval()


def _eval_sparse_bucket_size():
    loss_fn = _eval_sparse(bucket_size=8)  # n_b = 4 at b = 32
    loss_fn.eval_rotations(4)  # drawn with a torch.Generator, so before compiling (an eager call does the same)
    return loss_fn


VARIANTS = {
    "cclk_rbf_median_bandwidth": (lambda: CCLKLoss(kernel="rbf", check_inputs=False), False),
    "cclk_int_groups": (lambda: CCLKLoss(check_inputs=False), True),
    "fair_info_nce_kmeans": (
        lambda: FairInfoNCELoss(discretizer=KMeansDiscretizer(4).fit(torch.rand(64, S)), check_inputs=False),
        False,
    ),
    "fair_info_nce_grid": (
        lambda: FairInfoNCELoss(discretizer=GridDiscretizer([[0.5]] * S), check_inputs=False),
        False,
    ),
    "fare_int_groups_running": (lambda: FARELoss(S, z_norm="running", check_inputs=False), True),
    "sparse_fare_dense_multiprobe": (
        lambda: SparseFARELoss(S, impl="dense", n_hashes=2, neighbours=1, check_inputs=False),
        False,
    ),
    "sparse_fare_sorted_eval_bucket_size": (_eval_sparse_bucket_size, False),
    "sparse_fare_sorted_int_groups": (lambda: SparseFARELoss(S, check_inputs=False), True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_trace_fullgraph_without_recompiles(name):
    """Other code paths, traced by dynamo and AOT autograd (``aot_eager``: no inductor codegen, fast)."""
    make, groups = VARIANTS[name]
    _check_compiled(make, groups, backend="aot_eager", calls=3)


def test_sparse_fare_sorted_bucket_sizes_change_between_reused_calls():
    """The sorted plan's tile count is data-dependent; the eval batches above really differ in it."""
    loss_fn = _eval_sparse()
    from clusterformers.contrastive.fare_attention import standardize
    from clusterformers.contrastive.lsh import hash_buckets

    counts = set()
    for i in range(3):
        zhat = standardize(_batch(i, False)[2], "batch")
        buckets = hash_buckets(zhat, loss_fn.eval_rotations(4))[0][0]
        counts.add(tuple(torch.bincount(buckets, minlength=4).tolist()))
    assert len(counts) == 3


def test_recompile_check_can_fail():
    """A Python counter on the module (what the losses used to have) recompiles on every call."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * 2

    compiled = torch.compile(Counting(), fullgraph=True, backend="eager")
    compiled(torch.ones(3))
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
        compiled(torch.ones(3))


# ---- return_stats: eager diagnostics path, schedule counts stats calls only ----------------------------------


def test_return_stats_runs_eagerly_inside_a_compiled_module():
    loss_fn = FARELoss(S, check_inputs=False, log_every=2)
    compiled = torch.compile(loss_fn, backend="eager")  # fullgraph=False: the stats call is a graph break
    z1, z2, c = _batch(0, False)
    for _ in range(3):
        compiled(z1, z2, c)  # no stats: the schedule is untouched
    assert loss_fn._calls == 0
    keys = []
    for _ in range(3):
        loss, stats = compiled(z1, z2, c, return_stats=True)
        assert stats["loss"] == pytest.approx(loss.item())
        keys.append("spearman" in stats)
    assert keys == [True, False, True] and loss_fn._calls == 3
    torch._dynamo.reset()  # else the graph-broken frame compiled above is reused
    with pytest.raises(Exception, match="disable"):
        torch.compile(loss_fn, fullgraph=True, backend="eager")(z1, z2, c, return_stats=True)


# ---- no host reads without value checks -----------------------------------------------------------------------


HOST_CASES = {
    "info_nce": (lambda check: InfoNCELoss(check_inputs=check), False),
    "fair_info_nce": (lambda check: FairInfoNCELoss(check_inputs=check), True),
    "fair_info_nce_kmeans": (
        lambda check: FairInfoNCELoss(discretizer=KMeansDiscretizer(3).fit(torch.rand(50, S)), check_inputs=check),
        False,
    ),
    "cclk_rbf": (lambda check: CCLKLoss(kernel="rbf", check_inputs=check), False),
    "cclk_int_groups": (lambda check: CCLKLoss(check_inputs=check), True),
    "fare": (lambda check: FARELoss(S, check_inputs=check), False),
    "fare_int_groups_running": (lambda check: FARELoss(S, z_norm="running", check_inputs=check), True),
    "sparse_fare_dense": (lambda check: SparseFARELoss(S, impl="dense", neighbours=1, check_inputs=check), False),
    "sparse_fare_dense_eval": (lambda check: SparseFARELoss(S, impl="dense", check_inputs=check).eval(), False),
    "sparse_fare_dense_int_groups": (lambda check: SparseFARELoss(S, impl="dense", check_inputs=check), True),
}


@pytest.mark.parametrize("name", list(HOST_CASES))
def test_no_host_reads_without_value_checks(name):
    make, groups = HOST_CASES[name]
    z1, z2, sensitive = _batch(0, groups)
    for check in (False, True):
        loss_fn = make(check)
        with HostReads() as reads:
            loss_fn(z1, z2, sensitive).backward()
        assert (reads.count > 0) == check, (check, reads.count)


def test_sorted_sparse_fare_compiles_to_the_tile_plan_where_eager_walks(monkeypatch):
    """The walk over blocks of anchors (eager, large buckets) loops over a data-dependent list of blocks;
    compiled code takes the tile plan instead, in one graph, with the same loss and gradients."""
    monkeypatch.setattr(sparse, "WALK_MIN_BUCKET", 1)  # every batch counts as one of large buckets
    _check_compiled(lambda: SparseFARELoss(S, check_inputs=False), False, backend="aot_eager", calls=2)
