"""Autograd wiring of the Triton backend. Neither pass ever holds the [B, T, S, A] tanh tensor.

Forward: the fused kernel (`kernels.forward.attention_forward`); it keeps P [B, T, S] in fp32 for the backward
(P is A times smaller than the tanh tensor, and `need_weights` returns it anyway).
Backward (DESIGN.md, "Backward"):
  1. no tanh — batched matmuls: dValue = P^T dO, dP = dO value^T (+ dWeights), dE = P (dP - rowsum(P dP));
  2. one fused tanh pass (`kernels.backward.attention_backward_tanh_pass`) for d_query_proj, d_key_proj per query
     row and d_v; rows of d_key_proj are summed into memory rows through `index`, and they are d_extra_key_term.
"""
from __future__ import annotations

import torch

from .torch_backend import grad_of_scores


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
        from .kernels.backward import attention_backward_tanh_pass, grad_scores_buffer

        query_proj, key_proj, value, v, extra_key_term, index, probs = ctx.saved_tensors
        need_query, need_key, need_value, need_v, need_extra = ctx.needs_input_grad[:5]
        grad_scores, grad_value = grad_of_scores(probs, value, index, grad_context, grad_probs,
                                                 need_value_grad=need_value)
        grad_query = grad_key = grad_v = grad_extra = None
        if need_query or need_key or need_v or need_extra:
            # dE in the kernel's preferred layout (rows padded to 16 floats: vectorized loads of dE).
            aligned_grad_scores = grad_scores_buffer(*grad_scores.shape, grad_scores.device).copy_(grad_scores)
            grad_query, grad_row_keys, grad_v = attention_backward_tanh_pass(
                query_proj, key_proj, v, aligned_grad_scores, index=index, extra_key_term=extra_key_term,
                causal=ctx.causal,
            )
            if need_extra:
                grad_extra = grad_row_keys.to(extra_key_term.dtype, copy=True)  # never shared with grad_key
            if index is None:
                grad_key = grad_row_keys
            else:
                grad_key = grad_row_keys.new_zeros(key_proj.shape).index_add_(0, index, grad_row_keys)
        grads = (grad_query, grad_key, grad_value, grad_v, grad_extra)
        inputs = (query_proj, key_proj, value, v, extra_key_term)
        results = tuple(None if grad is None or not needed else grad.to(tensor.dtype)
                        for grad, tensor, needed in zip(grads, inputs, ctx.needs_input_grad[:5]))
        return (*results, None, None, None, None, None)


def additive_attention_triton(query_proj, key_proj, value, v, *, key_lengths=None, key_padding_mask=None,
                              causal=False, need_weights=False, index=None, extra_key_term=None):
    """Same arguments and results as `attn_fast.additive_attention` (validated inputs, non-empty problem)."""
    context, probs = _TritonAdditiveAttention.apply(
        query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal, need_weights,
    )
    return context, (probs.to(query_proj.dtype) if need_weights else None)
