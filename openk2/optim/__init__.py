"""MuonClip: Muon + AdamW + per-head QK-Clip (K2 report, Algorithm 1).

    from openk2.optim import MuonClip
    opt = MuonClip.for_model(model, lr=2e-4, weight_decay=0.1, qk_clip_tau=100.0)
"""

from openk2.optim.muonclip import MuonClip, is_muon_param, param_groups
from openk2.optim.newton_schulz import MUON_COEFFICIENTS, NS_SCHEDULES, newton_schulz, newton_schulz_flops, ns_schedule
from openk2.optim.qk_clip import AttentionHeads, GQAHeads, MLAHeads, QKClip, find_attention_heads, max_logit

__all__ = [
    "MuonClip", "param_groups", "is_muon_param",
    "QKClip", "AttentionHeads", "MLAHeads", "GQAHeads", "find_attention_heads", "max_logit",
    "newton_schulz", "newton_schulz_flops", "ns_schedule", "NS_SCHEDULES", "MUON_COEFFICIENTS",
]
