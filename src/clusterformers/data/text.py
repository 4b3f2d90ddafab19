"""Text corpora for the language-model experiments: the Wikipedia sample shipped in ``gensim``, users' files.

Pipeline: ``load_wikipedia`` (MediaWiki dumps, see :mod:`clusterformers.data.wikitext`) or ``load_text_file``
gives a list of plain-text articles; ``split_articles`` splits them into train/valid/test; ``build_corpus``
tokenises each split (word level: lowercased regex tokens, ``<eos>`` after every article, a ``Vocab`` built on
train only; byte level: the UTF-8 bytes of the text, ``"\\n"`` after every article, 256 symbols) into a
``TokenCorpus`` of LongTensors. ``random_windows`` / ``eval_windows`` cut training batches and evaluation
windows; ``word_swap`` makes the contaminated test set of the robustness experiments.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clusterformers.data.wikitext import clean_wikitext, load_wikipedia, open_text_source

logger = logging.getLogger(__name__)

__all__ = [
    "EOS",
    "UNK",
    "TokenCorpus",
    "Vocab",
    "build_corpus",
    "clean_wikitext",
    "eval_windows",
    "is_punctuation",
    "load_documents",
    "load_stopwords",
    "load_text_file",
    "load_wikipedia",
    "random_windows",
    "split_articles",
    "tokenize",
    "word_swap",
]

UNK = "<unk>"
EOS = "<eos>"

# ----------------------------------------------------------------------------- loading


def load_text_file(path: str | Path) -> list[str]:
    """Documents of the user's own UTF-8 text file (optionally ``.gz``/``.bz2``), separated by blank lines."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"text file not found: {str(resolved)!r} (argument path={str(path)!r})")
    try:
        with open_text_source(resolved) as handle:
            text = handle.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {str(resolved)!r} is not UTF-8 text ({err}); convert it to UTF-8") from err
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"text file {str(resolved)!r} cannot be read ({type(err).__name__}: {err})") from err
    documents = [doc.strip() for doc in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError(f"text file {str(resolved)!r} is empty")
    return documents


def load_documents(path: str | Path | None = None) -> list[str]:
    """``load_wikipedia`` for ``None`` or an XML dump (``.xml``, ``.xml.bz2``, ``.xml.gz``), else ``load_text_file``."""
    if path is None or re.search(r"\.xml(?:\.bz2|\.gz)?$", str(path).lower()):
        return load_wikipedia(path)
    return load_text_file(path)


def split_articles(
    articles: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    contiguous: bool = False,
) -> tuple[list[str], list[str], list[str]]:
    """Split documents into train/valid/test.

    Args:
        articles: the documents.
        fractions: three non-negative shares summing to 1.
        seed: article mode only: the order is ``numpy.random.default_rng(seed).permutation``.
        contiguous: False = shuffle whole articles and give the first ``round(f·n)`` to train, the next to
            valid, the rest to test (shares of articles, not of tokens). True = keep the original order, join
            the text and cut it at the character fractions, moved to the nearest whitespace; an article
            that straddles a cut contributes its two pieces as separate documents.

    Returns:
        ``(train, valid, test)`` lists of documents.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    if not articles:
        raise ValueError("articles is empty")
    if not contiguous:
        order = np.random.default_rng(seed).permutation(len(articles))
        shuffled = [articles[i] for i in order]
        n_train = int(round(fractions[0] * len(articles)))
        n_valid = int(round(fractions[1] * len(articles)))
        n_valid = min(n_valid, len(articles) - n_train)
        return shuffled[:n_train], shuffled[n_train : n_train + n_valid], shuffled[n_train + n_valid :]
    lengths = np.array([len(a) for a in articles])
    total = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    splits: list[list[str]] = [[], [], []]
    cuts = [int(round(fractions[0] * total)), int(round((fractions[0] + fractions[1]) * total))]
    for article, start in zip(articles, starts, strict=True):
        pieces_from = 0
        for split_idx in range(3):
            end = cuts[split_idx] - start if split_idx < 2 else len(article)
            end = min(max(end, pieces_from), len(article))
            if 0 < end < len(article):
                space = max(article.rfind(" ", pieces_from, end + 1), article.rfind("\n", pieces_from, end + 1))
                end = space if space > pieces_from else end
            piece = article[pieces_from:end].strip()
            if piece:
                splits[split_idx].append(piece)
            pieces_from = end
    return splits[0], splits[1], splits[2]


# ----------------------------------------------------------------------------- tokens and vocabulary

_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased word-level tokens: words/numbers (with inner apostrophes, ``’`` read as ``'``) and single
    punctuation marks."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def is_punctuation(token: str) -> bool:
    """True if the token has no letter or digit (special tokens like ``<eos>`` are not punctuation)."""
    return token not in (UNK, EOS) and not any(c.isalnum() for c in token)


@functools.lru_cache(maxsize=1)
def load_stopwords() -> frozenset[str]:
    """The bundled English stop-word list (``clusterformers/data/stopwords.txt``), lowercase."""
    text = resources.files("clusterformers.data").joinpath("stopwords.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


class Vocab:
    """Word vocabulary: ``itos[0] = "<unk>"``, ``itos[1] = "<eos>"``, then words by count (ties: a-z)."""

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if itos[:2] != [UNK, EOS] or len(set(itos)) != len(itos):
            raise ValueError(f"itos must start with {[UNK, EOS]} and have no duplicates, got {itos[:5]}...")
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}
        self.unk_id = 0
        self.eos_id = 1

    @classmethod
    def build(cls, documents: Iterable[Sequence[str]], min_count: int = 3, max_size: int | None = 20000) -> Vocab:
        """Vocabulary of the words occurring ``>= min_count`` times, at most ``max_size`` of them (most
        frequent first), plus ``<unk>`` and ``<eos>`` (so ``len <= max_size + 2``)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
        counts: Counter[str] = Counter()
        for doc in documents:
            counts.update(doc)
        del counts[UNK], counts[EOS]
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([UNK, EOS, *words[:max_size]])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def encode(self, tokens: Iterable[str]) -> Tensor:
        """LongTensor ``[T]`` of ids; unknown words map to ``<unk>``."""
        get = self.stoi.get
        return torch.tensor([get(t, 0) for t in tokens], dtype=torch.long)

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Tokens of ids ``[T]``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.itos[i] for i in values]


