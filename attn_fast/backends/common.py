"""The tanh-free half of every backward that keeps the probabilities P, shared by the torch and Triton backends,
and the one allocation seam of the torch backend's buffers.

    dValue = P^T dO;  dP = dO value^T + dWeights;  dE = P * (dP - rowsum(P * dP))

(docs/DESIGN.md, "Backward"). What remains of the backward — the pass through tanh — is each backend's own.
"""
from __future__ import annotations

import torch

#: Elements of a [B, T, S, A]- or [rows, S, D]-sized block held at once (4 MiB in fp32). Measured on 2 cores:
#: blocks of about 1M elements stay in cache across the 3-4 passes each block takes; 4M-element blocks were 2x
#: slower per element (benchmarks/NOTES.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every uninitialized buffer of the torch backend (and of `grad_of_scores`) comes from here; the loops write
    each element they later read. Tests replace it with one that fills NaN, to prove that claim."""
    return torch.empty(shape, dtype=dtype, device=device)


def row_blocks(query_rows: int, src_len: int, width: int, chunk_elements: int):
    """Slices of query rows such that a [rows, S, width] gather of memory stays within `chunk_elements`."""
    rows_per_block = max(1, chunk_elements // max(1, src_len * width))
    for start in range(0, query_rows, rows_per_block):
        yield slice(start, min(start + rows_per_block, query_rows))


def transposed_product(probs: torch.Tensor, grad_context: torch.Tensor) -> torch.Tensor:
    """P^T dO: [B, S, T] x [B, T, D] -> [B, S, D]. A single decoder step (T = 1) makes it an outer product, which a
    broadcast multiply does in one pass (bmm with an inner size of 1 is several times slower on CPU)."""
    if probs.shape[1] == 1:
        return probs.transpose(1, 2) * grad_context
    return torch.bmm(probs.transpose(1, 2), grad_context)


def grad_of_scores(probs, value, index, grad_context, grad_weights, *, need_value_grad,
                   chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """The tanh-free first half of the backward, shared by every backend that keeps P.

    probs P [B_q, T, S] (fp32/fp64), value [B_m, S, D], index [B_q] or None, grad_context [B_q, T, D] or None,
    grad_weights [B_q, T, S] or None. Returns (dE [B_q, T, S] in P's dtype, dValue [B_m, S, D] or None):
        dValue = P^T dO;  dP = dO value^T + dWeights;  dE = P * (dP - rowsum(P * dP))
    Masked keys and empty rows have P = 0, hence dE = 0. With `index`, memory rows are gathered per block of
    query rows (at most `chunk_elements` elements of [rows, S, D]) and value gradients are scattered back.
    """
    dtype = probs.dtype
    value = value.to(dtype)
    grad_probs, grad_value = None, None
    if grad_context is not None:
        grad_context = grad_context.to(dtype)
        if index is None:  # one batched product each, no gather
            grad_probs = torch.bmm(grad_context, value.transpose(1, 2))
            if need_value_grad:
                grad_value = transposed_product(probs, grad_context)
        else:
            grad_probs = empty_buffer(probs.shape, dtype, probs.device)
            grad_value = torch.zeros_like(value) if need_value_grad else None
            for rows in row_blocks(probs.shape[0], probs.shape[2], value.shape[2], chunk_elements):
                values = value.index_select(0, index[rows])  # [r, S, D]
                torch.bmm(grad_context[rows], values.transpose(1, 2), out=grad_probs[rows])
                if grad_value is not None:
                    grad_value.index_add_(0, index[rows], transposed_product(probs[rows], grad_context[rows]))
    if grad_weights is not None:
        grad_weights = grad_weights.to(dtype)
        grad_probs = grad_weights.clone() if grad_probs is None else grad_probs.add_(grad_weights)
    if grad_probs is None:
        grad_probs = torch.zeros_like(probs)
    row_dot = torch.linalg.vecdot(probs, grad_probs).unsqueeze(-1)
    return grad_probs.sub_(row_dot).mul_(probs), grad_value


