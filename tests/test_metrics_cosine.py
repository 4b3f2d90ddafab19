"""token_cosine against an explicit double loop; collect_token_cosine against a hand-threaded model run."""

from __future__ import annotations

import pytest
import torch

from clusterformers.metrics import collect_token_cosine, token_cosine
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.models.vit import ViT, ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_token_cosine(out: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs j < i of valid tokens of cos(out_i, out_j), one sample at a time."""
    values = []
    for b in range(out.shape[0]):
        idx = [i for i in range(out.shape[1]) if keep is None or bool(keep[b, i])]
        total, pairs = 0.0, 0
        for a in range(len(idx)):
            for c in range(a):
                x, y = out[b, idx[a]].double(), out[b, idx[c]].double()
                total += float(x @ y / (x.norm() * y.norm()))
                pairs += 1
        values.append(total / pairs)
    return torch.tensor(values, dtype=torch.float64)


def test_token_cosine_matches_double_loop() -> None:
    torch.manual_seed(0)
    out = torch.randn(3, 7, 5, dtype=torch.float64) + 0.5
    torch.testing.assert_close(token_cosine(out), slow_token_cosine(out), rtol=0, atol=1e-12)
    out32 = out.float()
    torch.testing.assert_close(token_cosine(out32).double(), slow_token_cosine(out32), rtol=0, atol=1e-6)


def test_token_cosine_with_padding_ignores_pads() -> None:
    torch.manual_seed(1)
    out = torch.randn(3, 6, 4, dtype=torch.float64)
    keep = torch.tensor(
        [
            [True, True, True, True, True, True],
            [True, True, False, True, False, False],
            [False, True, True, False, False, False],
        ]
    )
    expected = slow_token_cosine(out, keep)
    torch.testing.assert_close(token_cosine(out, keep), expected, rtol=0, atol=1e-12)
    out[~keep] = float("nan")
    torch.testing.assert_close(token_cosine(out, keep), expected, rtol=0, atol=1e-12)


def test_token_cosine_known_values_and_errors() -> None:
    same = torch.ones(2, 5, 3)
    torch.testing.assert_close(token_cosine(same), torch.ones(2))
    torch.testing.assert_close(token_cosine(torch.eye(4)[None]), torch.zeros(1))
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    torch.testing.assert_close(token_cosine(opposite), -torch.ones(1))
    with pytest.raises(ValueError, match=">= 2 valid tokens"):
        token_cosine(torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(TypeError, match="bool"):
        token_cosine(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        token_cosine(torch.randn(3, 4))


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=3, num_heads=2, attention="elliptical"))


def reference_vit_cosines(model: ViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer per-sample cosines from a hand-threaded run of the ViT's pieces."""
    with torch.no_grad():
        h = model.patch_embed((x - model.pixel_mean) / model.pixel_std).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], dim=1) + model.pos_emb
        v_prev, per_layer = None, []
        for i, block in enumerate(model.blocks):
            attn_out, v = block.attn(block.norm1(h), v_prev=v_prev if i > 0 else None, return_values=True)
            per_layer.append(slow_token_cosine(attn_out))
            h = h + attn_out
            h = h + block.mlp(block.norm2(h))
            v_prev = v
    return per_layer


def test_collect_token_cosine_vit_matches_reference_and_removes_hooks() -> None:
    model = tiny_vit().train()
    x1, x2 = torch.rand(3, 1, 8, 8), torch.rand(2, 1, 8, 8)
    batches = [(x1, torch.zeros(3, dtype=torch.long)), (x2, torch.zeros(2, dtype=torch.long))]
    got = collect_token_cosine(model, batches, "cpu")
    assert len(got) == 3 and all(isinstance(c, float) for c in got)
    ref1, ref2 = reference_vit_cosines(model, x1), reference_vit_cosines(model, x2)
    expected = [float(torch.cat([a, b]).mean()) for a, b in zip(ref1, ref2, strict=True)]  # mean over 5 samples
    assert got == pytest.approx(expected, abs=1e-6)
    assert model.training and all(m.training for m in model.modules())
    assert all(not attn._forward_hooks for attn in model.attention_modules())
    assert collect_token_cosine(model, [x1], "cpu") == pytest.approx([float(r.mean()) for r in ref1], abs=1e-6)


def test_collect_token_cosine_lm_respects_padding() -> None:
    torch.manual_seed(0)
    model = TransformerLM(
        TransformerLMConfig(vocab_size=17, context=8, dim=16, depth=2, num_heads=2, attention="elliptical")
    )
    idx = torch.randint(0, 17, (2, 8))
    lengths = [8, 5]
    mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]
    got = collect_token_cosine(model, [{"idx": idx, "key_padding_mask": mask}], "cpu")
    # Causal + right padding: sample b's valid positions equal a run on its first lengths[b] tokens alone.
    per_sample = [collect_token_cosine(model, [idx[b : b + 1, :n]], "cpu") for b, n in enumerate(lengths)]
    expected = [sum(layer) / 2 for layer in zip(*per_sample, strict=True)]
    assert got == pytest.approx(expected, abs=1e-6)
    unmasked = collect_token_cosine(model, [idx], "cpu")
    assert abs(unmasked[0] - got[0]) > 1e-4
    with pytest.raises(ValueError, match="no batches"):
        collect_token_cosine(model, [], "cpu")