@dataclass
class TokenCorpus:
    """Token ids of the three splits (1-D LongTensors) and how to read them.

    ``level="word"``: ids of ``vocab`` (``vocab_size = len(vocab)``). ``level="byte"``: UTF-8 byte values,
    ``vocab_size = 256``, ``vocab = None``; bits per character = loss / ln 2.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int
    vocab: Vocab | None
    level: str

    def decode(self, ids: Tensor) -> str:
        """Text of ids ``[T]`` (word level: tokens joined by spaces)."""
        if self.vocab is None:
            return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
        return " ".join(self.vocab.decode(ids))


def _truncate(documents: list[str], max_chars: int) -> list[str]:
    """The documents cut to ``max_chars`` characters in all (the last one kept is cut short)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    kept: list[str] = []
    left = max_chars
    for doc in documents:
        if left <= 0:
            break
        kept.append(doc[:left])
        left -= len(doc)
    return kept


@functools.lru_cache(maxsize=8)
def _build_cached(
    level: str,
    path: str | None,
    min_count: int,
    max_vocab: int | None,
    split: str,
    fractions: tuple[float, ...],
    seed: int,
    max_chars: int | None,
    version: tuple[int, int] | None = None,
) -> TokenCorpus:
    """``version`` (the file's mtime and size) is only part of the cache key."""
    documents = load_documents(path)
    if max_chars is not None:
        documents = _truncate(documents, max_chars)
    if split == "article" and len(documents) < 3:
        logger.info("only %d document(s) (no blank lines between documents): splitting the text contiguously",
                    len(documents))
        split = "contiguous"
    parts = split_articles(documents, fractions, seed=seed, contiguous=split == "contiguous")
    empty = [name for name, docs in zip(("train", "valid", "test"), parts, strict=True) if not docs]
    if empty:
        raise ValueError(
            f"{path or 'the Wikipedia sample'}: the {'/'.join(empty)} split(s) hold no text with fractions "
            f"{fractions}; give more text, more documents (separated by blank lines), or other fractions"
        )
    if level == "byte":
        encoded = ["".join(d + "\n" for d in docs).encode("utf-8") for docs in parts]
        tensors = [torch.from_numpy(np.frombuffer(b, dtype=np.uint8).astype(np.int64)) for b in encoded]
        corpus = TokenCorpus(*tensors, vocab_size=256, vocab=None, level="byte")
    else:
        tokenized = [[[*tokenize(d), EOS] for d in docs] for docs in parts]
        vocab = Vocab.build(tokenized[0], min_count=min_count, max_size=max_vocab)
        tensors = [vocab.encode(t for doc in docs for t in doc) for docs in tokenized]
        corpus = TokenCorpus(*tensors, vocab_size=len(vocab), vocab=vocab, level="word")
        unk = [float((t == vocab.unk_id).float().mean()) if t.numel() else 0.0 for t in tensors]
        logger.info("word vocab %d; <unk> rate train/valid/test %.3f/%.3f/%.3f", len(vocab), *unk)
    logger.info(
        "%s corpus (%s split, %d/%d/%d documents): train %d, valid %d, test %d tokens",
        level, split, *(len(p) for p in parts), *(t.numel() for t in tensors),
    )
    return corpus


