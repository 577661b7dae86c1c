"""attn-fast: fused Triton kernels for additive (Bahdanau) attention, a drop-in layer and a PyTorch reference.

    context, weights = attn_fast.additive_attention(query_proj, key_proj, value, v, key_lengths=...)
    attn = attn_fast.AdditiveAttention(query_dim, key_dim, attn_dim)
    attn = attn_fast.LocationSensitiveAttention(query_dim, key_dim, attn_dim)   # Tacotron-2, stepped
    attn = attn_fast.CoverageAttention(query_dim, key_dim, attn_dim)            # See et al. 2017, stepped
"""
from .coverage import CoverageAttention, CoverageState, coverage_loss
from .functional import additive_attention
from .layers import AdditiveAttention, AttentionMemory
from .location import LocationSensitiveAttention, LocationState
from .reference import additive_attention_reference

__all__ = [
    "additive_attention", "additive_attention_reference", "AdditiveAttention", "AttentionMemory",
    "LocationSensitiveAttention", "LocationState", "CoverageAttention", "CoverageState", "coverage_loss",
]
__version__ = "0.1.0"
