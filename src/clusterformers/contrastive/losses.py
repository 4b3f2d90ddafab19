"""Fair contrastive losses as modules (pytorch-metric-learning style): one base class, five small subclasses.

All five compute :func:`~.nce.weighted_nce`; they differ only in the weights ``W`` of the negatives::

    loss_fn = SparseFARELoss(sensitive_dim=3, temperature=0.1, n_buckets=4)
    loss, stats = loss_fn(z1, z2, sensitive, return_stats=True)     # z1, z2: [b, d]; sensitive: [b, 3]
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()])

``stats`` always holds ``loss``, ``support`` and the row counts ``empty_rows`` / ``fallback_rows``; on every
``log_every``-th call with ``return_stats=True`` (the first included) it also holds the attention diagnostics
``spearman``, ``dist_ratio``, ``entropy``, ``eff_support``, computed without gradient. A ``dist_ratio`` above
1 on three diagnostic calls running logs a warning: the weights then favour the negatives whose attribute
differs most, the opposite of conditioning on it (why this happens: ``docs/fare.md``, "Diagnostics").

``torch.compile``: with ``check_inputs=False`` a call ``loss_fn(z1, z2, sensitive)`` reads no tensor on the
host, so ``torch.compile(loss_fn, fullgraph=True)`` traces forward and backward into one graph, reused as long
as the shapes stay the same (exceptions of :class:`SparseFARELoss` in its docstring). A ``return_stats=True``
call returns Python floats, which reads the device: it always runs eagerly (``torch.compiler.disable``), a graph
break for a compiled module (``fullgraph=True`` raises on it), so ask for stats on logged steps only.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clusterformers.collectives import all_gather_cat
from clusterformers.contrastive import functional as fn
from clusterformers.contrastive.fare_attention import Z_NORMS, check_options
from clusterformers.contrastive.inputs import check_sensitive, compute_dtype, one_hot_groups
from clusterformers.contrastive.kernels import KERNELS
from clusterformers.contrastive.lsh import LSHConfig, draw_rotations
from clusterformers.contrastive.nce import NEGATIVES
from clusterformers.contrastive.sparse import check_impl

logger = logging.getLogger(__name__)

Output = Tensor | tuple[Tensor, dict[str, float]]


class ContrastiveLoss(nn.Module):
    """Base class: common options, the diagnostics schedule and the ``dist_ratio`` warning.

    Args:
        temperature: ``τ`` of the embedding similarities.
        negatives: ``"both"`` (cross- and same-view negatives) or ``"cross"``.
        symmetric: average over both views' anchors.
        check_inputs: check input values: NaN/Inf, negative integer groups, groups outside the one-hot width,
            a singular CCLK system (each a device sync per call). With False the forward reads no tensor on the
            host and compiles into one graph; shapes, dtypes and devices are checked either way.
        log_every: compute the attention diagnostics on every this many calls with ``return_stats=True``, the
            first included (0 = never). Only ``return_stats=True`` calls are counted, so calls without stats
            (compiled or not) leave the schedule alone.
        gather_distributed: under ``torch.distributed`` with more than one process, gather the embeddings
            (with gradients flowing back to each rank's own samples), the sensitive attributes and any bucket
            ids of all ranks, and compute the loss of the global batch on every rank (in rank order). Every
            rank must pass the same batch size (else a ``ValueError`` on every rank). Meant for DDP: each
            rank's embedding gradient is ``world_size`` times the global loss's, which DDP's averaging of
            parameter gradients turns into the global loss's gradient.

    ``forward`` is this class's for every loss; subclasses implement ``_loss(..., return_stats, diagnostics)``.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        negatives: str = "both",
        symmetric: bool = True,
        check_inputs: bool = True,
        log_every: int = 50,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        if log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {log_every}")
        self.temperature, self.negatives, self.symmetric = temperature, negatives, symmetric
        self.check_inputs, self.log_every, self.gather_distributed = check_inputs, log_every, gather_distributed
        self._calls = 0  # return_stats=True calls so far
        self._ratio_streak = 0

    def _common(self) -> dict:
        return {
            "temperature": self.temperature,
            "negatives": self.negatives,
            "symmetric": self.symmetric,
            "check_inputs": self.check_inputs,
        }

    uses_sensitive = True  # False: the loss accepts ``sensitive`` and ignores it (InfoNCE)

    def forward(self, z1: Tensor, z2: Tensor, sensitive: Tensor | None = None, *, return_stats: bool = False,
                **inputs: Tensor | None) -> Output:
        """The loss of the positive pairs ``(z1[i], z2[i])`` (``[b, d]`` each) with their negatives weighted by
        ``sensitive`` (``[b]`` or ``[b, s]``); ``(loss, stats)`` with ``return_stats``. ``inputs``: a loss's
        extra inputs (SparseFARE's ``buckets``)."""
        if not self.uses_sensitive:
            return self._run(z1, z2, return_stats=return_stats, **inputs)
        if sensitive is None:
            raise TypeError(f"{type(self).__name__}: sensitive is required (the attribute the negatives are "
                            "weighted by: integer groups [b] or a float [b, s] attribute)")
        return self._run(z1, z2, sensitive, return_stats=return_stats, **inputs)

    def _loss(self, *args, return_stats: bool, diagnostics: bool, **kwargs) -> Output:
        """The loss of one (gathered) batch: the functional form with this module's settings."""
        raise NotImplementedError

    def _world(self) -> int:
        """The number of processes whose batches this loss gathers (1 without ``gather_distributed``)."""
        if not self.gather_distributed or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size()

    def _run(self, *args, return_stats: bool = False, **kwargs) -> Output:
        """The loss alone (traceable, no Python state touched) or, with ``return_stats``, :meth:`_run_with_stats`."""
        if self._world() > 1:
            args, kwargs = _gather_batch(args, kwargs)
        if not return_stats:
            return self._loss(*args, return_stats=False, diagnostics=False, **kwargs)
        return self._run_with_stats(*args, **kwargs)

    @torch.compiler.disable
    def _run_with_stats(self, *args, **kwargs) -> tuple[Tensor, dict[str, float]]:
        """Eager only: advances the diagnostics schedule, reads the stats on the host, tracks ``dist_ratio``."""
        due = self.log_every > 0 and self._calls % self.log_every == 0
        self._calls += 1
        out = self._loss(*args, return_stats=True, diagnostics=due, **kwargs)
        ratio = out[1].get("dist_ratio")
        if ratio is not None:
            self._ratio_streak = self._ratio_streak + 1 if ratio > 1 else 0
            if self._ratio_streak == 3:
                logger.warning(
                    "%s: dist_ratio > 1 on 3 diagnostic calls running (now %.3f): the negative weights favour "
                    "samples with the most different sensitive attribute (see docs/fare.md, Diagnostics)",
                    type(self).__name__,
                    ratio,
                )
        return out

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, negatives={self.negatives!r}, symmetric={self.symmetric}"


def _gather_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(z1, z2, sensitive, ...)`` and tensor keyword arguments concatenated over the ranks, in rank order;
    the embeddings through an autograd-aware all-gather."""
    z1 = args[0]
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=z1.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([z1.shape[0]], device=z1.device))
    sizes = [int(n) for n in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(f"gather_distributed needs the same batch size on every rank, got {sizes} (by rank)")

    def gather(x: object, grad: bool) -> object:
        if not isinstance(x, Tensor):
            return x
        if grad:
            return all_gather_cat(x)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    gathered = tuple(gather(a, grad=i < 2) for i, a in enumerate(args))
    return gathered, {k: gather(v, grad=False) for k, v in kwargs.items()}


class InfoNCELoss(ContrastiveLoss):
    """InfoNCE / NT-Xent (SimCLR). ``forward(z1, z2, sensitive=None, return_stats=False)``; ``sensitive`` is
    accepted for a uniform signature and ignored. Above ``b = 1024`` it runs in blocks of anchors (memory linear in
    ``b``, see :func:`~.nce.blockwise_nce`), as Fair-InfoNCE and FARE do."""

    uses_sensitive = False

    def _loss(self, z1: Tensor, z2: Tensor, *, return_stats: bool, diagnostics: bool) -> Output:
        return fn.info_nce(z1, z2, return_stats=return_stats, **self._common())


class FairInfoNCELoss(ContrastiveLoss):
    """Fair-InfoNCE: negatives from the anchor's group only.

    Args:
        discretizer: fitted callable float ``[b, s]`` → long ``[b]`` groups; required for float attributes.
            :class:`~.discretize.KMeansDiscretizer` and :class:`~.discretize.GridDiscretizer` are traceable
            (fixed shapes); fit them before compiling, outside the loss.
        **kwargs: :class:`ContrastiveLoss` options.
    """

    def __init__(self, *, discretizer: object | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.discretizer = discretizer

    def _loss(self, z1: Tensor, z2: Tensor, sensitive: Tensor, *, return_stats: bool, diagnostics: bool) -> Output:
        return fn.fair_info_nce(
            z1, z2, sensitive, discretizer=self.discretizer, return_stats=return_stats, diagnostics=diagnostics,
            **self._common(),
        )


class CCLKLoss(ContrastiveLoss):
    """CCLK (kernel conditional negatives). See :func:`~.functional.cclk` for ``kernel``, ``lam``,
    ``bandwidth`` and ``clip``."""

    def __init__(
        self,
        *,
        kernel: str = "cosine",
        lam: float = 0.01,
        bandwidth: float | None = None,
        clip: float | None = 1e-6,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.kernel, self.lam, self.bandwidth, self.clip = kernel, lam, bandwidth, clip

    def _loss(self, z1: Tensor, z2: Tensor, sensitive: Tensor, *, return_stats: bool, diagnostics: bool) -> Output:
        return fn.cclk(
            z1, z2, sensitive, kernel=self.kernel, lam=self.lam, bandwidth=self.bandwidth, clip=self.clip,
            return_stats=return_stats, diagnostics=diagnostics, **self._common(),
        )


class FARELoss(ContrastiveLoss):
    """FARE: attention over the sensitive attribute weights the negatives (learned ``W_Q``, ``W_K``).

    Args:
        sensitive_dim: ``s``, columns of a float attribute or number of integer groups (one-hot encoded; with
            ``check_inputs=False`` a group ``>= s`` gets an all-zero row instead of an error).
        d_k: query/key width; ignored when ``learn_projections=False`` (then ``d_k = s``).
        rho: ``ρ``, the attention's temperature: 1 by default (chosen on ColorMNIST validation data); ``None``
            = ``√d_k`` (``√s`` when fixed), the former default, whose attention is almost uniform (near InfoNCE).
        learn_projections: False = the fixed-projection ablation, ``W_Q = W_K = I`` as buffers.
        score: ``"dot"`` or ``"neg_sqdist"``.
        z_norm: how the attribute is standardised: ``"batch"`` statistics, ``"running"`` (EMA statistics with
            ``momentum``, updated in training, used in both modes) or ``"none"``.
        neg_scale: ``"b-1"`` (uniform attention = InfoNCE) or ``"none"``.
        mask_self: exclude ``j = i`` from the softmax.
        momentum: EMA factor of ``z_norm="running"``.
        **kwargs: :class:`ContrastiveLoss` options.

    ``W_Q``, ``W_K`` start as a padded identity plus N(0, 0.01²) noise (global RNG); train them with the
    encoder's optimiser and no weight decay. Above ``b = 1024`` the loss is computed in tiles of 512 × 512
    anchors, recomputed in the backward pass, so its memory grows linearly in ``b`` (the values equal the
    dense computation's; ``functional.fare(..., chunk_size=None)`` is the dense one).
    """

    def __init__(
        self,
        sensitive_dim: int,
        *,
        d_k: int = 16,
        rho: float | None = 1.0,
        learn_projections: bool = True,
        score: str = "dot",
        z_norm: str = "batch",
        neg_scale: str = "b-1",
        mask_self: bool = True,
        momentum: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if sensitive_dim < 1 or d_k < 1:
            raise ValueError(f"sensitive_dim and d_k must be >= 1, got {sensitive_dim} and {d_k}")
        check_options(rho, score, neg_scale, z_norm, (*Z_NORMS, "running"))
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1] (the EMA weight of the new batch), got {momentum}")
        self.sensitive_dim, self.learn_projections = sensitive_dim, learn_projections
        self.rho, self.score, self.z_norm, self.neg_scale, self.mask_self = rho, score, z_norm, neg_scale, mask_self
        self.momentum = momentum
        if learn_projections:
            init = torch.eye(d_k, sensitive_dim)
            self.w_q = nn.Parameter(init + 0.01 * torch.randn(d_k, sensitive_dim))
            self.w_k = nn.Parameter(init + 0.01 * torch.randn(d_k, sensitive_dim))
        else:
            self.register_buffer("w_q", torch.eye(sensitive_dim))
            self.register_buffer("w_k", torch.eye(sensitive_dim))
        if z_norm == "running":
            self.register_buffer("running_mean", torch.zeros(sensitive_dim))
            self.register_buffer("running_var", torch.ones(sensitive_dim))

    def _fare_kwargs(self) -> dict:
        return {"rho": self.rho, "score": self.score, "neg_scale": self.neg_scale, "mask_self": self.mask_self}

    def _prepared(
        self, sensitive: Tensor, b: int, device: torch.device
    ) -> tuple[Tensor, str, Tensor | None, tuple[Tensor, Tensor] | None]:
        """``(attribute, z_norm, groups, running)`` to hand to the functional: running statistics applied
        here. ``running`` holds the updated ``(mean, var)`` of a training call; :meth:`_commit` stores them
        once the loss has been computed, so a call that raises leaves the running statistics unchanged."""
        if self.z_norm != "running":
            return sensitive, self.z_norm, None, None
        sens = check_sensitive(sensitive, b, device, self.check_inputs)
        if sens.shape[0] < 2:
            raise ValueError(f"z_norm='running' needs a batch of at least 2 samples, got b = {sens.shape[0]}")
        groups = None
        if not sens.is_floating_point():
            groups = sens
            sens = one_hot_groups(sens, self.sensitive_dim, compute_dtype(self.w_q.dtype), self.check_inputs)
        elif sens.shape[1] != self.sensitive_dim:
            raise ValueError(
                f"sensitive has s = {sens.shape[1]} columns, expected sensitive_dim = {self.sensitive_dim}"
            )
        mean, var, running = self.running_mean, self.running_var, None
        if self.training:
            with torch.no_grad():
                mean = torch.lerp(mean, sens.mean(0).to(mean.dtype), self.momentum)
                var = torch.lerp(var, sens.var(0, unbiased=False).to(var.dtype), self.momentum)
            running = (mean, var)
        zhat = (sens - mean.to(sens.dtype)) / (var.to(sens.dtype).sqrt() + 1e-6)
        return zhat, "none", groups, running

    def _commit(self, running: tuple[Tensor, Tensor] | None) -> None:
        if running is not None:
            self.running_mean.copy_(running[0])
            self.running_var.copy_(running[1])

    def _loss(self, z1: Tensor, z2: Tensor, sensitive: Tensor, *, return_stats: bool, diagnostics: bool) -> Output:
        attribute, z_norm, _, running = self._prepared(sensitive, z1.shape[0], z1.device)
        out = fn.fare(
            z1, z2, attribute, self.w_q, self.w_k, z_norm=z_norm, return_stats=return_stats, diagnostics=diagnostics,
            **self._fare_kwargs(), **self._common(),
        )
        self._commit(running)
        return out

    def extra_repr(self) -> str:
        rho = self.rho if self.rho is not None else math.sqrt(self.w_q.shape[0])
        return (
            f"sensitive_dim={self.sensitive_dim}, d_k={self.w_q.shape[0]}, rho={rho:.4g}, "
            f"learn_projections={self.learn_projections}, score={self.score!r}, z_norm={self.z_norm!r}, "
            f"{super().extra_repr()}"
        )


class SparseFARELoss(FARELoss):
    """SparseFARE: FARE restricted to angular-LSH buckets of the sensitive attribute.

    Args:
        sensitive_dim: as :class:`FARELoss` (all its options apply).
        n_buckets: ``n_b`` (1 or even); default 4.
        bucket_size: target bucket size ``c`` (``n_b = 2⌈b/2c⌉``, sub-quadratic), overrides ``n_buckets``.
        n_hashes: hash rounds (``impl="dense"`` for > 1).
        neighbours: extra buckets probed (multi-probe).
        hash_on: ``"z"`` or ``"keys"``.
        impl: ``"sorted"`` or ``"dense"`` (reference).
        generator: CPU generator for the projections drawn at every training call (``None``: global RNG).
        eval_seed: in eval mode the projections come from this seed, so evaluation is deterministic.
        unit_rotations: unit-length projection directions (:mod:`~.lsh`).

    The hashing options are checked and kept together as ``self.lsh``, an :class:`~.lsh.LSHConfig`, which is
    also what :func:`~.sparse.sparse_fare` takes.

    ``forward(z1, z2, sensitive, buckets=None, return_stats=False)``: ``buckets`` (long ``[b]``) replaces
    hashing; integer ``sensitive`` groups are the buckets.

    ``torch.compile(loss_fn, fullgraph=True)`` with ``check_inputs=False`` traces the loss, forward and
    backward, into one graph in training and in eval mode. What stays data-dependent or cannot be traced:

    - ``impl="sorted"`` (the default) tiles each bucket, so the *number* of tiles depends on the bucket sizes:
      the plan copies ``2 n_b + 1`` bucket counts to the host once per call, compiled too (the graph has
      data-dependent sizes, so new bucket sizes do not recompile it). An exact sub-quadratic tiling has no
      fixed shape: one bucket may hold the whole batch. ``impl="dense"`` has fixed ``[b, b]`` shapes and
      reads nothing on the host.
    - With given ``buckets`` or integer groups, ``impl="sorted"`` also reads ``n_b = max + 1`` on the host.
    - ``generator``: dynamo cannot trace a ``torch.Generator`` ("Failed to convert args/kwargs to proxy"), so
      compile a module in training mode with ``generator=None``. Its projections then come from the global
      RNG; inside a compiled graph that is inductor's RNG, whose draws differ from eager ones unless
      ``torch._inductor.config.fallback_random = True``.
    - Eval mode: the projections for ``n_b`` buckets are drawn once from ``eval_seed`` and cached. With
      ``n_buckets`` that happens here, at construction; with ``bucket_size``, ``n_b`` depends on the batch
      size and drawing needs a ``torch.Generator``, so run one eager eval call per batch size before a
      compiled one.
    """

    def __init__(
        self,
        sensitive_dim: int,
        *,
        n_buckets: int = 4,
        bucket_size: int | None = None,
        n_hashes: int = 1,
        neighbours: int = 0,
        hash_on: str = "z",
        impl: str = "sorted",
        generator: torch.Generator | None = None,
        eval_seed: int = 0,
        unit_rotations: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(sensitive_dim, **kwargs)
        self.lsh = LSHConfig(n_buckets=n_buckets, bucket_size=bucket_size, n_hashes=n_hashes, neighbours=neighbours,
                             hash_on=hash_on, unit_rotations=unit_rotations)
        check_impl(impl, self.lsh)
        self.impl, self.generator, self.eval_seed = impl, generator, eval_seed
        self._eval_rotations: dict[tuple, Tensor] = {}  # CPU float64, keyed by everything they depend on
        if bucket_size is None:
            self.eval_rotations(n_buckets)

    def eval_rotations(self, n_b: int) -> Tensor:
        """The eval-mode projections ``[n_hashes, s', n_b/2]`` (CPU float64): drawn from ``eval_seed`` once."""
        dim = self._hashed_dim()
        key = (n_b, dim, self.lsh.n_hashes, self.eval_seed, self.lsh.unit_rotations)
        rot = self._eval_rotations.get(key)
        if rot is None:
            gen = torch.Generator().manual_seed(self.eval_seed)
            rot = draw_rotations(dim, n_b, self.lsh.n_hashes, generator=gen, dtype=torch.float64,
                                 unit=self.lsh.unit_rotations)
            self._eval_rotations[key] = rot
        return rot

    def _hashed_dim(self) -> int:
        return self.sensitive_dim if self.lsh.hash_on == "z" else self.w_k.shape[0]

    def _loss(
        self, z1: Tensor, z2: Tensor, sensitive: Tensor, *, return_stats: bool, diagnostics: bool,
        buckets: Tensor | None = None,
    ) -> Output:
        attribute, z_norm, groups, running = self._prepared(sensitive, z1.shape[0], z1.device)
        given = buckets if buckets is not None else groups
        hashed = given is None and isinstance(attribute, Tensor) and attribute.is_floating_point()
        rotations = None
        if hashed and not self.training:
            rotations = self.eval_rotations(self.lsh.buckets_for(z1.shape[0]))
        elif hashed and self._world() > 1:
            rotations = self._shared_rotations(self.lsh.buckets_for(z1.shape[0]), z1.device)
        out = fn.sparse_fare(
            z1, z2, attribute, self.w_q, self.w_k, lsh=self.lsh, impl=self.impl,
            generator=self.generator if self.training else None, rotations=rotations, buckets=given,
            z_norm=z_norm, return_stats=return_stats, diagnostics=diagnostics, **self._fare_kwargs(), **self._common(),
        )
        self._commit(running)
        return out

    def _shared_rotations(self, n_b: int, device: torch.device) -> Tensor:
        """Training projections drawn on rank 0 (its ``generator`` or global RNG) and broadcast, so every rank
        hashes the gathered batch alike."""
        rot = draw_rotations(self._hashed_dim(), n_b, self.lsh.n_hashes, generator=self.generator,
                             dtype=torch.float64, unit=self.lsh.unit_rotations).to(device)
        dist.broadcast(rot, src=0)
        return rot

    def extra_repr(self) -> str:
        lsh = self.lsh
        size = f"bucket_size={lsh.bucket_size}" if lsh.bucket_size is not None else f"n_buckets={lsh.n_buckets}"
        return f"{size}, neighbours={lsh.neighbours}, impl={self.impl!r}, {super().extra_repr()}"
