"""K2 model: parity with transformers' DeepseekV3, MLA cache, router, counts, checkpoint errors."""

import json
import math

import pytest
import torch

import openk2
from openk2.errors import CheckpointError, ConfigError
from openk2.model.config import K2Config, get_preset
from openk2.model.moe import GroupedExperts, Router
from openk2.model.transformer import build_model

transformers = pytest.importorskip("transformers")


def _hf_config(**kw):
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.827, max_position_embeddings=512,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0},
    )
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


def _scale_up(model, std=0.08, seed=0):
    """Bigger random weights than the 0.02 default so logits and routing are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


@pytest.fixture(scope="module", params=[True, False], ids=["rope_interleave", "rope_half_split"])
def hf_pair(tmp_path_factory, request):
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(rope_interleave=request.param)).eval()
    assert hf.config.rope_interleave is request.param
    _scale_up(hf)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return hf, d


def test_hf_to_openk2_logits_match(hf_pair):
    hf, d = hf_pair
    ids = torch.randint(0, 512, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = openk2.from_pretrained(d)(ids).logits
    assert ref.abs().max() > 1.0  # non-trivial logits
    assert (ref - out).abs().max().item() < 1e-4


def test_openk2_to_hf_logits_match(hf_pair, tmp_path):
    _, d = hf_pair
    ours = openk2.from_pretrained(d)
    ours.save_pretrained(tmp_path / "ok2", max_shard_size="200KB")  # several shards + index
    assert (tmp_path / "ok2" / "model.safetensors.index.json").exists()
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ok2").eval()
    ids = torch.randint(0, 512, (2, 136), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max().item() < 1e-4


def test_hf_per_expert_names_and_config_roundtrip(hf_pair, tmp_path):
    hf, d = hf_pair
    ours = openk2.from_pretrained(d)
    ours.save_pretrained(tmp_path / "x")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.15.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    cfg = K2Config.from_json_file(tmp_path / "x")
    assert cfg.rope_interleave is hf.config.rope_interleave
    assert cfg.n_group == 4 and cfg.topk_group == 2 and cfg.rope_scaling["factor"] == 4.0
    assert cfg.rope_theta == 10000.0


def test_param_counts_exact_for_kimi_k2():
    counts = build_model(get_preset("kimi-k2"), device="meta").num_parameters()
    assert counts == {"total": 1_026_408_209_408, "activated": 32_861_477_888}


def test_softmax_scale_includes_yarn_mscale_squared():
    cfg = get_preset("kimi-k2")
    m = 0.1 * math.log(32) + 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert cfg.kv_cache_values_per_token == 576


def test_cached_greedy_equals_uncached_and_cache_is_latent_only():
    torch.manual_seed(0)
    cfg = get_preset("k2-nano")
    model = build_model(cfg).eval()
    _scale_up(model, std=0.05)
    prompt = torch.randint(3, cfg.vocab_size, (2, 12))
    out = model.generate(prompt, max_new_tokens=24)
    cur = prompt
    for _ in range(24):
        with torch.no_grad():
            cur = torch.cat([cur, model(cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, cur)
    from openk2.model.attention import MLACache

    cache = MLACache(cfg, 1, 10, torch.float32, torch.device("cpu"))
    assert cache.values_per_token_per_layer() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.nbytes() == 4 * cfg.num_hidden_layers * 10 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_left_padded_batch_generation_matches_single():
    torch.manual_seed(0)
    cfg = get_preset("k2-nano")
    model = build_model(cfg).eval()
    _scale_up(model, std=0.05)
    a = torch.randint(3, cfg.vocab_size, (1, 9))
    b = torch.randint(3, cfg.vocab_size, (1, 5))
    pad = torch.full((1, 4), cfg.pad_token_id)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[0, 9:], model.generate(a, max_new_tokens=8)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, max_new_tokens=8)[0, 5:])


def _brute_force_max_logit(attn, x, cos, sin):
    """S_max^h straight from the weights (q^C, q^R, k^C, k^R), causal pairs only."""
    q_nope, q_rope, latent, k_rope = attn._project(x, cos, sin)
    w = attn.kv_b_proj.weight.view(attn.num_heads, -1, attn.kv_lora_rank)[:, : attn.qk_nope_head_dim]
    k_nope = torch.einsum("btc,hdc->bthd", latent, w)
    s = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    s = s * attn.softmax_scale
    T = x.shape[1]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.amax(dim=(0, 2, 3))


def test_max_logit_statistic_matches_brute_force_and_runs_over_calls():
    torch.manual_seed(0)
    cfg = get_preset("k2-nano")
    model = build_model(cfg)
    _scale_up(model, std=0.2)
    model.set_track_max_logit(True)
    ids1 = torch.randint(3, cfg.vocab_size, (2, 32))
    ids2 = torch.randint(3, cfg.vocab_size, (2, 32))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        x1 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids1))
        x2 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids2))
        cos, sin = model.model.rotary_emb(torch.arange(32)[None].expand(2, 32))
        want = torch.maximum(_brute_force_max_logit(attn, x1, cos, sin), _brute_force_max_logit(attn, x2, cos, sin))
        model(ids1)
        model(ids2)
    assert torch.allclose(model.max_logits()[0], want, rtol=1e-5)
    assert model.max_logits().shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert bool((model.max_logits() > 1.0).all())
    model.reset_max_logits()
    assert bool(torch.isinf(model.max_logits()).all())
    # tracking changes nothing in the output
    model.set_track_max_logit(False)
    with torch.no_grad():
        a = model(ids1).logits
    model.set_track_max_logit(True)
    with torch.no_grad():
        b = model(ids1).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()


def test_router_bias_only_chooses_and_weights_are_scaled():
    cfg = get_preset("k2-nano").replace(n_routed_experts=16, num_experts_per_tok=4)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    w0, i0 = r(x)
    assert torch.allclose(w0.sum(-1), torch.full((64,), cfg.routed_scaling_factor), atol=1e-5)
    with torch.no_grad():
        r.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen...
    w1, i1 = r(x)
    assert bool((i1 == 3).any(-1).all())
    scores = torch.sigmoid(x @ r.weight.T)
    chosen = scores.gather(1, i1)  # ...but weighted by its un-biased score
    assert torch.allclose(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)


def test_router_runs_in_fp32_under_autocast():
    """Under bf16 autocast (the GPU default) the router's logits, scores and weights stay fp32."""
    cfg = get_preset("k2-nano").replace(n_routed_experts=16, num_experts_per_tok=4)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    w_ref, i_ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, i = r(x.bfloat16().float())
        w16, i16 = r(x)
    assert w.dtype == torch.float32 and w16.dtype == torch.float32
    assert torch.equal(i16, i_ref) and torch.allclose(w16, w_ref, rtol=1e-6, atol=1e-7)
    w_ref16, i_ref16 = r(x.bfloat16().float())
    assert torch.equal(i, i_ref16) and torch.allclose(w, w_ref16, rtol=1e-6, atol=1e-7)


