"""Input validation for `additive_attention`: every malformed call fails here with a message that names the
argument and what was expected, before any backend (or Triton) sees it, and a valid one becomes an `AttentionCall`,
the one record every backend takes. Nothing is modified.

Adding an option to the op touches this module (its check and the record's field), the public signature in
`attn_fast.functional`, and the backends that use it — nothing else.
"""
from __future__ import annotations

import dataclasses

import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The values of `backend=` (the public function and the layers): "auto" picks one of the others.
BACKENDS = ("auto", "triton", "cpu", "torch", "reference")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One validated call of additive attention: the tensors and options exactly as the user passed them.

    Shapes (B_q query rows, B_m memory rows; B_q == B_m unless `index` is given):
        query_proj       [B_q, T, A]
        key_proj         [B_m, S, A]
        value            [B_m, S, D]
        v                [A]
        key_lengths      [B_m] integer: key j is visible when j < key_lengths[b]
        key_padding_mask [B_m, S] or [B_q, T, S] bool, True = padding (ignored)
        causal           key j is visible to query i only when j <= i
        need_weights     also return the weights [B_q, T, S]
        index            [B_q] integer: query row b reads memory row index[b] (beam search)
        extra_key_term   [B_q, S, A], added to the key projection of each query row (location / coverage)
        key_exp          [B_m, S, A] = e^{2 key_proj} in the compute dtype (fp32, or fp64 for fp64 inputs),
                         prepared once per decoding memory (`functional.prepare_key_exp`); the torch backend's
                         factorized tanh and the Triton fp32 decode kernel then skip that exponential at every
                         step. Ignored by the reference and whenever extra_key_term is given.
        score_weights    fp32 [cdiv(A, 64) * 64 + 2]: the Triton forward's per-call v pre-pass done once per decoding
                         memory (`functional.prepare_score_weights` of this call's v, for its compute dtype): v's
                         per-a weights padded to a multiple of 64, then the score bias and max |v|. The Triton
                         kernels then launch no pre-pass; valid only while v keeps the values it was made from (the
                         caller's word, as for key_exp). Ignored by the other backends and by float64 calls.
        check_values     False when the caller vouched for the values (`attention_call(check_values=False)`,
                         decode steps against a memory from the layers' `precompute`): the ranges of key_lengths
                         and index, and finite key_proj / value at every hidden key (`precompute` zeroes them
                         there once, `functional.hide_masked_keys`). Backends then read no value back to the
                         host (README "NaN and inf": where they may, they check the context for a non-finite
                         value leaked from a hidden key, and recompute it without that key).
    Build it with `attention_call`, which validates; backends assume it is valid. The tensors are the user's own,
    except an `index` or `key_lengths` of a small integer dtype (int8, int16, uint8), cast to int64 (the gathers
    take int32/int64 only).
    """

    query_proj: torch.Tensor
    key_proj: torch.Tensor
    value: torch.Tensor
    v: torch.Tensor
    key_lengths: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    causal: bool = False
    need_weights: bool = False
    index: torch.Tensor | None = None
    extra_key_term: torch.Tensor | None = None
    key_exp: torch.Tensor | None = None
    check_values: bool = True
    score_weights: torch.Tensor | None = None

    @property
    def query_rows(self) -> int:  # B_q
        return self.query_proj.shape[0]

    @property
    def memory_rows(self) -> int:  # B_m
        return self.key_proj.shape[0]

    @property
    def tgt_len(self) -> int:  # T
        return self.query_proj.shape[1]

    @property
    def src_len(self) -> int:  # S
        return self.key_proj.shape[1]

    @property
    def attn_dim(self) -> int:  # A
        return self.query_proj.shape[2]

    @property
    def value_dim(self) -> int:  # D
        return self.value.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.query_proj.dtype

    @property
    def device(self) -> torch.device:
        return self.query_proj.device

    @property
    def is_empty(self) -> bool:
        """No query row, decoder step or key: the answer is all zeros without any tanh."""
        return self.query_rows == 0 or self.tgt_len == 0 or self.src_len == 0

    def float_inputs(self) -> tuple[torch.Tensor, ...]:
        """The floating tensors that gradients flow to: query_proj, key_proj, value, v (and extra_key_term)."""
        inputs = (self.query_proj, self.key_proj, self.value, self.v)
        return inputs if self.extra_key_term is None else (*inputs, self.extra_key_term)

    def replace(self, **changes) -> AttentionCall:
        """A copy with some fields changed (e.g. the float tensors cast), not validated again."""
        return dataclasses.replace(self, **changes)

    def op_inputs(self) -> tuple:
        """The call as the leading positional inputs of the backends' torch.library ops, whose schemas list
        (query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal) first;
        `from_op_inputs` is the inverse. `need_weights` is not among them: each backend says what its op returns."""
        return (self.query_proj, self.key_proj, self.value, self.v, self.extra_key_term, self.key_lengths,
                self.key_padding_mask, self.index, self.causal)

    @classmethod
    def from_op_inputs(cls, query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index,
                       causal, need_weights: bool = False) -> AttentionCall:
        return cls(query_proj, key_proj, value, v, key_lengths=key_lengths, key_padding_mask=key_padding_mask,
                   causal=causal, need_weights=need_weights, index=index, extra_key_term=extra_key_term)


def can_read_values(tensor: torch.Tensor) -> bool:
    """Checking tensor *values* needs a host sync on CUDA; skip it where a sync is not allowed (compiling, CUDA
    graph capture, meta tensors)."""
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


def _require_bool(name: str, value) -> None:
    # Exactly bool: an int (0/1), a numpy.bool_ or a bool tensor is refused, with its qualified type name (a
    # numpy.bool_'s plain __name__ is "bool" too, which made "must be a bool, got bool").
    if not isinstance(value, bool):
        kind = type(value)
        qualified = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{name} must be a Python bool (True or False), got {qualified}; pass bool({name})")


#: Prepared score weights hold v's per-a weights padded along A to a multiple of this, then two scalars; the
#: Triton kernels' `SCORE_WEIGHTS_ALIGNMENT` (kernels/forward.py, not imported here: that imports triton).
SCORE_WEIGHTS_ALIGNMENT = 64


def score_weights_length(attn_dim: int) -> int:
    """The length of prepared score weights for attention dim A: cdiv(A, 64) * 64 + 2."""
    return -(-attn_dim // SCORE_WEIGHTS_ALIGNMENT) * SCORE_WEIGHTS_ALIGNMENT + 2


def _check_score_weights(score_weights, attn_dim: int, device: torch.device) -> None:
    """Metadata only (no value is read): fp32, 1-D, score_weights_length(A) long, on the call's device."""
    _require_tensor("score_weights", score_weights)
    expected = score_weights_length(attn_dim)
    if score_weights.dtype != torch.float32:
        raise TypeError(f"score_weights must be float32 [{expected}] (functional.prepare_score_weights), "
                        f"got {score_weights.dtype}")
    if tuple(score_weights.shape) != (expected,):
        raise ValueError(f"score_weights must be [cdiv(A, {SCORE_WEIGHTS_ALIGNMENT}) * {SCORE_WEIGHTS_ALIGNMENT} + 2] "
                         f"= [{expected}] for A = {attn_dim} (functional.prepare_score_weights), "
                         f"got shape {tuple(score_weights.shape)}")
    if score_weights.device != device:
        raise ValueError(f"all inputs must be on one device: query_proj is on {device} but score_weights is on "
                         f"{score_weights.device}")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def attention_call(
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
    key_exp=None,
    check_values: bool = True,
    score_weights=None,
) -> AttentionCall:
    """Validate the arguments of `additive_attention` and return them as one `AttentionCall`.

    Expected: query_proj [B_q, T, A], key_proj [B_m, S, A], value [B_m, S, D], v [A], all of one floating dtype
    on one device; key_lengths [B_m] integer in [0, S]; key_padding_mask bool [B_m, S] or [B_q, T, S];
    index [B_q] integer in [0, B_m); extra_key_term [B_q, S, A]. B_q == B_m unless `index` is given.

    `check_values=False` checks metadata only (types, shapes, dtypes, devices) and never reads a value back to the
    host: the ranges of key_lengths and index are then the caller's word. Decode steps use it against a memory
    whose values were checked once (`attn_fast.functional.check_memory`, run by the layers' `precompute`), so that
    a step does not sync with the GPU (up to 4 reads per call otherwise) and can be captured in a CUDA graph.
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
            raise ValueError(f"all inputs must be on one device: query_proj is on {device} but {name} is on "
                             f"{tensor.device}")

    if index is not None:
        _require_tensor("index", index)
        _require_integer("index", index)
        if index.dim() != 1 or index.shape[0] != query_rows:
            raise ValueError(f"index must be [B_q] = [{query_rows}] (one memory row per query row), "
                             f"got shape {tuple(index.shape)}")
        if index.dtype not in (torch.int32, torch.int64):
            index = index.long()  # index_select and the kernels' gathers take int32/int64 only; B_q elements
        if check_values and index.numel() and can_read_values(index):
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

    if key_exp is not None:
        _require_tensor("key_exp", key_exp)
        expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if key_exp.dtype != expected_dtype:
            raise TypeError(f"key_exp must be e^(2 key_proj) in the compute dtype {expected_dtype}, "
                            f"got {key_exp.dtype}")
        if key_exp.shape != key_proj.shape:
            raise ValueError(f"key_exp must have key_proj's shape {tuple(key_proj.shape)}, got {tuple(key_exp.shape)}")
        if key_exp.device != device:
            raise ValueError(f"all inputs must be on one device: query_proj is on {device} but key_exp is on "
                             f"{key_exp.device}")

    if score_weights is not None:
        _check_score_weights(score_weights, attn_dim, device)

    if key_lengths is not None:
        _require_tensor("key_lengths", key_lengths)
        _require_integer("key_lengths", key_lengths)
        if key_lengths.dim() != 1 or key_lengths.shape[0] != memory_rows:
            raise ValueError(f"key_lengths must be [B] = [{memory_rows}], got shape {tuple(key_lengths.shape)}")
        if key_lengths.dtype not in (torch.int32, torch.int64):
            key_lengths = key_lengths.long()  # as index: every backend then sees int32/int64 only
        if check_values and key_lengths.numel() and can_read_values(key_lengths):
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

    _require_bool("causal", causal)
    _require_bool("need_weights", need_weights)

    return AttentionCall(query_proj, key_proj, value, v, key_lengths=key_lengths, key_padding_mask=key_padding_mask,
                         causal=causal, need_weights=need_weights, index=index, extra_key_term=extra_key_term,
                         key_exp=key_exp, check_values=check_values, score_weights=score_weights)
