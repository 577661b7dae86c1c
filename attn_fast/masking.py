"""Which keys each query row may see, as one bool tensor of the score matrix's shape.

The [B_q, T, S] visibility tensor is A times smaller than the tanh tensor the backends avoid, so building it in
full is cheap next to the scores it masks.
"""
from __future__ import annotations

import torch


def visible_keys(
    query_rows: int,
    tgt_len: int,
    src_len: int,
    *,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    index: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Bool [B_q, T, S], True where key j is visible to query i of row b; None when every key is visible.

    key_lengths [B_m] and a [B_m, S] key_padding_mask are per memory row and read through `index` [B_q];
    a [B_q, T, S] mask is per query row. Causal: j <= i.
    """
    if key_lengths is None and key_padding_mask is None and not causal:
        return None
    visible = torch.ones(query_rows, tgt_len, src_len, dtype=torch.bool, device=device)
    key_positions = torch.arange(src_len, device=device)
    if key_lengths is not None:
        lengths = key_lengths if index is None else key_lengths.index_select(0, index)
        visible &= key_positions[None, None, :] < lengths[:, None, None]
    if key_padding_mask is not None:
        if key_padding_mask.dim() == 2:
            padding = key_padding_mask if index is None else key_padding_mask.index_select(0, index)
            visible &= ~padding[:, None, :]
        else:
            visible &= ~key_padding_mask
    if causal:
        query_positions = torch.arange(tgt_len, device=device)
        visible &= key_positions[None, :] <= query_positions[:, None]
    return visible


def hidden_memory_keys(src_len: int, *, key_lengths: torch.Tensor | None = None,
                       key_padding_mask: torch.Tensor | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Bool [B_m, S], True where key j of memory row b is hidden from every query row that reads it: beyond
    key_lengths [B_m], or padding in a [B_m, S] key_padding_mask (a [B_q, T, S] mask and `causal` hide keys per
    query step, not per memory row, and do not count here). None when neither is given.

    A memory's keys hidden so may be zeroed in key_proj and value without changing any result (README, "NaN and
    inf"); `attn_fast.functional.hide_masked_keys` does it once per decoding memory.
    """
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        key_padding_mask = None
    if key_lengths is None and key_padding_mask is None:
        return None
    if key_lengths is not None:
        hidden = torch.arange(src_len, device=device)[None, :] >= key_lengths[:, None]
        return hidden if key_padding_mask is None else hidden | key_padding_mask
    return key_padding_mask
