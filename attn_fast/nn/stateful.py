"""Bookkeeping shared by the stateful attention layers (location-sensitive, coverage): the encoder memory projected
once, which keys each decoder row may see, and the selection of decoder rows that beam search needs.

Vocabulary: B memory rows (one per source sequence), B' decoder rows (= B, or B * beam with an `index` [B'] that
maps each decoder row to its memory row, so that hypotheses share the encoder memory without copies).
"""
from __future__ import annotations

import torch

from attn_fast.functional import autocast_dtype
from attn_fast.masking import visible_keys
from attn_fast.nn.additive import AdditiveAttention, AttentionMemory


def prepare_memory(attention: AdditiveAttention, key: torch.Tensor, value: torch.Tensor | None,
                   key_lengths: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                   index: torch.Tensor | None) -> tuple[AttentionMemory, torch.Tensor]:
    """Project the keys once and validate everything a step will read, values included (once, here: the steps
    then read nothing back to the host).

    key [B, S, Dk] in the layer's dtype (any floating dtype inside `torch.autocast`); value [B, S, D] or None
    (= key); key_lengths [B] integer; key_padding_mask [B, S] bool (True = padding); index [B'] integer in [0, B)
    or None (B' = B). Returns the memory (memory rows) and `visible` [B', S] bool, True where decoder row b may
    attend key j.
    """
    dtype = attention.key_layer.weight.dtype
    autocast = isinstance(key, torch.Tensor) and autocast_dtype(key.device) is not None
    if isinstance(key, torch.Tensor) and key.dtype != dtype and not autocast:
        raise TypeError(f"key must have the layer's dtype {dtype}, got {key.dtype}")
    # A per-decoder-step [B, T, S] mask has no meaning for a state that is advanced one step at a time.
    if key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dim() != 2):
        shape = (tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor)
                 else type(key_padding_mask).__name__)
        raise ValueError(f"key_padding_mask must be [B, S] (one mask per source sequence), got {shape}")
    # precompute runs the library's own checks (lengths within [0, S], mask shape and dtype, value shape, the index
    # range) on an empty query, so that a malformed memory fails here rather than at the first step. Every step of
    # these layers adds an extra key term (location / coverage features), so prepared keys would go unused; the
    # prepared score weights (v's pre-pass) serve them all the same, v not depending on the keys.
    memory = attention.precompute(key, value, key_lengths, key_padding_mask, index=index, prepare_keys=False)
    rows = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else key.shape[0]
    src_len = key.shape[1]
    visible = visible_keys(rows, 1, src_len, key_lengths=key_lengths, key_padding_mask=key_padding_mask,
                           index=index, device=key.device)
    if visible is None:
        return memory, torch.ones(rows, src_len, dtype=torch.bool, device=key.device)
    return memory, visible.squeeze(1)


def uniform_weights(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """visible [B', S] bool -> [B', S]: 1 / (number of visible keys) on visible keys, 0 elsewhere (and 0 on a row
    with no visible key rather than NaN)."""
    counts = visible.sum(dim=-1, keepdim=True).clamp(min=1)
    return visible.to(dtype) / counts.to(dtype)


def reordered_index(index: torch.Tensor | None, backpointers: torch.Tensor, rows: int) -> torch.Tensor:
    """The memory row of each new decoder row: new row r continues old row backpointers[r].

    index [B'] or None (old row b reads memory row b); backpointers [B''] integer in [0, B'). Returns [B''].

    Only the type, dtype and shape of `backpointers` are checked here: reading their values back to the host
    would sync with the GPU at every beam step and break a CUDA-graph capture. An out-of-range backpointer is the
    caller's bug, and it does not pass silently: the gathers of the reorder fail on it (IndexError on CPU, a
    device-side assert on CUDA).
    """
    if not isinstance(backpointers, torch.Tensor):
        raise TypeError(f"backpointers must be a torch.Tensor, got {type(backpointers).__name__}")
    if backpointers.dtype.is_floating_point or backpointers.dtype.is_complex or backpointers.dtype == torch.bool:
        raise TypeError(f"backpointers must have an integer dtype (e.g. torch.int64), got {backpointers.dtype}")
    if backpointers.dim() != 1:
        raise ValueError(f"backpointers must be [B''] (one old decoder row per new row), "
                         f"got {tuple(backpointers.shape)}")
    if index is not None and index.shape[0] != rows:
        raise ValueError(f"index must be [B'] = [{rows}] (one memory row per state row), got {tuple(index.shape)}")
    backpointers = backpointers.long()
    return backpointers if index is None else index.index_select(0, backpointers)


def check_step_query(query, rows: int, query_dim: int, dtype: torch.dtype) -> None:
    """query must be [B', Dq] with B' the state's decoder rows, in the layer's dtype (any floating dtype inside
    `torch.autocast`, which casts it)."""
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() != 2 or query.shape != (rows, query_dim):
        raise ValueError(f"query must be [B', query_dim] = [{rows}, {query_dim}] (one row per state row), "
                         f"got {tuple(query.shape)}")
    if query.dtype != dtype and autocast_dtype(query.device) is None:
        raise TypeError(f"query must have the layer's dtype {dtype}, got {query.dtype}")
