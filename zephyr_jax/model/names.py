"""Names of the activations the named remat policies keep (`jax.ad_checkpoint.checkpoint_name`).

One place, so the policies in `mixtral.py` and the places that tag tensors (attention there, the
expert GEMMs in `dispatch.py`) cannot drift apart.
"""

QKV = "qkv_proj"  # q, k, v after their projections (and RoPE)
CONTEXT = "attention_context"  # attention's output, before o_proj
ATTN_OUT = "attention_out"  # o_proj's output
ROUTER = "router_logits"
EXPERT_IN = "expert_gate_up"  # the gate (w1) and up (w3) GEMM outputs, per routed row
EXPERT_OUT = "expert_down"  # the down (w2) GEMM output, per routed row

ATTENTION = (QKV, CONTEXT, ATTN_OUT)
MATMULS = (*ATTENTION, ROUTER, EXPERT_IN, EXPERT_OUT)
