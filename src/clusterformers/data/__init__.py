"""Data shipped inside installed packages (no downloads): MNIST-5k, sklearn digits, a Wikipedia sample.

``sources`` finds packaged files, ``images`` loads image sets as uint8 numpy arrays, ``text`` builds word- and
byte-level language-model corpora, batches and the word-swap contamination. Every loader also takes the
user's own file.
"""

from clusterformers.data.images import load_digits8, load_mnist5k, load_npz, mnist5k_split, stratified_split
from clusterformers.data.sources import MNIST5K, WIKI, find_package_file
from clusterformers.data.text import (
    TokenCorpus,
    Vocab,
    build_corpus,
    eval_windows,
    load_text_file,
    load_wikipedia,
    random_windows,
    split_articles,
    word_swap,
)

__all__ = [
    "MNIST5K",
    "WIKI",
    "TokenCorpus",
    "Vocab",
    "build_corpus",
    "eval_windows",
    "find_package_file",
    "load_digits8",
    "load_mnist5k",
    "load_npz",
    "load_text_file",
    "load_wikipedia",
    "mnist5k_split",
    "random_windows",
    "split_articles",
    "stratified_split",
    "word_swap",
]
