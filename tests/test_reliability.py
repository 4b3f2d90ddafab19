"""Regression tests for users' mistakes: each bad input ends in an error naming the argument, and a rejected
call changes no state."""

from __future__ import annotations

import pytest
import torch

from clusterformers import FARELoss, MoE, SoftMoE, SparseFARELoss, load_balancing_loss, router_z_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cls", [FARELoss, SparseFARELoss])
def test_a_rejected_call_leaves_the_running_attribute_statistics_alone(cls) -> None:
    loss_fn = cls(3, z_norm="running")
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(16, 8, generator=g), torch.rand(16, 3, generator=g)
    loss_fn(z, z.roll(1, 0), s)
    before = (loss_fn.running_mean.clone(), loss_fn.running_var.clone())
    bad_calls = [
        (z[:0], z[:0], s[:0]),  # empty batch
        (z[:1], z[:1], s[:1]),  # one sample: no negatives, no variance
        (z.clone().fill_(float("nan")), z, s),  # NaN embeddings
        (z, z[:8], s),  # mismatched views
    ]
    for args in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            loss_fn(*args)
        assert torch.equal(loss_fn.running_mean, before[0]) and torch.equal(loss_fn.running_var, before[1])
    loss = loss_fn(z, z.roll(1, 0), s)  # a later valid call still works
    assert torch.isfinite(loss) and not torch.equal(loss_fn.running_mean, before[0])
    for momentum in (0.0, 5.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum must lie in"):
            cls(3, z_norm="running", momentum=momentum)


def test_float_masks_are_refused_everywhere_masks_are_taken() -> None:
    """An additive mask (0 = keep, -inf = pad) cast to bool would keep exactly the padding."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8)
    additive = torch.zeros(2, 5)
    additive[1, 3:] = float("-inf")
    logits = torch.randn(10, 4)
    calls = [
        lambda m: MoE(8, 4, 2, 12)(x, key_padding_mask=m),
        lambda m: SoftMoE(8, 4, 1, 12)(x, key_padding_mask=m),
        lambda m: load_balancing_loss(logits, 4, 2, m.reshape(-1)),
        lambda m: router_z_loss(logits, m.reshape(-1)),
    ]
    for call in calls:
        for mask in (additive, torch.full((2, 5), 0.5)):
            with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
                call(mask)
        assert torch.isfinite(torch.as_tensor(call(additive == 0))).all()  # the fix the message names works


def test_sparse_fare_given_bucket_ids_cost_memory_by_count_not_by_value() -> None:
    """Ids near 1e9 once sized the block plan (OOM); relabelled in order, they give the compact ids' loss."""
    g = torch.Generator().manual_seed(2)
    z1, z2, s = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g), torch.rand(64, 3, generator=g)
    compact = torch.randint(0, 5, (64,), generator=g)
    huge = torch.tensor([0, 10**6, 10**8, 10**9 - 7, 10**9])[compact]  # the same partition, increasing ids
    for impl in ("sorted", "dense"):
        loss_fn = SparseFARELoss(3, impl=impl)
        torch.testing.assert_close(loss_fn(z1, z2, s, buckets=huge), loss_fn(z1, z2, s, buckets=compact))


@pytest.mark.parametrize("name", ["info_nce", "fair_info_nce", "cclk", "fare", "sparse_fare"])
def test_losses_are_scale_invariant_up_to_embeddings_near_1e20(name: str) -> None:
    """The losses see unit-normalised embeddings; near 1e20 the squared norm overflows float32, which once
    turned every embedding into zeros (loss log(2b - 1), no gradient)."""
    from clusterformers import CCLKLoss, FairInfoNCELoss, InfoNCELoss

    g = torch.Generator().manual_seed(3)
    z1, z2, s = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.rand(16, 3, generator=g)
    groups = torch.randint(0, 3, (16,), generator=g)
    make = {"info_nce": lambda: (InfoNCELoss(), s), "fair_info_nce": lambda: (FairInfoNCELoss(), groups),
            "cclk": lambda: (CCLKLoss(), s), "fare": lambda: (FARELoss(3), s),
            "sparse_fare": lambda: (SparseFARELoss(3, n_buckets=2, generator=torch.Generator()), s)}[name]
    loss_fn, attribute = make()
    for scale in (1e20, 1e-20):
        if name == "sparse_fare":
            loss_fn.generator.manual_seed(0)
        base = loss_fn(z1, z2, attribute)
        if name == "sparse_fare":
            loss_fn.generator.manual_seed(0)
        a, b = (z1 * scale).requires_grad_(), (z2 * scale).requires_grad_()
        scaled = loss_fn(a, b, attribute)
        torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-5)
        scaled.backward()
        assert torch.isfinite(a.grad).all() and a.grad.abs().max() > 0


