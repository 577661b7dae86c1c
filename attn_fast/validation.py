"""Input validation for `additive_attention`: every malformed call fails here with a message that names the
argument and what was expected, before any backend (or Triton) sees it. Nothing is modified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass(frozen=True)
class ProblemSize:
    """Sizes of one attention call: `query_rows` query batch rows reading `memory_rows` memory rows."""

    query_rows: int  # B_q
    memory_rows: int  # B_m (== B_q without `index`)
    tgt_len: int  # T
    src_len: int  # S
    attn_dim: int  # A
    value_dim: int  # D


def _can_read_values(tensor: torch.Tensor) -> bool:
    """Checking tensor *values* needs a host sync on CUDA; skip it where a sync is not allowed."""
    if torch.compiler.is_compiling():
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return tensor.device.type != "meta"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_shape(name: str, tensor: torch.Tensor, expected: str, ndim: int) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {expected} ({ndim}-D), got shape {tuple(tensor.shape)}")


def _require_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.int64), got {tensor.dtype}")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def check_attention_inputs(
    query_proj,
    key_proj,
    value,
    v,
    *,
    key_lengths=None,
    key_padding_mask=None,
    causal=False,
    need_weights=False,
    index=None,
    extra_key_term=None,
) -> ProblemSize:
    """Validate the arguments of `additive_attention` and return the problem's sizes.

    Expected: query_proj [B_q, T, A], key_proj [B_m, S, A], value [B_m, S, D], v [A], all of one floating dtype
    on one device; key_lengths [B_m] integer in [0, S]; key_padding_mask bool [B_m, S] or [B_q, T, S];
    index [B_q] integer in [0, B_m); extra_key_term [B_q, S, A]. B_q == B_m unless `index` is given.
    """
    tensors = {
        "query_proj": _require_tensor("query_proj", query_proj),
        "key_proj": _require_tensor("key_proj", key_proj),
        "value": _require_tensor("value", value),
        "v": _require_tensor("v", v),
    }
    if extra_key_term is not None:
        tensors["extra_key_term"] = _require_tensor("extra_key_term", extra_key_term)
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOATING_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {tensor.dtype}"
            )
    dtype = query_proj.dtype
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise TypeError(f"all inputs must share one dtype: query_proj is {dtype} but {name} is {tensor.dtype}")

    _require_shape("query_proj", query_proj, "[B, T, A]", 3)
    _require_shape("key_proj", key_proj, "[B, S, A]", 3)
    _require_shape("value", value, "[B, S, D]", 3)
    _require_shape("v", v, "[A]", 1)

    query_rows, tgt_len, attn_dim = query_proj.shape
    memory_rows, src_len, _ = key_proj.shape
    value_dim = value.shape[2]
    if attn_dim == 0:
        raise ValueError("query_proj has attention dim A = 0; A must be at least 1")
    if key_proj.shape[2] != attn_dim:
        raise ValueError(
            f"key_proj must be [B, S, A] with A = {attn_dim} (from query_proj), got shape {tuple(key_proj.shape)}"
        )
    if v.shape[0] != attn_dim:
        raise ValueError(f"v must be [A] with A = {attn_dim} (from query_proj), got shape {tuple(v.shape)}")
    if index is None and query_rows != memory_rows:
        raise ValueError(
            f"query_proj has batch {query_rows} but key_proj has batch {memory_rows}; they must match "
            "(or pass index [B_q] mapping query rows to memory rows)"
        )
    if value.shape[0] != memory_rows or value.shape[1] != src_len:
        raise ValueError(
            f"value must be [B, S, D] with B = {memory_rows}, S = {src_len} (from key_proj), "
            f"got shape {tuple(value.shape)}"
        )

    device = query_proj.device
    for name, tensor in list(tensors.items()) + [
        ("key_lengths", key_lengths), ("key_padding_mask", key_padding_mask), ("index", index)
    ]:
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"all inputs must be on one device: query_proj is on {device} but {name} is on {tensor.device}")

    if index is not None:
        _require_tensor("index", index)
        _require_integer("index", index)
        if index.dim() != 1 or index.shape[0] != query_rows:
            raise ValueError(f"index must be [B_q] = [{query_rows}] (one memory row per query row), got shape {tuple(index.shape)}")
        if index.numel() and _can_read_values(index):
            if int(index.min()) < 0 or int(index.max()) >= memory_rows:
                raise ValueError(
                    f"index values must lie in [0, {memory_rows}) (memory rows of key_proj), "
                    f"got min {int(index.min())}, max {int(index.max())}"
                )

    if extra_key_term is not None and tuple(extra_key_term.shape) != (query_rows, src_len, attn_dim):
        raise ValueError(
            f"extra_key_term must be [B_q, S, A] = [{query_rows}, {src_len}, {attn_dim}], "
            f"got shape {tuple(extra_key_term.shape)}"
        )

    if key_lengths is not None:
        _require_tensor("key_lengths", key_lengths)
        _require_integer("key_lengths", key_lengths)
        if key_lengths.dim() != 1 or key_lengths.shape[0] != memory_rows:
            raise ValueError(f"key_lengths must be [B] = [{memory_rows}], got shape {tuple(key_lengths.shape)}")
        if key_lengths.numel() and _can_read_values(key_lengths):
            low, high = int(key_lengths.min()), int(key_lengths.max())
            if low < 0 or high > src_len:
                raise ValueError(f"key_lengths values must lie in [0, S] = [0, {src_len}], got min {low}, max {high}")

    if key_padding_mask is not None:
        _require_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore), got {key_padding_mask.dtype}")
        shape = tuple(key_padding_mask.shape)
        if shape not in ((memory_rows, src_len), (query_rows, tgt_len, src_len)):
            raise ValueError(
                f"key_padding_mask must be [B, S] = [{memory_rows}, {src_len}] or [B, T, S] = "
                f"[{query_rows}, {tgt_len}, {src_len}], got shape {shape}"
            )

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(need_weights, bool):
        raise TypeError(f"need_weights must be a bool, got {type(need_weights).__name__}")

    return ProblemSize(query_rows, memory_rows, tgt_len, src_len, attn_dim, value_dim)
