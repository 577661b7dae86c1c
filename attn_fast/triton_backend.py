"""Autograd wiring of the Triton backend.

Forward: the fused kernel (`attn_fast.kernels.forward.attention_forward`), which never holds the [B, T, S, A]
tanh tensor. Backward: until the fused backward kernel exists (issue 4), the gradients come from the torch
backend's block-wise backward, fed with the attention probabilities the kernel wrote — correct gradients, never
dropped, at the torch backend's speed.
"""
from __future__ import annotations

import torch

from .torch_backend import backward_from_probs


class _TritonAdditiveAttention(torch.autograd.Function):
    """Returns (context in the input dtype, P in fp32 or an empty tensor when neither weights nor gradients are
    asked for). P stays fp32 for the backward: rounded to fp16/bf16 it would cost the gradients ~2^-8 accuracy."""

    @staticmethod
    def forward(ctx, query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal,
                need_weights):
        from .kernels.forward import attention_forward

        keep_probs = need_weights or any(ctx.needs_input_grad[:5])
        context, _, probs = attention_forward(
            query_proj, key_proj, value, v, key_lengths=key_lengths, key_padding_mask=key_padding_mask,
            causal=causal, index=index, extra_key_term=extra_key_term, need_weights=keep_probs,
            weights_dtype=torch.float32,
        )
        if probs is None:
            probs = context.new_empty(0, dtype=torch.float32)
        ctx.save_for_backward(query_proj, key_proj, value, v, extra_key_term, index, probs)
        ctx.causal = causal
        return context, probs

    @staticmethod
    def backward(ctx, grad_context, grad_probs):
        query_proj, key_proj, value, v, extra_key_term, index, probs = ctx.saved_tensors
        grads = backward_from_probs(
            query_proj, key_proj, value, v, extra_key_term, index, ctx.causal, probs, grad_context, grad_probs,
            needs_input_grad=ctx.needs_input_grad[:5],
        )
        return (*grads, None, None, None, None, None)


def additive_attention_triton(query_proj, key_proj, value, v, *, key_lengths=None, key_padding_mask=None,
                              causal=False, need_weights=False, index=None, extra_key_term=None):
    """Same arguments and results as `attn_fast.additive_attention` (validated inputs, non-empty problem)."""
    context, probs = _TritonAdditiveAttention.apply(
        query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal, need_weights,
    )
    return context, (probs.to(query_proj.dtype) if need_weights else None)
