"""openk2's Llama-family forward equals transformers' (Llama, Qwen2 with q/k/v biases), chunk by chunk."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from openk2.serve.llama import INT4_GROUP, LlamaRunner, _quantize_int4  # noqa: E402


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so that a dropped bias shows
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_in_chunks_then_decode_equals_transformers(kind):
    m = _tiny(kind)
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        ref = m(ids).logits
    r = LlamaRunner(m, "fp32")
    c = r.new_cache(3, 16)
    got = {}
    for row in range(2):  # rows at different lengths: row 0 prefills 10 tokens, row 1 prefills 13
        n = 10 + 3 * row
        r.forward(ids[row : row + 1, :4], c.view(row, 4))
        got[(row, n - 1)] = r.forward(ids[row : row + 1, 4:n], c.view(row, n - 4))[0]
    starts = c.lengths[:2].clone()
    for step in range(8):  # decode both rows together: per-row positions and masks
        tok = torch.stack([ids[b, int(starts[b]) + step] for b in range(2)])[:, None]
        out = r.forward(tok, c.view(slice(0, 2), 1))
        for b in range(2):
            got[(b, int(starts[b]) + step)] = out[b]
    for (b, pos), lg in got.items():
        torch.testing.assert_close(lg, ref[b, pos], atol=2e-4, rtol=1e-4)


def test_bf16_and_int4_formats_stay_close_to_fp32():
    m = _tiny("llama")
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        ref = m(ids).logits[0, -1]
    for fmt in ("bf16", "int4"):
        r = LlamaRunner(m, fmt)
        out = r.forward(ids, r.new_cache(1, 16).view(0, 12))[0]
        # bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding); int4 of random weights ~1/30 of
        # each group's range: the logits move by a fraction of their spread, never wholesale
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < (0.05 if fmt == "bf16" else 0.35), (fmt, rel)


def test_int4_reproduces_weights_already_on_a_4bit_grid():
    # a Q4_1-style matrix: per group of 32, w = q * d + m with q in 0..15 and both ends used
    torch.manual_seed(0)
    out, inp = 16, 64
    q = torch.randint(0, 16, (out, inp))
    q[:, ::INT4_GROUP] = 0
    q[:, 1::INT4_GROUP] = 15
    d = torch.rand(out, inp // INT4_GROUP) * 0.02 + 0.01
    mn = -torch.rand(out, inp // INT4_GROUP) * 0.1
    w = q * d.repeat_interleave(INT4_GROUP, 1) + mn.repeat_interleave(INT4_GROUP, 1)
    packed, sz = _quantize_int4(w)
    x = torch.eye(inp).to(torch.bfloat16)
    deq = torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, sz).float().t()  # [out, inp]
    # the same 16 levels come back: only the bf16 rounding of scale and zero remains
    assert (deq - w).abs().max().item() < 4e-3 * w.abs().max().item()


def test_unsupported_architecture_is_named():
    from openk2.errors import OpenK2Error

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(OpenK2Error, match="gpt2"):
        LlamaRunner(transformers.GPT2LMHeadModel(cfg), "fp32")


def test_int8_head_reproduces_a_per_row_8bit_grid():
    from openk2.serve.llama import Linear, _quantize_int8

    torch.manual_seed(0)
    out, inp = 48, 64
    scale = torch.rand(out) * 0.01 + 0.001
    q = torch.randint(-127, 128, (out, inp))
    q[:, 0] = 127  # each row's largest magnitude sits on the grid's end
    w = q * scale[:, None]
    qq, s = _quantize_int8(w)
    # scale comes back up to its bf16 rounding (2^-9 relative), so every weight does too
    assert ((qq.float() * s.float()[:, None] - w).abs() <= 4e-3 * w.abs().amax(1, keepdim=True)).all()
    x = torch.randn(3, inp).to(torch.bfloat16)
    ref = x.float() @ w.t()
    got = Linear(w, None, "int8")(x).float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_int8_head_only_for_a_head_stored_in_8_bits_and_used_up_to_its_row_limit():
    from openk2.serve.llama import Linear

    m = _tiny("llama")
    assert LlamaRunner(m, "int4").lm_head_int8 is None  # a head stored in 16 bits stays dense
    assert LlamaRunner(m, "bf16", head_bits=8).lm_head_int8 is None  # dense layers: the head stays dense too
    r = LlamaRunner(m, "int4", head_bits=8)
    head = m.lm_head.weight.detach()
    r.lm_head_int8, r.head_int8_max_rows = Linear(head, None, "int8"), 1  # whatever this CPU measured
    ids = torch.randint(0, 256, (2, 12))
    dense = LlamaRunner(m, "int4")
    for B in (1, 2):
        got = r.forward(ids[:B], r.new_cache(B, 16).view(slice(0, B), 12))
        ref = dense.forward(ids[:B], dense.new_cache(B, 16).view(slice(0, B), 12))
        diff = ((got - ref).norm() / ref.norm()).item()
        if B == 1:  # the int8 head: close to the bf16 one, not the same numbers
            assert 0 < diff < 0.02, diff
        else:  # over the limit: the dense head, exactly
            assert diff == 0, diff


def test_smollm2_gguf_stores_layers_in_4_bits_and_the_head_in_8():
    from openk2.serve import backends

    try:
        path = backends.smollm2_path() / backends.SMOLLM2_FILE
    except Exception as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    assert backends._gguf_bits(path) == (4, 8)
