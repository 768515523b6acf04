"""MuonClip: the Muon update against torch.optim.Muon, per-expert orthogonalisation,
QK-Clip on MLA (openk2) and MHA/GQA (transformers Llama), master weights,
argument checks and state_dict round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torch.optim._muon as torch_muon
from openk2.model.config import K2Config
from openk2.model.transformer import build_model
from openk2.optim import MuonClip, QKClip, find_attention_heads, max_logit, newton_schulz, param_groups
from openk2.optim.newton_schulz import NS_SCHEDULES, ns_schedule

BF16_REL = 3e-2  # two bf16 Newton-Schulz implementations differ by ~1-2% (each is ~1.5% from exact)


def tiny_k2(layers: int = 2, **kw) -> K2Config:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, rope_scaling=None, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return K2Config(**base)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ Muon math
def _run_pair(shapes, steps, nesterov, wd=0.1, lr=0.02, seed=0, dtype=torch.float32, **mc):
    torch.manual_seed(seed)
    ours = [nn.Parameter(torch.randn(s, dtype=dtype) * 0.02) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": True}], lr=lr, weight_decay=wd, nesterov=nesterov, **mc)
    ref = torch.optim.Muon(theirs, lr=lr, weight_decay=wd, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    return start, ours, theirs


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_matmul", ["native", "fp32"])
def test_2d_updates_match_torch_muon_bf16(nesterov, ns_matmul):
    shapes = [(64, 256), (256, 64), (96, 96), (48, 80), (64, 256)]
    start, ours, theirs = _run_pair(shapes, 3, nesterov, ns_matmul=ns_matmul)
    for s, a, b in zip(start, ours, theirs):
        assert rel(a - s, b - s) < BF16_REL, a.shape


def test_2d_update_math_matches_torch_muon_exactly_in_fp64(monkeypatch):
    """With both Newton-Schulz kernels in fp64, momentum, Nesterov, RMS scale and decay agree to 1e-10."""

    def ns64(grad, ns_coefficients, ns_steps, eps):
        return newton_schulz(grad.double(), ns_steps, ns_coefficients, eps, torch.float64)

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns64)
    for nesterov in (True, False):
        start, ours, theirs = _run_pair([(32, 72), (72, 32), (40, 40)], 3, nesterov, ns_dtype=torch.float64,
                                          dtype=torch.float64)
        for s, a, b in zip(start, ours, theirs):
            assert rel(a - s, b - s) < 1e-10


def test_bf16_newton_schulz_is_as_accurate_as_torchs():
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        G = torch.randn(shape)
        exact = newton_schulz(G.double(), dtype=torch.float64)
        theirs = torch_muon._zeropower_via_newtonschulz(G, NS_SCHEDULES["muon"][0], 5, 1e-7).double()
        ours = newton_schulz(G).double()
        assert rel(ours, exact) < 1.25 * rel(theirs, exact) + 1e-3
        assert rel(ours, theirs) < BF16_REL


def test_bf16_on_fp32_units_keeps_bf16_values():
    """ns_matmul="fp32": every iterate is a bf16 value (fp32 accumulation, one rounding per product)."""
    from openk2.optim.newton_schulz import _ns_kernel

    torch.manual_seed(0)
    G = torch.randn(8, 48, 96)
    sched = ns_schedule("muon", 5)
    emulated = _ns_kernel(G, sched, 1e-7, torch.bfloat16, torch.float32)
    assert emulated.dtype == torch.float32 and torch.equal(emulated, emulated.bfloat16().float())
    native = _ns_kernel(G, sched, 1e-7, torch.bfloat16, torch.bfloat16).float()
    exact = newton_schulz(G.double(), dtype=torch.float64)
    assert rel(emulated, native) < 1e-2
    assert rel(emulated, exact) < 1.25 * rel(native, exact)


def test_chunked_stack_equals_each_matrix_alone():
    torch.manual_seed(0)
    G = torch.randn(40, 128, 128, dtype=torch.float64)  # 2 MB chunks of 16 matrices on a CPU
    stacked = newton_schulz(G, dtype=torch.float64)
    alone = torch.stack([newton_schulz(g, dtype=torch.float64) for g in G])
    assert torch.allclose(stacked, alone, rtol=0, atol=1e-12)


def test_update_rms_is_0_2():
    """O_t * 0.2 * sqrt(max(n, m)) has RMS ~0.2 for a full-rank update (what AdamW's updates have)."""
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = MuonClip([{"params": [p], "use_muon": True}], lr=1.0, weight_decay=0.0, ns_dtype=torch.float32,
                       ns_coefficients="quintic", ns_steps=12)
        p.grad = torch.randn(shape)
        opt.step()
        assert abs(float(p.detach().pow(2).mean().sqrt()) - 0.2) < 0.01


def test_3d_experts_equal_each_matrix_alone():
    torch.manual_seed(0)
    E = 6
    G = torch.randn(E, 24, 40)
    stacked = newton_schulz(G, dtype=torch.float64)
    alone = torch.stack([newton_schulz(G[e], dtype=torch.float64) for e in range(E)])
    assert torch.allclose(stacked, alone, rtol=0, atol=1e-12)
    stacked_bf16 = newton_schulz(G).float()
    for e in range(E):
        assert rel(stacked_bf16[e], newton_schulz(G[e]).float()) < 1e-2

    # through the optimizer: one [E, n, m] parameter == E separate [n, m] parameters
    w = nn.Parameter(torch.randn(E, 40, 24) * 0.02)
    ws = [nn.Parameter(w.detach()[e].clone()) for e in range(E)]
    o1 = MuonClip([{"params": [w], "use_muon": True}], lr=0.01, ns_dtype=torch.float64)
    o2 = MuonClip([{"params": ws, "use_muon": True}], lr=0.01, ns_dtype=torch.float64)
    for _ in range(2):
        g = torch.randn_like(w)
        w.grad = g.clone()
        for e in range(E):
            ws[e].grad = g[e].clone()
        o1.step()
        o2.step()
    assert torch.allclose(w.detach(), torch.stack([x.detach() for x in ws]), rtol=0, atol=1e-7)


def test_schedules():
    assert ns_schedule("muon", 5) == ((3.4445, -4.7750, 2.0315),) * 5
    pe = ns_schedule("polar_express", 10)
    assert len(pe) == 10 and pe[-1] == (1.875, -1.25, 0.375)
    assert ns_schedule([(1.0, 0.0, 0.0), (2.0, 0.0, 0.0)], 3) == ((1.0, 0.0, 0.0), (2.0, 0.0, 0.0), (2.0, 0.0, 0.0))
    torch.manual_seed(0)
    G = torch.randn(32, 64, dtype=torch.float64)
    for name in ("polar_express", "quintic"):
        X = newton_schulz(G, steps=12, coefficients=name, dtype=torch.float64)
        s = torch.linalg.svdvals(X)
        assert float((s - 1).abs().max()) < 0.05, name


# ------------------------------------------------------------------ partition
def test_default_partition_of_k2():
    model = build_model(tiny_k2())

    def by_kind(opt):
        out = {True: set(), False: set()}
        for g in opt.param_groups:
            out[g["use_muon"]] |= set(g["param_names"])
        return out

    opt = MuonClip.for_model(model, qk_clip_tau=None, weight_decay=0.1)
    groups = by_kind(opt)
    muon, adamw = groups[True], groups[False]
    # norm gains and biases take no weight decay; matrices, embeddings and the head do
    shapes = dict(model.named_parameters())
    for g in opt.param_groups:
        assert all((g["weight_decay"] == 0.0) == (shapes[n].dim() < 2) for n in g["param_names"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight",
                 "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert name in adamw
    for name in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.1.mlp.experts.gate_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert name in muon
    assert muon | adamw == {n for n, _ in model.named_parameters()}
    assert by_kind(MuonClip(model.named_parameters())) == groups


def test_fused_gate_up_experts_are_orthogonalised_as_gate_and_up():
    """transformers-5 DeepseekV3 `mlp.experts.gate_up_proj` [E, 2I, H]: Muon's update == gate and up separately."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fused = dict(hf.named_parameters())[name]
    E, I2, H = fused.shape
    assert I2 == 2 * cfg.moe_intermediate_size
    groups = {n: g for g in param_groups(hf) for n, _ in g["params"]}
    assert groups[name]["use_muon"] and groups[name].get("ns_split") == 2
    kw = dict(lr=0.1, weight_decay=0.1, ns_dtype=torch.float64)
    for make in (lambda ps: MuonClip(param_groups(hf), **kw), lambda ps: MuonClip(hf.named_parameters(), **kw)):
        w0 = fused.detach().clone()
        gate, up = (nn.Parameter(t.clone()) for t in w0.chunk(2, dim=1))
        opt = make(None)
        ref = MuonClip([{"params": [("gate", gate), ("up", up)], "use_muon": True}], **kw)
        for _ in range(2):
            for p in hf.parameters():
                p.grad = None
            fused.grad = torch.randn_like(fused)
            gate.grad, up.grad = (g.clone() for g in fused.grad.chunk(2, dim=1))
            opt.step()
            ref.step()
        got_gate, got_up = fused.detach().chunk(2, dim=1)
        assert torch.allclose(got_gate, gate, rtol=0, atol=1e-6) and torch.allclose(got_up, up, rtol=0, atol=1e-6)
        assert not torch.allclose(fused, w0)
        with torch.no_grad():
            fused.copy_(w0)


def test_tied_head_goes_to_adamw():
    model = build_model(tiny_k2(tie_word_embeddings=True))
    muon = {id(p) for g in param_groups(model) if g["use_muon"] for _, p in g["params"]}
    assert id(model.lm_head.weight) not in muon and id(model.model.embed_tokens.weight) not in muon


def test_bad_arguments_fail_at_construction():
    model = build_model(tiny_k2())
    with pytest.raises(ValueError, match="lr must be"):
        MuonClip(model.named_parameters(), lr=-1e-3)
    with pytest.raises(ValueError, match="param group 0: lr must be"):
        MuonClip([{"params": list(model.named_parameters()), "lr": -1.0}])
    for tau in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be"):
            MuonClip.for_model(model, qk_clip_tau=tau)
    with pytest.raises(ValueError, match=r"param group 0: 'model.norm.weight' of shape \(64,\) is in a Muon group"):
        MuonClip([{"params": [("model.norm.weight", model.model.norm.weight)], "use_muon": True}])
    with pytest.raises(ValueError, match="cannot tell hidden matrices"):
        MuonClip(model.parameters())
    with pytest.raises(ValueError, match="momentum must be"):
        MuonClip(model.named_parameters(), momentum=1.0)
    with pytest.raises(ValueError, match="unknown Newton-Schulz schedule"):
        MuonClip(model.named_parameters(), ns_coefficients="nope")
    with pytest.raises(ValueError, match="ns_steps must be"):
        MuonClip(model.named_parameters(), ns_steps=0)
    with pytest.raises(ValueError, match="betas"):
        MuonClip(model.named_parameters(), betas=(0.9, 1.5))


def test_add_param_group_partitions_by_name_and_rolls_back_bad_groups():
    a, b, c = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(3))
    opt = MuonClip([("layer.weight", a)])
    opt.add_param_group({"params": [("layer.bias", b)]})
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    with pytest.raises(ValueError, match="param group 2: 'v' of shape"):
        opt.add_param_group({"params": [("v", c)], "use_muon": True})
    assert len(opt.param_groups) == 2


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(s)) for s in [(50,), (7, 3), (128, 16)]]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": False}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_step_counters_live_where_the_fused_kernel_reads_them(monkeypatch):
    """torch's fused AdamW keeps `step` on the parameter's device; so must MuonClip (meta stands in for a GPU)."""
    import openk2.optim.muonclip as mc

    seen = []

    def fake_fused(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, **kw):
        seen.append([(s.device, p.device) for p, s in zip(params, steps)])

    monkeypatch.setattr(mc, "_FUSED_DEVICES", getattr(mc, "_FUSED_DEVICES", ("cpu", "cuda")) + ("meta",), raising=False)
    monkeypatch.setattr(torch, "_fused_adamw_", fake_fused)
    for device in ("meta", "cpu"):
        ps = [nn.Parameter(torch.zeros(s, device=device)) for s in [(5,), (3, 1)]]
        opt = MuonClip([{"params": ps, "use_muon": False}])
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in ps:
            assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].dtype == torch.float32
        assert seen[-1] == [(p.device, p.device) for p in ps]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_on_cuda_matches_torch_fused_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(50,), (7, 3)]]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": False}], lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert opt.state[a]["step"].device == a.device
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------- QK-Clip
def _capture_attention_inputs(model):
    """Record each attention layer's inputs (x, cos, sin) so it can be re-run on exactly the same batch."""
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, tuple(t.detach() for t in args[:3])))
             for i, a in enumerate(model.attention_layers())]
    return seen, hooks