def test_bias_update_moves_towards_balance():
    cfg = get_preset("k2-nano")
    model = build_model(cfg).train()
    model(torch.randint(3, cfg.vocab_size, (2, 64)))
    moe = model.moe_layers()[0]
    load = moe.tokens_per_expert.clone().float()
    assert load.sum() == 2 * 64 * cfg.num_experts_per_tok
    before = moe.gate.e_score_correction_bias.clone()
    stats = model.update_router_biases(0.01)
    delta = moe.gate.e_score_correction_bias - before
    assert torch.allclose(delta, 0.01 * torch.sign(load.mean() - load))
    assert stats["expert_load_max_over_mean"] >= 1.0
    assert moe.tokens_per_expert.sum() == 0


def test_grouped_experts_equal_per_expert_loop_with_grads():
    torch.manual_seed(0)
    ex = GroupedExperts(6, 16, 8)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    y = ex(x, counts)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        xe = x[start:start + c]
        ref.append((torch.nn.functional.silu(xe @ ex.gate_proj[e].T) * (xe @ ex.up_proj[e].T)) @ ex.down_proj[e].T)
        start += c
    ref = torch.cat(ref)
    assert torch.allclose(y, ref, atol=1e-5)
    g1 = torch.autograd.grad(y.square().sum(), [x, ex.gate_proj])
    g2 = torch.autograd.grad(ref.square().sum(), [x, ex.gate_proj])
    assert torch.allclose(g1[0], g2[0], atol=1e-4) and torch.allclose(g1[1], g2[1], atol=1e-4)


def test_bf16_model_keeps_fp32_router_bias_and_statistic():
    model = build_model(get_preset("k2-nano"), dtype=torch.bfloat16)
    assert model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert model.attention_layers()[0].max_logit.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_selective_recompute_same_loss_and_grads():
    torch.manual_seed(0)
    cfg = get_preset("k2-nano")
    model = build_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 32))
    l1 = model(ids, labels=ids).loss
    g1 = torch.autograd.grad(l1, model.lm_head.weight)[0]
    model.set_recompute("selective")
    l2 = model(ids, labels=ids).loss
    g2 = torch.autograd.grad(l2, model.lm_head.weight)[0]
    assert torch.allclose(l1, l2) and torch.allclose(g1, g2, atol=1e-6)


