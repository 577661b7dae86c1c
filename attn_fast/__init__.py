"""attn-fast: fused Triton kernels for additive (Bahdanau) attention, a drop-in layer and a PyTorch reference.

    context, weights = attn_fast.additive_attention(query_proj, key_proj, value, v, key_lengths=...)
    attn = attn_fast.AdditiveAttention(query_dim, key_dim, attn_dim)
    attn = attn_fast.LocationSensitiveAttention(query_dim, key_dim, attn_dim)   # Tacotron-2, stepped
    attn = attn_fast.CoverageAttention(query_dim, key_dim, attn_dim)            # See et al. 2017, stepped
"""
from attn_fast.functional import additive_attention, additive_attention_reference
from attn_fast.nn.additive import AdditiveAttention, AttentionMemory
from attn_fast.nn.coverage import CoverageAttention, CoverageState, coverage_loss
from attn_fast.nn.location import LocationSensitiveAttention, LocationState

__all__ = [
    "additive_attention", "additive_attention_reference", "AdditiveAttention", "AttentionMemory",
    "LocationSensitiveAttention", "LocationState", "CoverageAttention", "CoverageState", "coverage_loss",
]
__version__ = "0.1.0"