def _rerun_max_logits(model, seen):
    out = []
    for i, a in enumerate(model.attention_layers()):
        a.reset_max_logit()
        with torch.no_grad():
            a(*seen[i])
        out.append(a.max_logit.clone())
        a.reset_max_logit()
    return torch.stack(out)


def _mla_rows(attn, h):
    d = attn.qk_nope_head_dim + attn.qk_rope_head_dim
    kv = attn.qk_nope_head_dim + attn.v_head_dim
    return slice(h * d, (h + 1) * d), slice(h * kv, (h + 1) * kv)


@pytest.mark.parametrize("q_lora_rank,alpha", [(32, 0.5), (None, 0.5), (32, 0.3)])
def test_qk_clip_mla(q_lora_rank, alpha):
    """q^C * gamma^alpha, k^C * gamma^(1 - alpha), q^R * gamma, k^R and v untouched (by hand, per head)."""
    torch.manual_seed(0)
    model = build_model(tiny_k2(q_lora_rank=q_lora_rank))
    x = torch.randint(0, 128, (2, 24))
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, qk_clip_alpha=alpha)
    seen, hooks = _capture_attention_inputs(model)
    model(x, labels=x).loss.backward()
    S = model.max_logits().clone()
    tau = float(S.flatten().median())  # half the heads above tau
    opt.qk_clip.tau = tau
    before = copy.deepcopy(model.state_dict())
    opt.step()
    for h in hooks:
        h.remove()
    clipped = S > tau
    assert opt.clip_stats["heads_clipped"] == int(clipped.sum()) > 0
    assert opt.clip_stats["heads_clipped_per_layer"] == clipped.sum(1).tolist()
    assert opt.clip_stats["max_logit_per_layer"] == pytest.approx(S.amax(1).tolist())
    S2 = _rerun_max_logits(model, seen)
    assert bool((S2[clipped] <= tau * (1 + 1e-3)).all())
    assert bool((S2[clipped] >= tau * (1 - 1e-3)).all())  # scaled by exactly gamma, not more
    assert torch.equal(S2[~clipped], S[~clipped])
    after = model.state_dict()
    for i, attn in enumerate(model.attention_layers()):
        pre = f"model.layers.{i}.self_attn."
        qname = pre + ("q_b_proj.weight" if q_lora_rank else "q_proj.weight")
        assert torch.equal(after[pre + "kv_a_proj_with_mqa.weight"], before[pre + "kv_a_proj_with_mqa.weight"])  # k^R
        for h in range(attn.num_heads):
            qr, kvr = _mla_rows(attn, h)
            q0, q1 = before[qname][qr], after[qname][qr]
            k0, k1 = before[pre + "kv_b_proj.weight"][kvr], after[pre + "kv_b_proj.weight"][kvr]
            if not clipped[i, h]:
                assert torch.equal(q0, q1) and torch.equal(k0, k1)
                continue
            g = tau / float(S[i, h])
            nope = attn.qk_nope_head_dim
            assert torch.allclose(q1[:nope], q0[:nope] * g ** alpha, rtol=1e-6, atol=0)  # q^C
            assert torch.allclose(q1[nope:], q0[nope:] * g, rtol=1e-6, atol=0)  # q^R
            assert torch.allclose(k1[:nope], k0[:nope] * g ** (1 - alpha), rtol=1e-6, atol=0)  # k^C
            assert torch.equal(k1[nope:], k0[nope:])  # v
    assert opt.clip_stats["heads_ever_clipped"] == int(clipped.sum())


