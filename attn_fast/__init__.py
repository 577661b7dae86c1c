"""attn-fast: fused Triton kernels for additive (Bahdanau) attention, a drop-in layer and a PyTorch reference.

    context, weights = attn_fast.additive_attention(query_proj, key_proj, value, v, key_lengths=...)
    attn = attn_fast.AdditiveAttention(query_dim, key_dim, attn_dim)
"""
from .functional import additive_attention
from .layers import AdditiveAttention, AttentionMemory
from .reference import additive_attention_reference

__all__ = ["additive_attention", "additive_attention_reference", "AdditiveAttention", "AttentionMemory"]
__version__ = "0.1.0"