def build_corpus(
    level: str = "word",
    path: str | Path | None = None,
    min_count: int = 3,
    max_vocab: int | None = 20000,
    split: str = "article",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_chars: int | None = None,
) -> TokenCorpus:
    """Tokenised train/valid/test splits of the Wikipedia sample or of the user's own text.

    Args:
        level: ``"word"`` (lowercased regex tokens, ``<eos>`` after each document, vocabulary from train:
            count ``>= min_count``, at most ``max_vocab`` words, plus ``<unk>``, ``<eos>``) or ``"byte"``
            (UTF-8 bytes of the cleaned text, ``"\\n"`` after each document, 256 symbols).
        path: ``None`` = Wikipedia sample shipped in ``gensim``; an XML dump (``.xml[.bz2|.gz]``); or a plain
            text file (``.txt[.gz|.bz2]``) with documents separated by blank lines.
        split: ``"article"`` (shuffled whole documents, ``seed``) or ``"contiguous"`` (cut the text in order);
            see ``split_articles``. Fewer than 3 documents are always cut contiguously.
        fractions: train/valid/test shares.
        max_chars: keep only the first ``max_chars`` characters of the documents (quick runs).

    Returns:
        ``TokenCorpus``; built once per argument set and cached, each call returns fresh tensors.
    """
    if level not in ("word", "byte"):
        raise ValueError(f"level must be 'word' or 'byte', got {level!r}")
    if split not in ("article", "contiguous"):
        raise ValueError(f"split must be 'article' or 'contiguous', got {split!r}")
    key_path, version = None, None
    if path is not None:
        resolved = Path(path).expanduser().resolve()
        key_path = str(resolved)
        if resolved.is_file():  # a rewritten file is read again (a missing one raises in the loader)
            stat = resolved.stat()
            version = (stat.st_mtime_ns, stat.st_size)
    cached = _build_cached(
        level, key_path, min_count, max_vocab, split, tuple(float(f) for f in fractions), seed, max_chars, version
    )
    return TokenCorpus(
        cached.train.clone(), cached.valid.clone(), cached.test.clone(), cached.vocab_size, cached.vocab, level
    )


# ----------------------------------------------------------------------------- batching