def test_qk_clip_leaves_unclipped_heads_bitwise_equal_to_plain_muon():
    torch.manual_seed(0)
    model = build_model(tiny_k2())
    twin = copy.deepcopy(model)
    x = torch.randint(0, 128, (2, 24))
    opt = MuonClip.for_model(model, lr=1e-2)
    opt_twin = MuonClip.for_model(twin, lr=1e-2, qk_clip_tau=None)
    for m in (model, twin):
        m(x, labels=x).loss.backward()
    S = model.max_logits().clone()
    opt.qk_clip.tau = float(S.flatten().median())
    opt.step()
    opt_twin.step()
    clipped = S > opt.qk_clip.tau
    for i, (a, b) in enumerate(zip(model.attention_layers(), twin.attention_layers())):
        for h in range(a.num_heads):
            qr, kvr = _mla_rows(a, h)
            same = torch.equal(a.q_b_proj.weight[qr], b.q_b_proj.weight[qr]) and torch.equal(
                a.kv_b_proj.weight[kvr], b.kv_b_proj.weight[kvr])
            assert same != bool(clipped[i, h])
        assert torch.equal(a.kv_a_proj_with_mqa.weight, b.kv_a_proj_with_mqa.weight)


def test_max_logit_is_a_running_max_over_micro_batches():
    torch.manual_seed(0)
    model = build_model(tiny_k2())
    clip = QKClip.from_model(model, tau=1e9)
    xa, xb = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    model(xa)
    Sa = clip.max_logits().clone()
    clip.reset()
    model(xb)
    Sb = clip.max_logits().clone()
    clip.reset()
    model(xa)
    model(xb)
    assert torch.equal(clip.max_logits(), torch.maximum(Sa, Sb))
    stats = clip.step()
    assert stats["heads_clipped"] == 0
    assert bool(torch.isneginf(clip.max_logits()).all())  # reset after the step