def test_attention_refuses_nan_values_and_overflow_instead_of_a_silent_result() -> None:
    from clusterformers import EllipticalAttention, elliptical_metric

    torch.manual_seed(4)
    layer = EllipticalAttention(8, 2)
    x, v_prev = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 4)
    bad = v_prev.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="v or v_prev holds NaN or inf at kept positions"):
        layer(x, v_prev=bad)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 2] = False  # the NaN sits at a padded token: allowed, and it cannot leak
    out = layer(x, key_padding_mask=keep, v_prev=bad)
    clean = bad.clone()
    clean[0, 1, 2, 3] = 0.0
    torch.testing.assert_close(out, layer(x, key_padding_mask=keep, v_prev=clean))
    with pytest.raises(ValueError, match="NaN or inf"):
        elliptical_metric(torch.randn(2, 2, 5, 4), bad)
    with pytest.raises(ValueError, match="query-key scores can overflow"):
        layer(torch.full((2, 5, 8), 1e20))  # some CPU SDPA kernels return zeros here, others NaN
    assert EllipticalAttention(8, 2, check_inputs=False)(x, v_prev=bad).shape == (2, 5, 8)  # unchecked: no error


def test_bad_inputs_name_the_argument_and_the_fix(tmp_path) -> None:
    import numpy as np

    from clusterformers import EllipticalAttention, cli
    from clusterformers.data.images import load_npz
    from clusterformers.data.text import build_corpus

    torch.manual_seed(5)
    layer = EllipticalAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        layer(x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="v_prev is on meta"):
        layer(x, v_prev=torch.randn(2, 2, 5, 4, device="meta"))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        SoftMoE(8, 4, 1, 12)(torch.ones(2, 5, 8, dtype=torch.long))
    empty_row = torch.ones(2, 5, dtype=torch.bool)
    empty_row[1] = False
    with pytest.raises(ValueError, match=r"keeps no token in sample\(s\) \[1\]"):
        SoftMoE(8, 4, 1, 12)(x, key_padding_mask=empty_row)
    for top_k in (0, 5, True):
        with pytest.raises(ValueError, match="top_k: expected an int in 1..num_experts=4"):
            load_balancing_loss(torch.randn(6, 4), 4, top_k)
    # user files: the path and the fix in the message, never a bare traceback
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.npz.*np.savez"):
        load_npz(broken)
    complex_npz = tmp_path / "complex.npz"
    np.savez(complex_npz, images=np.zeros((4, 8, 8)) + 1j, labels=np.arange(4))
    with pytest.raises(ValueError, match="images must be real numbers"):
        load_npz(complex_npz)
    sparse = tmp_path / "sparse_labels.npz"
    np.savez(sparse, images=np.zeros((20, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 10**6, 1] * 5))
    assert cli.main(["train", "vit", "--data", str(sparse), "--out", str(tmp_path / "r"), "--epochs", "1"]) == 2
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        build_corpus("byte", path=latin)
    one_paragraph = tmp_path / "one.txt"
    one_paragraph.write_text("the cat sat on the mat " * 200)  # no blank lines: one document
    corpus = build_corpus("byte", path=one_paragraph)
    assert min(corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) > 100