def random_windows(
    data: Tensor, batch_size: int, context: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random training windows of a token stream.

    Args:
        data: LongTensor ``[T]`` with ``T > context``.
        batch_size: B. context: N.
        generator: drives the window starts (on the generator's device; the windows are on ``data.device``).

    Returns:
        ``x`` ``[B, N]`` and ``y`` ``[B, N]`` with ``y[b, i] = data[s_b + i + 1]``, ``x[b, i] = data[s_b + i]``.
    """
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D token tensor [T], got shape {tuple(data.shape)}")
    if context < 1 or batch_size < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
    if data.numel() <= context:
        raise ValueError(f"data has {data.numel()} tokens, need more than context={context}")
    gen_device = generator.device if generator is not None else data.device
    starts = torch.randint(data.numel() - context, (batch_size,), generator=generator, device=gen_device)
    index = starts.to(data.device)[:, None] + torch.arange(context, device=data.device)
    return data[index], data[index + 1]


def eval_windows(data: Tensor, context: int, batch_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows that predict every token of ``data[1:]`` exactly once.

    Window ``j`` is ``x = data[j·N : j·N + N]``, ``y = data[j·N + 1 : j·N + N + 1]``. Full windows come in
    batches ``[≤batch_size, N]``; a shorter last window (``T - 1`` not a multiple of N) comes alone as
    ``[1, n]``. Works for any 1-D tensor, e.g. the ``changed`` mask of ``word_swap``, whose ``y`` then marks
    the corrupted targets of the same windows.

    Yields:
        ``(x, y)``, each ``[B, n]``.
    """
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D tensor [T], got shape {tuple(data.shape)}")
    if context < 1 or batch_size < 1:
        raise ValueError(f"context and batch_size must be >= 1, got {context} and {batch_size}")
    n_targets = data.numel() - 1
    n_full = max(n_targets, 0) // context
    for first in range(0, n_full, batch_size):
        count = min(batch_size, n_full - first)
        index = (torch.arange(first, first + count, device=data.device) * context)[:, None] + torch.arange(
            context, device=data.device
        )
        yield data[index], data[index + 1]
    rest = n_targets - n_full * context
    if rest > 0:
        start = n_full * context
        yield data[start : start + rest][None], data[start + 1 : start + 1 + rest][None]


# ----------------------------------------------------------------------------- contamination


def word_swap(
    tokens: Tensor, vocab: Vocab, fraction: float, seed: int, stopwords: Iterable[str] | None = None
) -> tuple[Tensor, Tensor]:
    """Replace a fixed share of the content words by ``<unk>`` (the word-swap contamination).

    Eligible tokens are those that are not stop words (the bundled list unless ``stopwords`` is given), not
    punctuation, not ``<eos>`` and not already ``<unk>``. Exactly ``round(fraction · #eligible)`` of them,
    drawn with ``torch.Generator().manual_seed(seed)``, become ``<unk>``; the same arguments always give the
    same corruption.

    Args:
        tokens: LongTensor ``[T]`` of ``vocab`` ids.
        fraction: share of the eligible tokens to replace, in ``[0, 1]``.

    Returns:
        ``corrupted`` LongTensor ``[T]`` and ``changed`` BoolTensor ``[T]`` (True where replaced), on
        ``tokens.device``.
    """
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a 1-D LongTensor [T], got {tokens.dtype} {tuple(tokens.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    stop = load_stopwords() if stopwords is None else frozenset(w.lower() for w in stopwords)
    eligible_id = torch.tensor(
        [i > vocab.eos_id and w not in stop and not is_punctuation(w) for i, w in enumerate(vocab.itos)],
        dtype=torch.bool,
    )
    eligible = eligible_id[tokens.cpu()]
    positions = eligible.nonzero().flatten()
    n_swap = int(round(fraction * positions.numel()))
    generator = torch.Generator().manual_seed(seed)
    chosen = positions[torch.randperm(positions.numel(), generator=generator)[:n_swap]]
    changed = torch.zeros(tokens.numel(), dtype=torch.bool)
    changed[chosen] = True
    changed = changed.to(tokens.device)
    corrupted = tokens.masked_fill(changed, vocab.unk_id)
    return corrupted, changed