def test_max_logit_helper_equals_the_models_statistic():
    """openk2.optim.max_logit (no autograd, beside a fused kernel) == MLAttention's eager statistic."""
    torch.manual_seed(0)
    model = build_model(tiny_k2())
    model.set_track_max_logit(True)
    seen, hooks = _capture_attention_inputs(model)
    model(torch.randint(0, 128, (3, 20)))
    for h in hooks:
        h.remove()
    for i, attn in enumerate(model.attention_layers()):
        with torch.no_grad():
            q_nope, q_rope, latent, k_rope = attn._project(*seen[i])
            q, k, _ = attn._expand(latent, q_nope, q_rope, k_rope)
        assert torch.allclose(max_logit(q, k, attn.softmax_scale), attn.max_logit, rtol=1e-5, atol=1e-6)


def test_master_weights_keep_the_clip():
    torch.manual_seed(0)
    model = build_model(tiny_k2(), dtype=torch.bfloat16)
    x = torch.randint(0, 128, (2, 24))
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0, master_weights=True)
    model(x, labels=x).loss.backward()
    S = model.max_logits().clone()
    opt.qk_clip.tau = float(S.flatten().median())
    opt.step()
    attn = model.attention_layers()[0]
    master = opt.state[attn.q_b_proj.weight]["master_weight"]
    assert master.dtype == torch.float32
    assert torch.equal(master.bfloat16(), attn.q_b_proj.weight)  # the clip reached the master copy
    clipped_w = attn.q_b_proj.weight.detach().clone()
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.qk_clip.tau = 1e9
    opt.step()  # lr = 0: a step copies master -> param; the clip must survive it
    assert torch.equal(attn.q_b_proj.weight, clipped_w)


