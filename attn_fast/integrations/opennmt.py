"""OpenNMT-py's GlobalAttention with attn_type="mlp" (onmt.modules.global_attention, 3.x) on attn-fast.

    e_ij = v · tanh(linear_query(q_i) + linear_context(h_j))     a_i = softmax over the keys j < src_len
    returns (linear_out([Σ_j a_ij h_j ; q_i]), a)

OpenNMT-py's decoders call it with all target steps at once (StdRNNDecoder) or once per step (InputFeedRNNDecoder,
and the copy attention); it keeps no state between calls, and neither does the replacement. The "dot" and
"general" types are Luong (multiplicative) attention and sparsemax is not a softmax: such modules are reported
as skipped, never swapped.

Where they differ: a row whose src_len is 0 gets weights 0 (context linear_out([0; q])) here, NaN in OpenNMT-py;
lengths above the number of keys see every key in both, and negative lengths none (NaN there, 0 here).
"""
from __future__ import annotations

import torch
from torch import nn

from attn_fast.functional import additive_attention
from attn_fast.integrations.registry import (
    adopt_submodules,
    linear_shape,
    qualified_name,
    recognize,
    register_adapter,
)
from attn_fast.validation import check_backend

FRAMEWORK = "opennmt"
ATTENTION_MODULE = "onmt.modules.global_attention"


class FusedGlobalAttention(nn.Module):
    """OpenNMT-py's GlobalAttention(attn_type="mlp") on the fused kernels: same parameters (`linear_context`,
    `linear_query`, `v`, `linear_out`, and `linear_cover` with coverage: the original's own modules), attributes
    (`dim`, `attn_type`, `attn_func`) and call.

    forward(src [B, T, dim] or [B, dim], enc_out [B, S, dim], src_len [B] integer or None, coverage [B, S] or
    None) -> attn_h [B, T, dim] (or [B, dim]), align_vectors [B, T, S] (or [B, S]).
    """

    def __init__(self, original: nn.Module, *, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.dim, self.attn_type, self.attn_func = original.dim, original.attn_type, original.attn_func
        adopt_submodules(self, original)

    def forward(self, src: torch.Tensor, enc_out: torch.Tensor, src_len: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        one_step = src.dim() == 2
        if one_step:
            src = src.unsqueeze(1)
        src_l = enc_out.size(1)
        if coverage is not None:
            # As OpenNMT-py: the coverage term is added into the caller's enc_out in place, then squashed.
            enc_out += self.linear_cover(coverage.reshape(-1, 1)).view_as(enc_out)
            enc_out = torch.tanh(enc_out)
        # OpenNMT-py masks the keys j >= src_len: longer lengths see every key, negative ones none.
        key_lengths = None if src_len is None else src_len.clamp(0, src_l)
        context, align_vectors = additive_attention(
            self.linear_query(src), self.linear_context(enc_out), enc_out, self.v.weight.reshape(-1),
            key_lengths=key_lengths, need_weights=True, backend=self.backend)
        attn_h = self.linear_out(torch.cat([context, src], 2))
        if one_step:
            return attn_h.squeeze(1), align_vectors.squeeze(1)
        return attn_h, align_vectors

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_type={self.attn_type!r}, backend={self.backend!r}"


def unsupported_option(module: nn.Module) -> str | None:
    """Why `module` cannot be replaced (an option other than mlp + softmax, or not OpenNMT-py's structure)."""
    attn_type, attn_func = getattr(module, "attn_type", None), getattr(module, "attn_func", None)
    if attn_type != "mlp":
        return (f"attn_type={attn_type!r} is Luong (multiplicative) attention, not additive: nothing to fuse"
                if attn_type in ("dot", "general") else f"unknown attn_type={attn_type!r}")
    if attn_func != "softmax":
        return f"attn_func={attn_func!r}: the kernels normalize with a softmax only"
    dim = getattr(module, "dim", None)
    expected = {"linear_context": ((dim, dim), None), "linear_query": ((dim, dim), None),
                "v": ((dim, 1), False), "linear_out": ((2 * dim, dim), None)}
    if hasattr(module, "linear_cover"):
        expected["linear_cover"] = ((1, dim), False)
    for name, (shape, bias) in expected.items():
        found = linear_shape(module, name, bias=bias)
        if isinstance(found, str):
            return found
        if found != shape:
            return f"{name} maps {found[0]} -> {found[1]}, OpenNMT-py's maps {shape[0]} -> {shape[1]} (dim={dim})"
    return None


def swap_global_attention(module: nn.Module, *, backend: str = "auto") -> nn.Module | str | None:
    """The adapter of OpenNMT-py's GlobalAttention (see attn_fast.integrations.registry)."""
    relation = recognize(module, ATTENTION_MODULE, "GlobalAttention")
    if relation is None or (relation == "structure" and not all(
            hasattr(module, name) for name in ("dim", "attn_type", "attn_func", "linear_out"))):
        return None  # e.g. torch_geometric's GlobalAttention, a graph pooling of the same name
    if relation == "subclass":
        return (f"{qualified_name(type(module))} subclasses OpenNMT-py's GlobalAttention: its forward may differ, "
                f"so it is not swapped")
    reason = unsupported_option(module)
    if reason is not None:
        return reason if relation == "class" else f"a GlobalAttention that is not OpenNMT-py's: {reason}"
    return FusedGlobalAttention(module, backend=backend)


register_adapter(FRAMEWORK, swap_global_attention)
