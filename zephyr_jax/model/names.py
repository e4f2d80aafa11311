"""Names of the activations the named remat policies keep (`jax.ad_checkpoint.checkpoint_name`).

One place, so the policies in `mixtral.py` and the places that tag tensors (attention there, the
expert GEMMs in `dispatch.py`) cannot drift apart.
"""

QKV = "qkv_proj"  # q, k, v after their projections (and RoPE)
CONTEXT = "attention_context"  # attention's output, before o_proj
# the residuals cuDNN's fused attention keeps for its backward (its output and softmax statistics
# among them): a custom VJP's residuals are otherwise invisible to every remat policy
ATTENTION_KERNEL = "attention_kernel_residuals"
ATTN_OUT = "attention_out"  # o_proj's output
ROUTER = "router_logits"
EXPERT_IN = "expert_gate_up"  # the gate (w1) and up (w3) GEMM outputs, per routed row
EXPERT_OUT = "expert_down"  # the down (w2) GEMM output, per routed row

ATTENTION = (QKV, CONTEXT, ATTENTION_KERNEL, ATTN_OUT)
MATMULS = (*ATTENTION, ROUTER, EXPERT_IN, EXPERT_OUT)