def _llama(num_heads, num_kv_heads, impl):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                   max_position_embeddings=64, attention_bias=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()  # dropout 0: training-mode forwards are deterministic
    model.set_attn_implementation(impl)
    for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj):
        nn.init.normal_(lin.bias, std=0.5)
    return model


@torch.no_grad()
def _llama_reference_max_logit(model, x, attention_mask=None):
    """S_max^h computed from scratch: q/k projections, RoPE, causal (and padding) max."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[0].self_attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["hidden_states"],
                                                                      pe=kw["position_embeddings"]), with_kwargs=True)
    model(x, attention_mask=attention_mask)
    hook.remove()
    h, (cos, sin) = seen["h"], seen["pe"]
    B, T, _ = h.shape
    D = attn.head_dim
    q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    logits = logits.masked_fill(~keep, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_qk_clip_gqa_llama(impl):
    model = _llama(4, 2, impl)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # heads 0, 1 (key head 0) and head 2 (key head 1) get large logits; head 3 does not
        attn.q_proj.bias.zero_()
        attn.k_proj.bias.fill_(1.0)  # q_i . k_i of equal biases survives RoPE (same rotation on the diagonal)
        attn.q_proj.bias[:48] = 1.0
    x = torch.randint(0, 96, (2, 20))
    ref = _llama_reference_max_logit(model, x)
    out_before = model(x).logits
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0)
    assert torch.equal(model(x).logits, out_before)  # routing through QK-Clip's attention changes nothing
    S = opt.qk_clip.max_logits().clone()
    assert torch.allclose(S, ref, rtol=1e-5, atol=1e-6)
    pad = torch.ones_like(x)
    pad[0, :5] = 0  # left padding: masked keys must not count
    opt.qk_clip.reset()
    model(x, attention_mask=pad)
    assert torch.allclose(opt.qk_clip.max_logits(), _llama_reference_max_logit(model, x, pad), rtol=1e-5, atol=1e-6)
    opt.qk_clip.reset()
    model(x)
    tau = max(float(S[3]) * 1.01, 1e-3)
    assert bool((S[:3] > tau).all())
    opt.qk_clip.tau = tau
    W = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert opt.clip_stats["heads_clipped"] == 3
    S2 = _llama_reference_max_logit(model, x)
    assert bool((S2[:3] <= tau * (1 + 1e-3)).all()) and bool((S2[:3] >= tau * (1 - 1e-3)).all())
    assert torch.equal(S2[3], ref[3])
    pre = "model.layers.0.self_attn."
    for suffix in ("weight", "bias"):
        q0, q1 = W[pre + "q_proj." + suffix], attn.q_proj.get_parameter(suffix).detach()
        k0, k1 = W[pre + "k_proj." + suffix], attn.k_proj.get_parameter(suffix).detach()
        assert torch.equal(q1[48:], q0[48:])  # head 3 stayed under tau: untouched
        assert torch.equal(k1[16:], k0[16:])  # key head 1 is shared with head 3: untouched
        g = tau / S[:3]
        kappa = float(g[:2].max()) ** 0.5  # key head 0: both its query heads clipped -> shares the scale
        assert torch.allclose(k1[:16], k0[:16] * kappa, rtol=1e-6)
        for h in range(2):
            assert torch.allclose(q1[h * 16:(h + 1) * 16], q0[h * 16:(h + 1) * 16] * float(g[h]) / kappa, rtol=1e-6)
        assert torch.allclose(q1[32:48], q0[32:48] * float(g[2]), rtol=1e-6)  # all of head 2's gamma on its query


def test_qk_clip_mha_llama_splits_gamma():
    model = _llama(4, 4, "sdpa")
    x = torch.randint(0, 96, (2, 20))
    opt = MuonClip.for_model(model, lr=0.0, weight_decay=0.0)
    model(x)
    S = opt.qk_clip.max_logits().clone()
    tau = float(S.median())
    opt.qk_clip.tau = tau
    attn = model.model.layers[0].self_attn
    q0, k0 = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    opt.step()
    S2 = _llama_reference_max_logit(model, x)
    for h in range(4):
        rows = slice(h * 16, (h + 1) * 16)
        if S[h] > tau:
            g = math.sqrt(tau / float(S[h]))
            assert torch.allclose(attn.q_proj.weight[rows], q0[rows] * g, rtol=1e-6)
            assert torch.allclose(attn.k_proj.weight[rows], k0[rows] * g, rtol=1e-6)
            assert float(S2[h]) <= tau * (1 + 1e-3)
        else:
            assert torch.equal(attn.q_proj.weight[rows], q0[rows]) and torch.equal(attn.k_proj.weight[rows], k0[rows])


def test_eval_forwards_do_not_feed_the_clip():
    """Validation / generation between steps (eval mode) must not change which heads get clipped."""
    x = torch.randint(0, 96, (2, 20))
    for model in (_llama(4, 2, "sdpa"), build_model(tiny_k2(vocab_size=96))):
        clip = QKClip.from_model(model, tau=1e9)
        model.eval()
        with torch.no_grad():
            model(x)
        assert bool(torch.isneginf(clip.max_logits()).all()), type(model).__name__
        model.train()
        model(x)
        assert bool(torch.isfinite(clip.max_logits()).all()), type(model).__name__


def test_qk_norm_models_are_refused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="QK-Norm"):
        find_attention_heads(transformers.Qwen3ForCausalLM(cfg))


# ------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_resumes_bitwise(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_k2())
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(4)]

    def train(m, opt, bs):
        for x in bs:
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    def make(m):
        opt = MuonClip.for_model(m, lr=1e-2)
        opt.qk_clip.tau = 0.05  # low enough to clip in this tiny model
        return opt

    full = copy.deepcopy(model)
    opt_full = make(full)
    train(full, opt_full, batches)

    part = copy.deepcopy(model)
    opt_part = make(part)
    train(part, opt_part, batches[:2])
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(ck["model"])
    opt_res = make(resumed)
    opt_res.load_state_dict(ck["opt"])
    assert opt_res.qk_clip.steps == 2
    train(resumed, opt_res, batches[2:])
    assert opt_full.clip_stats["heads_ever_clipped"] > 0
    assert opt_res.clip_stats == opt_full.clip_stats
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_master_weight_state_survives_load_in_fp32():
    torch.manual_seed(0)
    model = build_model(tiny_k2(), dtype=torch.bfloat16)
    opt = MuonClip.for_model(model, lr=1e-2, master_weights=True, qk_clip_tau=None)
    x = torch.randint(0, 128, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    opt2 = MuonClip.for_model(model, lr=1e-2, master_weights=True, qk_clip_tau=None)
    opt2.load_state_dict(opt.state_dict())
    for p, s in opt2.state.items():
        assert s["master_weight"].dtype == torch.float32
        assert torch.equal(s["master_weight"], opt.state[p]["master_weight"])
        for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if k in s:
                assert s[k].dtype == torch.float32


@pytest.mark.slow
def test_compiled_newton_schulz_matches_eager():
    torch.manual_seed(0)
    shapes = [(32, 64), (64, 32)]
    start, a, _ = _run_pair(shapes, 2, True, ns_dtype=torch.float32, compile_ns=True)
    start, b, _ = _run_pair(shapes, 2, True, ns_dtype=torch.float32)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_gpt_oss_fused_experts_are_not_split_and_expert_biases_use_adamw():
    """GPT-OSS stores gate_up as [E, H, 2I]: splitting its dim -2 would cut H in half. Its [E, n] biases are vectors."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(hidden_size=48, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=24, num_local_experts=4, vocab_size=64,
                                    num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(cfg)
    groups = param_groups(model)
    where = {n: g for g in groups for n, _ in g["params"]}
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    assert where[gu]["use_muon"] and where[gu].get("ns_split") is None
    assert not where[gu + "_bias"]["use_muon"] and not where["model.layers.0.mlp.experts.down_proj_bias"]["use_muon"]