# ------------------------------------------------------------------ bad input
def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="n_group"):
        get_preset("k2-nano").replace(n_group=3)
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON"):
        K2Config.from_json_file(p)
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type"):
        K2Config.from_json_file(p)
    p.write_text(json.dumps({"model_type": "kimi_k2", "hidden_size": -4}))
    with pytest.raises(ConfigError, match="hidden_size"):
        K2Config.from_json_file(p)
    p.write_text(json.dumps({"model_type": "kimi_k2", "scoring_func": "softmax"}))
    with pytest.raises(ConfigError, match="scoring_func"):
        K2Config.from_json_file(p)


@pytest.fixture()
def saved_nano(tmp_path):
    model = build_model(get_preset("k2-nano"))
    d = tmp_path / "ckpt"
    model.save_pretrained(d, max_shard_size="1MB")
    return model, d


def test_missing_and_corrupt_shards_are_named(saved_nano):
    _, d = saved_nano
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=shards[1].name):
        openk2.from_pretrained(d)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1].name}.*missing"):
        openk2.from_pretrained(d)


def test_shape_mismatch_names_tensor(saved_nano, tmp_path):
    _, d = saved_nano
    cfg = json.loads((d / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model-0000.-of-0000.\.safetensors: tensor 'model\.layers\.0\.self_attn\.kv_a_.*' has shape"):
        openk2.from_pretrained(d)


def test_fp8_block_quantised_weights_dequantise(tmp_path):
    from safetensors.torch import save_file

    model = build_model(get_preset("k2-nano"))
    d = tmp_path / "fp8"
    model.save_pretrained(d)
    sd = {}
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    w = sd[name]
    scale = torch.full((math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), 0.01)
    sd[name] = (w / 0.01).to(torch.float8_e4m3fn)
    sd[name.replace("weight", "weight_scale_inv")] = scale
    save_file(sd, str(d / "model.safetensors"))
    loaded = openk2.from_pretrained(d, dtype=torch.float32)
    got = loaded.model.layers[0].self_attn.kv_b_proj.weight
    assert torch.allclose(got, w, rtol=0.07, atol=1e-4)
    assert not torch.equal(got, w)  # really went through fp8


def test_save_is_atomic_and_keeps_side_files(saved_nano):
    model, d = saved_nano
    (d / "tokenizer.json").write_text("{}")
    (d / "original").mkdir(exist_ok=True)
    (d / "original" / "notes.txt").write_text("kept")
    model.save_pretrained(d)
    assert (d / "tokenizer.json").exists() and (d / "original" / "notes.txt").read_text() == "kept"
    assert not list(d.parent.glob(".ckpt.tmp-*"))
    loaded = openk2.from_pretrained(d)
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def _cli(*args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "openk2.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_params_prints_exact_k2_counts():
    r = _cli("params", "kimi-k2")
    assert r.returncode == 0
    assert "1,026,408,209,408" in r.stdout and "32,861,477,888" in r.stdout and "1.04T" in r.stdout


def test_cli_generate_greedy_matches_model(saved_nano):
    model, d = saved_nano
    r = _cli("generate", str(d), "--ids", "5,6,7", "--max-new-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.split("--- sample 0\n")[1].strip())
    want = model.eval().generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6)[0, 3:].tolist()
    assert got[: len(want)] == want


def test_cli_generate_bad_checkpoint_is_one_line(saved_nano):
    _, d = saved_nano
    (d / "config.json").write_text("{oops")
    r = _cli("generate", str(d), "--ids", "5")
    assert r.returncode == 2
    assert "config.json: invalid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fused_rmsnorm_and_swiglu_gradients():
    """The hand-written backward passes (RMSNorm, the experts' scaled SwiGLU) equal autograd's, in float64."""
    from openk2.model.layers import _RMSNormFn, rms_norm_reference
    from openk2.model.moe import _ScaledSwiGLU

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = torch.autograd.grad(rms_norm_reference(x, w, 1e-6), (x, w), g)
    got = torch.autograd.grad(_RMSNormFn.apply(x, w, 1e-6), (x, w), g)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) < 1e-12

    gu = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    sc = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _ScaledSwiGLU.apply(a, b), (gu, sc))
    assert torch.autograd.gradcheck(lambda a: _ScaledSwiGLU.apply(a, None), (gu,))