def _tiny_lm_run(out, attention: str = "softmax", steps: int = 2, resume: bool = False, stop_at: int | None = None):
    import torch.nn.functional as F

    from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
    from clusterformers.train import TrainConfig, train

    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=11, context=8, dim=8, depth=2, num_heads=2,
                                              attention=attention))

    def batch_fn(step, rank=0, world=1):
        return torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(step))

    def loss_fn(net, batch):
        return F.cross_entropy(net(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()), {}

    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=1, device="cpu",
                      progress=False, stop_at=stop_at)
    return train(model, loss_fn, batch_fn, cfg, out, resume=resume)


def test_checkpoints_cannot_be_mixed_up(tmp_path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from clusterformers.checkpoint import CheckpointError

    run, other = tmp_path / "run", tmp_path / "other"
    _tiny_lm_run(run)
    _tiny_lm_run(other, steps=1)
    # a softmax checkpoint does not resume into an elliptical model (their parameter names agree)
    with pytest.raises(CheckpointError, match="model_signature.*softmax vs elliptical"):
        _tiny_lm_run(run, "elliptical", steps=3, resume=True)
    # an optimizer file copied from another run is refused
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.copy(other / "optimizer.safetensors", broken / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        _tiny_lm_run(broken, steps=3, resume=True)
    # a flipped byte inside the tensor data (the header still parses) is refused
    flipped = tmp_path / "flipped"
    shutil.copytree(run, flipped)
    data = bytearray((flipped / "checkpoint.safetensors").read_bytes())
    data[-5] ^= 0x40
    (flipped / "checkpoint.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        _tiny_lm_run(flipped, steps=3, resume=True)
    # temporaries a killed writer left are removed; the untouched run resumes
    stale = run / ".checkpoint.safetensors.12345.tmp"
    stale.write_bytes(b"half a file")
    assert _tiny_lm_run(run, steps=3, resume=True).step == 3
    assert not stale.exists()
    # a second live process is refused; a lock left by a dead one is taken over
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(ValueError, match=f"in use by process {sleeper.pid}"):
            _tiny_lm_run(run, steps=4, resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _tiny_lm_run(run, steps=4, resume=True).step == 4  # the sleeper's lock is stale now
    assert not (run / ".lock").exists()
    assert os.listdir(run)  # nothing else removed


def test_run_directories_with_spaces_and_non_ascii_names_and_a_file_in_the_way(tmp_path) -> None:
    run = tmp_path / "dir with spaces é ü" / "run"
    assert _tiny_lm_run(run, steps=1).step == 1
    assert _tiny_lm_run(run, steps=2, resume=True).step == 2
    in_the_way = tmp_path / "a file"
    in_the_way.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        _tiny_lm_run(in_the_way, steps=1)
    assert in_the_way.read_text() == "not a directory"


def test_fair_info_nce_names_sensitive_when_its_discretizer_refuses_it() -> None:
    """The discretizer's own message named its argument ``x``, which the user never passed."""
    from clusterformers import FairInfoNCELoss
    from clusterformers.contrastive import KMeansDiscretizer

    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    fitted = KMeansDiscretizer(3).fit(torch.rand(30, 3, generator=g))
    with pytest.raises(ValueError, match=r"sensitive \(float, shape \[6, 2\]\) was refused by the discretizer "
                                         r"KMeansDiscretizer: x must have s = 3 columns"):
        FairInfoNCELoss(discretizer=fitted)(z1, z2, torch.rand(6, 2, generator=g))
    with pytest.raises(ValueError, match="sensitive .* refused .* is not fitted"):
        FairInfoNCELoss(discretizer=KMeansDiscretizer(3))(z1, z2, torch.rand(6, 3, generator=g))
    with pytest.raises(TypeError, match=r"discretizer must map sensitive to integer groups \[b\] = \[6\], got "
                                        r"torch.float32 \[6\]"):
        FairInfoNCELoss(discretizer=lambda s: s[:, 0])(z1, z2, torch.rand(6, 3, generator=g))
    assert torch.isfinite(FairInfoNCELoss(discretizer=fitted)(z1, z2, torch.rand(6, 3, generator=g)))


def test_sparse_fare_buckets_that_are_not_an_integer_tensor_are_named() -> None:
    """A list once crashed with AttributeError and complex ids with torch's '"lt_cpu" not implemented'."""
    g = torch.Generator().manual_seed(7)
    z1, z2, s = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.rand(6, 3, generator=g)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for impl in ("sorted", "dense"):
        loss_fn = SparseFARELoss(3, impl=impl)
        with pytest.raises(TypeError, match=r"buckets must be a torch.Tensor of integers \[b\] = \[6\], got list"):
            loss_fn(z1, z2, s, buckets=ids.tolist())
        for dtype in (torch.complex64, torch.float64):
            with pytest.raises(ValueError, match=f"buckets must be non-negative integers .* got dtype {dtype}"):
                loss_fn(z1, z2, s, buckets=ids.to(dtype))
        assert torch.isfinite(loss_fn(z1, z2, s, buckets=ids))


def test_damaged_or_out_of_range_user_files_are_refused_with_their_path(tmp_path) -> None:
    """Each of these once ended in a raw parser error without the path, or in silently wrong labels."""
    import bz2
    import gzip

    import numpy as np

    from clusterformers.data import build_corpus, load_mnist5k, load_npz
    from clusterformers.data.text import load_documents

    def refused(load, path, match: str) -> None:
        with pytest.raises(ValueError, match=match) as err:
            load(path)
        assert str(path) in str(err.value)

    images, labels = np.zeros((2, 3, 3), np.uint8), np.array([0, 1])
    npy = tmp_path / "array.npz"
    with npy.open("wb") as handle:
        np.save(handle, images)  # a .npy under a .npz name: np.load gives an array, not an archive
    refused(load_npz, npy, "not a readable .npz.*a .npy file")
    for name, bad in [("inf", np.array([0.0, np.inf])), ("huge", np.array([0.0, 1e30])),
                      ("uint64", np.array([0, 2**64 - 1], dtype=np.uint64))]:  # were cast to garbage int64
        np.savez(tmp_path / f"{name}.npz", images=images, labels=bad)
        refused(load_npz, tmp_path / f"{name}.npz", "labels must be non-negative integers below 2\\*\\*63")
    np.savez(tmp_path / "td.npz", images=images.astype("timedelta64[s]"), labels=labels)  # was read as pixels
    refused(load_npz, tmp_path / "td.npz", "images must be numbers, got dtype timedelta64")
    np.savez(tmp_path / "td_labels.npz", images=images, labels=labels.astype("timedelta64[s]"))  # was a TypeError
    refused(load_npz, tmp_path / "td_labels.npz", "labels must be numbers")

    row = ",".join(["0"] * 784)
    (tmp_path / "inf.csv").write_text(f"{row},inf\n")  # the label became -2**63
    refused(load_mnist5k, tmp_path / "inf.csv", "labels below 2\\*\\*63, got range inf..inf")
    (tmp_path / "plain.csv.gz").write_text(f"{row},3\n")  # BadGzipFile
    refused(load_mnist5k, tmp_path / "plain.csv.gz", "cannot be read .*BadGzipFile")
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(f"{row},3\n".encode())[:-12])  # EOFError
    refused(load_mnist5k, tmp_path / "cut.csv.gz", "cannot be read .*EOFError")
    (tmp_path / "empty.csv").write_bytes(b"")  # was "expected 785 columns, got 1"
    refused(load_mnist5k, tmp_path / "empty.csv", "holds no rows")

    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x07" * 9)  # zlib.error
    refused(lambda p: build_corpus("byte", path=p), tmp_path / "broken.txt.gz", "cannot be read .*error")
    (tmp_path / "cut.xml").write_text("<mediawiki><page><title>A</title>")  # xml ParseError
    refused(load_documents, tmp_path / "cut.xml", "not a well-formed MediaWiki XML dump")
    (tmp_path / "plain.xml.bz2").write_text("<mediawiki/>")  # OSError: Invalid data stream
    refused(load_documents, tmp_path / "plain.xml.bz2", "cannot be read .*OSError")
    good = tmp_path / "good.xml.bz2"
    good.write_bytes(bz2.compress(b"<mediawiki><page><title>A</title><revision><text>Some words.</text></revision>"
                                  b"</page></mediawiki>"))
    assert load_documents(good) == ["Some words."]


def test_build_corpus_reads_a_rewritten_file_again(tmp_path) -> None:
    """The corpus cache was keyed on the path alone: a rewritten file gave the old corpus."""
    from clusterformers.data import build_corpus

    path = tmp_path / "mine.txt"
    path.write_text("alpha beta gamma " * 50)
    assert build_corpus("byte", path=path).train[:5].tolist() == list(b"alpha")
    path.write_text("delta epsilon " * 80)
    assert build_corpus("byte", path=path).train[:5].tolist() == list(b"delta")



def test_softmoe_tokens_near_1e20_are_normalised_not_zeroed() -> None:
    from clusterformers import SoftMoE

    torch.manual_seed(0)
    layer = SoftMoE(6, 4, 1, 8)
    x = torch.randn(2, 5, 6)
    # SoftMoE's dispatch sees unit-normalised tokens: a token scaled by 1e20 routes like the token itself
    torch.testing.assert_close(layer(x * 1e20) / 1.0, layer(x), rtol=1e-5, atol=1e-6)
    assert layer(x * 1e20).abs().max() > 0.01


def test_router_losses_ignore_padded_overflow_and_refuse_no_kept_tokens() -> None:
    from clusterformers import load_balancing_loss, router_z_loss

    logits = torch.randn(6, 4)
    keep = torch.tensor([True, True, True, True, False, False])
    clean = router_z_loss(logits, keep)
    poisoned = logits.clone()
    poisoned[5] = 1e20  # a padded token whose squared logsumexp overflows float32
    assert torch.isfinite(router_z_loss(poisoned, keep)) and torch.equal(router_z_loss(poisoned, keep), clean)
    expected = torch.logsumexp(logits[:4], dim=1).square().mean()
    torch.testing.assert_close(clean, expected)
    none = torch.zeros(6, dtype=torch.bool)
    for call in (lambda: router_z_loss(logits, none), lambda: load_balancing_loss(logits, 4, 2, none)):
        with pytest.raises(ValueError, match="key_padding_mask keeps none"):
            call()
    assert router_z_loss(logits, none, check_inputs=False) == 0  # unchecked: no host read, an empty mean is 0


def test_fare_running_norm_refuses_an_empty_group_batch_clearly() -> None:
    from clusterformers import FARELoss

    loss = FARELoss(3, z_norm="running")
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert torch.equal(loss.running_mean, torch.zeros(3))  # the rejected call changed no state


@pytest.mark.parametrize("killed_after", ["model", "optimizer"])
def test_a_save_killed_between_its_renames_resumes_from_the_committed_checkpoint(tmp_path, monkeypatch,
                                                                                  killed_after) -> None:
    """A kill after the new tensor file(s) replaced the old ones but before state.json (the commit point):
    the run resumes from the committed checkpoint, and ends with the parameters of an uninterrupted run."""
    from clusterformers import checkpoint

    _tiny_lm_run(tmp_path / "whole", steps=4)
    run = tmp_path / "run"
    _tiny_lm_run(run, steps=4, stop_at=2)
    real = checkpoint.atomic_write

    def dying(path, write):
        real(path, write)
        if path.name == {"model": checkpoint.MODEL_FILE, "optimizer": checkpoint.OPTIMIZER_FILE}[killed_after]:
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(checkpoint, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        _tiny_lm_run(run, steps=4, resume=True)  # its step-3 save dies half-way
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    assert (run / (checkpoint.MODEL_FILE + checkpoint.PREVIOUS)).is_file()
    resumed = _tiny_lm_run(run, steps=4, resume=True)
    assert resumed.step == 4 and not list(run.glob("*.prev"))
    whole, ours = _load_params(tmp_path / "whole"), _load_params(run)
    assert whole.keys() == ours.keys() and all(torch.equal(whole[k], ours[k]) for k in whole)


def _load_params(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint.safetensors"))
