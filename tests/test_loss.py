"""The fused LM-head + cross-entropy equals F.cross_entropy(h @ W.T) in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from openk2.model.config import get_preset
from openk2.model.loss import linear_cross_entropy
from openk2.model.transformer import build_model


def _data(n=300, h=48, v=500, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.2).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return x, w, t


def _grads(loss, x, w):
    gx, gw = torch.autograd.grad(loss, (x, w))
    return gx, gw


@pytest.mark.parametrize("chunk_elems", [500 * 7, 500 * 64, 1 << 30])  # 7-row chunks (uneven), 64 rows, one chunk
def test_matches_cross_entropy_fp32(chunk_elems):
    x, w, t = _data()
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-100)
    out = linear_cross_entropy(x, w, t, chunk_elems=chunk_elems)
    assert abs(out.item() - ref.item()) < 1e-5
    (rx, rw), (ox, ow) = _grads(ref, x, w), _grads(out * 3.0, x, w)  # upstream gradient scales the result
    assert torch.allclose(ox, 3 * rx, atol=1e-6, rtol=1e-4)
    assert torch.allclose(ow, 3 * rw, atol=1e-6, rtol=1e-4)


def test_ignored_rows_get_no_gradient_and_all_ignored_is_zero():
    x, w, t = _data()
    gx, _ = _grads(linear_cross_entropy(x, w, t), x, w)
    assert float(gx[::5].abs().max()) == 0.0 and float(gx[1::5].abs().max()) > 0
    t_all = torch.full_like(t, -100)
    loss = linear_cross_entropy(x, w, t_all)
    assert loss.item() == 0.0


def test_sum_and_no_grad_paths():
    x, w, t = _data()
    with torch.no_grad():
        ref = F.cross_entropy(x @ w.T, t, ignore_index=-100, reduction="sum")
        assert abs(float(linear_cross_entropy(x, w, t, reduction="sum")) - float(ref)) < 1e-3
        mean = linear_cross_entropy(x, w, t)
    assert not mean.requires_grad
    assert abs(float(mean) - float(ref) / int((t != -100).sum())) < 1e-5


def test_bf16_autocast_close_to_fp32():
    x, w, t = _data(seed=1)
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-100)
    rx, rw = _grads(ref, x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(x, w, t, chunk_elems=500 * 64)
    ox, ow = _grads(out, x, w)
    assert out.dtype == torch.float32 and ox.dtype == torch.float32 and ow.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 2e-2
    assert float((ox - rx).norm() / rx.norm()) < 2e-2 and float((ow - rw).norm() / rw.norm()) < 2e-2


def test_bad_input_is_named():
    x, w, t = _data()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, w, t[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="none")


def test_model_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    cfg = get_preset("k2-nano").replace(vocab_size=300, num_hidden_layers=2)
    model = build_model(cfg).train()
    ids = torch.randint(3, 300, (2, 40))
    labels = ids.clone()
    labels[0, :10] = -100  # e.g. a masked prompt
    fused = model(ids, labels=labels)
    assert fused.logits is None
    g_fused = torch.autograd.grad(fused.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    plain = model(ids, labels=labels, return_logits=True)
    assert plain.logits.shape == (2, 40, 300)
    ref = F.cross_entropy(plain.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(fused.loss.item() - ref.item()) < 1e-5 and abs(plain.loss.item() - ref.item()) < 1e-6
    g_ref = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12))
                for a, b in zip(g_fused, g_ref) if a is not None and b is not None)
    assert worst < 1e-3
    shifted = model(ids[:, :-1], shift_labels=labels[:, 1:]).loss  # same targets, given pre-shifted
    assert abs(shifted.item() - ref.item()) < 1e-5
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :-3])
