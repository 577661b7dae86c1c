"""The naive eager implementation: the oracle every other backend is checked against.

It does what Keras, OpenNMT-py, SpeechBrain and the PyTorch tutorial do — materialize the [B, T, S, A] tanh
tensor — in whatever floating dtype it is given (tests call it in float64). It is kept obviously correct rather
than clever: it shares no code with the other backends, not even the mask logic, so that a bug there cannot hide
here too. It is reached through `attn_fast.additive_attention(..., backend="reference")` (or
`attn_fast.additive_attention_reference`), which validates before dispatching.
"""
from __future__ import annotations

import torch

from attn_fast.validation import can_read_values


def attend(call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention by the book, for a validated `attn_fast.validation.AttentionCall` (shapes there).

    Returns context [B_q, T, D] and, if `call.need_weights`, weights [B_q, T, S]. A row with no visible key gets
    context 0 and weights 0.
    """
    query_proj, key_proj, value, v = call.query_proj, call.key_proj, call.value, call.v
    key_lengths, key_padding_mask, index = call.key_lengths, call.key_padding_mask, call.index
    batch, tgt_len, _ = query_proj.shape
    src_len = key_proj.shape[1]

    # Memory-side tensors, gathered per query row (a copy: fine for an oracle).
    if index is not None:
        key_proj = key_proj[index]
        value = value[index]
        if key_lengths is not None:
            key_lengths = key_lengths[index]
        if key_padding_mask is not None and key_padding_mask.dim() == 2:
            key_padding_mask = key_padding_mask[index]
    if call.extra_key_term is not None:
        key_proj = key_proj + call.extra_key_term

    visible = torch.ones(batch, tgt_len, src_len, dtype=torch.bool, device=query_proj.device)
    key_positions = torch.arange(src_len, device=query_proj.device)
    if key_lengths is not None:
        visible = visible & (key_positions[None, None, :] < key_lengths[:, None, None])
    if key_padding_mask is not None:
        padding = key_padding_mask if key_padding_mask.dim() == 3 else key_padding_mask[:, None, :]
        visible = visible & ~padding
    if call.causal:
        query_positions = torch.arange(tgt_len, device=query_proj.device)
        visible = visible & (key_positions[None, None, :] <= query_positions[None, :, None])

    # e[b, i, j] = sum_a v[a] * tanh(query_proj[b, i, a] + key_proj[b, j, a]) at visible (i, j) only. A key hidden
    # from a row never influences it (README, "NaN and inf"): its tanh argument is replaced by 0 *before* the tanh,
    # so that neither the score nor any gradient (tanh' = 1 - t^2 would be NaN there, times a zero gradient) sees a
    # NaN or inf in it.
    summed = query_proj[:, :, None, :] + key_proj[:, None, :, :]  # [B, T, S, A]
    hidden = torch.tanh(summed.masked_fill(~visible[..., None], 0.0))
    scores = (hidden * v).sum(dim=-1)  # [B, T, S]

    # Softmax over visible keys only. Subtracting the (detached) row maximum changes nothing mathematically; a
    # row with no visible key has max -inf, which is replaced by 0 so that exp(-inf - 0) = 0 and the row sums
    # to 0: weights 0 and context 0 instead of NaN, with zero (not NaN) gradients.
    scores = scores.masked_fill(~visible, float("-inf"))
    if src_len > 0:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    else:  # amax over an empty axis is an error; every row is empty anyway
        row_max = scores.new_zeros(batch, tgt_len, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalized = torch.exp(scores - row_max)
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    # (== 0, not > 0: a NaN row sum, from a NaN score the row sees, must stay NaN in every weight of the row)
    weights = unnormalized / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)

    # context[b, i] = sum over visible j of weights[b, i, j] * value[b, j]. weights @ value would multiply a hidden
    # key's value by 0, which is NaN for a NaN or inf value: when the values are not all finite (or cannot be read:
    # meta tensors, compiling), each row reads them through its own visibility ([B, T, S, D]) instead. A decode
    # step against a memory from `precompute` (call.check_values False) reads nothing: its hidden keys hold zeros.
    if not call.check_values or (can_read_values(value) and bool(torch.isfinite(value).all())):
        context = weights @ value  # [B, T, D]
    else:
        # (value masked before the product: masking the product would still send 0 * NaN back to the weights)
        visible_values = value[:, None, :, :].masked_fill(~visible[..., None], 0.0)  # [B, T, S, D]
        context = (weights[..., None] * visible_values).sum(dim=2)
    # The weights returned are a copy: editing them in place must not touch what autograd saved.
    return context, (weights.clone() if call.need_weights else None)
