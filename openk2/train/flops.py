"""Model FLOPs per token (matmul FLOPs; 2 per multiply-add), for MFU and the scaling experiments."""

from __future__ import annotations

from openk2.model.config import K2Config


def forward_flops_per_token(cfg: K2Config, context: int, causal: bool = True) -> float:
    """Forward matmul FLOPs for one token with `context` tokens of attention context.

    Counts every projection with activated experts only (k routed + shared),
    the attention scores and PV products (naive MLA form: per-head keys), and
    the output head. With causal=True the attention term uses the average
    context (context+1)/2, as in a training sequence of that length.
    """
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dq, dv = cfg.qk_head_dim, cfg.v_head_dim
    attn_proj = 0
    if cfg.q_lora_rank is None:
        attn_proj += h * H * dq
    else:
        attn_proj += h * cfg.q_lora_rank + cfg.q_lora_rank * H * dq
    attn_proj += h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    attn_proj += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + dv)
    attn_proj += H * dv * h
    ctx = (context + 1) / 2 if causal else context
    attn_core = H * ctx * (dq + dv)
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        total += attn_proj + attn_core
        if cfg.is_moe_layer(i):
            act = cfg.num_experts_per_tok + cfg.n_shared_experts
            total += 3 * h * cfg.moe_intermediate_size * act + h * cfg.n_routed_experts  # + router
        else:
            total += 3 * h * cfg.intermediate_size
    total += h * cfg.vocab_size
    return 2.0 * total


def train_flops_per_token(cfg: K2Config, seq_len: int) -> float:
    """Forward + backward (backward = 2x forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal=True)
