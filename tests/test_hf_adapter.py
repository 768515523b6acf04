"""HF names: the adapter's round trip, transformers-5 fused experts, no import cycles, kimi_k2 export."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import openk2
from openk2.model.config import K2Config, get_preset
from openk2.model.hf_adapter import from_hf, hf_targets, to_hf
from openk2.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]


def _random_model(cfg, seed=0, std=0.08):
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std if p.dim() >= 2 else 1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(0.05 * torch.randn(m.n_experts, generator=g))
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_from_hf_round_trip_names_and_values(tied):
    cfg = get_preset("k2-nano").replace(tie_word_embeddings=tied)
    model = _random_model(cfg)
    sd = model.state_dict()
    hf = to_hf(sd, cfg)
    E, L = cfg.n_routed_experts, cfg.num_hidden_layers
    assert "model.layers.1.mlp.experts.gate_proj" not in hf
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for e in (0, E - 1):
            name = f"model.layers.1.mlp.experts.{e}.{proj}.weight"
            assert torch.equal(hf[name], sd[f"model.layers.1.mlp.experts.{proj}"][e])
    assert ("lm_head.weight" in hf) is not tied
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf
    back = from_hf(hf, cfg)
    want = {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)
    # transformers-5 in-memory form: gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    fused = {k: v for k, v in hf.items() if ".mlp.experts." not in k}
    for i in range(1, L):
        pre = f"model.layers.{i}.mlp.experts"
        fused[f"{pre}.gate_up_proj"] = torch.cat([sd[f"{pre}.gate_proj"], sd[f"{pre}.up_proj"]], dim=1)
        fused[f"{pre}.down_proj"] = sd[f"{pre}.down_proj"]
    fused[f"model.layers.{L}.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)  # an MTP layer: skipped
    fused["model.rotary_emb.inv_freq"] = torch.zeros(4)
    back = from_hf(fused, cfg)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    assert hf_targets(f"model.layers.{L}.mlp.gate.weight", cfg) == []
    del hf["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        from_hf(hf, cfg)


def _imports(path: Path) -> set[str]:
    """Every openk2 module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("openk2"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("openk2"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_model_package_has_no_import_cycles_and_never_imports_the_optimizer():
    files = {f"openk2.model.{p.stem}": p for p in (ROOT / "openk2" / "model").glob("*.py") if p.stem != "__init__"}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    for m, p in files.items():
        bad = [i for i in _imports(p) if i.startswith("openk2.optim")]
        assert not bad, f"{m} imports the optimizer: {bad}"
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_kimi_k2_checkpoint_exports_to_a_directory_transformers_loads(tmp_path):
    """model_type kimi_k2 (+ auto_map, as released) -> openk2 -> save_pretrained -> AutoModelForCausalLM: same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = K2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, model_type="kimi_k2",
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    src = tmp_path / "kimi"
    _random_model(cfg).save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    raw["model_type"] = "kimi_k2"  # the released Kimi-K2 config.json form
    raw["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                       "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (src / "config.json").write_text(json.dumps(raw))
    ours = openk2.from_pretrained(src)
    assert ours.config.model_type == "kimi_k2"
    out = tmp_path / "export"
    ours.save_pretrained(out, max_shard_size="200KB")
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "deepseek_v3" and exported["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = ours(ids).logits, hf(ids).logits
    assert ref.abs().max() > 0.5
    assert (ref - got).abs().max().item() < 1e-4
    assert torch.equal(openk2.from_pretrained(out)(ids).logits, ref)  # and back into openk2
