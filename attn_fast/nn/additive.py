"""`AdditiveAttention`: the drop-in layer (projections + fused attention), and `AttentionMemory` for step-by-step
decoding, where the key projection is computed once per source batch and reused at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from attn_fast.functional import (
    additive_attention,
    additive_attention_on_memory,
    autocast_dtype,
    call_dtype,
    check_memory,
    hide_masked_keys,
    prepare_key_exp,
    prepare_score_weights,
    step_tanh_form,
)
from attn_fast.validation import FLOATING_DTYPES, check_backend


def _capturing_cuda_graph(tensor: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream of `tensor`'s (CUDA) device."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True, eq=False)  # eq=False: no elementwise tensor comparison, identity is what counts
class ScoreWeightsSource:
    """What a memory's prepared score weights were made from, so that a step can tell whether they still hold.

    parameters: the tensors the score vector is computed from (v, and g with `normalize`; SpeechBrain's
        mlp_attn.weight), each with its `_version` and data pointer when the weights were made. An in-place write
        (an optimizer step, `load_state_dict`, `copy_`, `nn.init`) bumps the version; a parameter replaced, moved
        or cast (`.to`, `.half()`) is another tensor or another pointer. Host-side metadata only: checking it reads
        no value back and does not sync. Not seen: a write through `.data` (which PyTorch deliberately leaves
        uncounted, as autograd's own saved-tensor check does) — call `precompute` again after one.
    dtype: the compute dtype of the steps the weights serve (the layer's dtype, or the autocast dtype).
    score_vector: the detached score vector [A] the weights were made from, as the layer's score_vector() returned
        it: steps that need no gradient to v pass it instead of recomputing g * v / ||v|| (with `normalize`, a
        norm and three elementwise launches per step).
    extra: any other value the score vector depends on (SpeechBrain's `scaling`), compared by equality.
    """

    parameters: tuple[tuple[torch.Tensor, int, int], ...]
    dtype: torch.dtype
    score_vector: torch.Tensor
    extra: tuple = ()

    @classmethod
    def of(cls, parameters, dtype: torch.dtype, score_vector: torch.Tensor, extra: tuple = ()) -> ScoreWeightsSource:
        return cls(tuple((tensor, tensor._version, tensor.data_ptr()) for tensor in parameters), dtype,
                   score_vector.detach(), extra)

    @classmethod
    def prepare(cls, score_vector: torch.Tensor, parameters, dtype: torch.dtype, backend: str,
                extra: tuple = ()) -> tuple[torch.Tensor | None, ScoreWeightsSource | None]:
        """The score weights of steps computing in `dtype` (`functional.prepare_score_weights` of `score_vector` [A],
        cast to `dtype` as autocast casts it) and their source (`parameters`, `extra`: what score_vector is made
        from), or (None, None) where the steps' backend has no pre-pass to spare (not Triton) or nothing can be
        launched (tracing, meta tensors)."""
        with torch.no_grad():
            weights = prepare_score_weights(score_vector.detach().to(dtype), dtype, backend)
        if weights is None:
            return None, None
        return weights, cls.of(parameters, dtype, score_vector, extra)

    def holds_for(self, parameters, dtype: torch.dtype, extra: tuple = ()) -> bool:
        """True when `parameters` are the very tensors recorded, unchanged since, and the step computes in the
        recorded dtype. False while torch.compile traces (`_version` is then a data-dependent symbol that a
        fullgraph trace cannot branch on) and while a CUDA graph is captured (this check runs once, at capture,
        and every replay would reuse the weights however v changed in between): such steps run the per-call
        pre-pass, which reads v itself (correct, one launch more)."""
        if torch.compiler.is_compiling() or dtype != self.dtype or extra != self.extra:
            return False
        parameters = tuple(parameters)
        if any(_capturing_cuda_graph(tensor) for tensor in parameters):
            return False
        return len(parameters) == len(self.parameters) and all(
            tensor is recorded and tensor._version == version and tensor.data_ptr() == pointer
            for tensor, (recorded, version, pointer) in zip(parameters, self.parameters))


def usable_score_weights(weights: torch.Tensor | None, source: ScoreWeightsSource | None, parameters,
                         dtype: torch.dtype, extra: tuple = ()) -> torch.Tensor | None:
    """A memory's prepared score weights for a step computing in `dtype`, if `source.holds_for` the score vector's
    current `parameters` (and `extra`), else None: the step's kernels then run the pre-pass themselves."""
    if weights is None or source is None or not source.holds_for(parameters, dtype, extra):
        return None
    return weights


@dataclass
class AttentionMemory:
    """Encoder side of the attention, prepared once per source batch by `AdditiveAttention.precompute`.

    key_proj [B, S, A], value [B, S, D], key_lengths [B] or None, key_padding_mask [B, S] or None.

    checked: True when `precompute` validated this memory, values included (key_lengths within [0, S]); a step
        against it then checks metadata only (shapes, dtypes, devices) and reads no value back to the host, so
        it neither syncs with the GPU nor breaks a CUDA-graph capture. A memory built by hand (False) is fully
        validated at every step. Replacing a tensor of a checked memory by one with other values voids the check:
        build a new memory with `precompute` instead.
    tanh_form: the torch backend's tanh form for steps without an extra key term, chosen once from
        max |key_proj| by `precompute` ("factorized" or "direct"; "auto" when it could not read the values, e.g.
        compiling, and the backend then decides per call). Steps with an extra key term (location, coverage),
        whose features' magnitude is only known per step, leave it to the cpu backend's kernel ("auto": it checks
        the range itself, with no host read) and use "direct", whose range is unlimited, on other backends.
    key_exp: e^{2 key_proj} [B, S, A] in the compute dtype, computed once by `precompute` when the steps run the
        torch backend in the factorized form (else None): each step's blocks then need no exponential of the keys.
    score_weights: fp32 [cdiv(A, 64) * 64 + 2], the Triton forward's v pre-pass done once by `precompute` when the
        steps run the Triton backend (`functional.prepare_score_weights`; else None): a step is then its score
        kernel alone (one launch, two with split keys), whatever its extra key term. Used only together with
        score_weights_source, and only while that says the score vector's parameters are unchanged (a step after
        an in-place update of v or g runs the pre-pass itself, never stale weights).
    score_weights_source: what score_weights were made from (`ScoreWeightsSource`), or None.
    """

    key_proj: torch.Tensor
    value: torch.Tensor
    key_lengths: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    checked: bool = False
    tanh_form: str = "auto"
    key_exp: torch.Tensor | None = None
    score_weights: torch.Tensor | None = None
    score_weights_source: ScoreWeightsSource | None = None


def check_positive_int(name: str, size) -> None:
    """ValueError unless `size` is an int >= 1 (a bool is not a size, though Python counts True as 1)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")


def check_layer_dtype(dtype):
    """`dtype=` of a layer: None (torch's default) or a floating torch.dtype the op takes; TypeError otherwise."""
    if dtype is not None and dtype not in FLOATING_DTYPES:
        raise TypeError(f"dtype must be a floating torch.dtype (float16, bfloat16, float32 or float64) or None, "
                        f"got {dtype!r}")
    return dtype


def check_input_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A layer input must have the layer's dtype (outside autocast, which casts it); TypeError naming it otherwise,
    rather than nn.Linear's RuntimeError about mat1 and mat2."""
    if tensor.dtype != dtype and autocast_dtype(tensor.device) is None:
        raise TypeError(f"{name} must have the layer's dtype {dtype}, got {tensor.dtype}")


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score(q_i, k_j) = v . tanh(W_q q_i + b + W_k k_j), softmax over keys, weighted values.

    Args:
        query_dim: Dq, size of the decoder states (queries).
        key_dim: Dk, size of the encoder states (keys).
        attn_dim: A, size of the hidden layer of the score MLP.
        bias: learn b (kept in `query_layer.bias`; a bias of W_k would be redundant inside the tanh).
        normalize: weight-normalized score vector v = g * v / ||v|| (as TF-Addons' BahdanauAttention); v = 0 gives
            the zero score vector (uniform weights), not 0 / 0.
        dropout: dropout on the attention weights during training (computed from the returned weights, so it
            costs an extra [B, T, S] x [B, S, D] product; the fused path is used when it is 0 or in eval mode).
        backend: "auto", "triton", "torch" or "reference" (see `attn_fast.additive_attention`).
        device, dtype: of the parameters; dtype a floating torch.dtype (TypeError otherwise). Inputs (query, key)
            must have it outside autocast: another dtype is a TypeError naming the input.

    Parameters: `query_layer` (Linear Dq -> A, with bias), `key_layer` (Linear Dk -> A, no bias), `v` [A] and,
    with `normalize`, the scalar gain `g`.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, bias: bool = True, normalize: bool = False,
                 dropout: float = 0.0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": check_layer_dtype(dtype)}
        for name, size in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim)):
            check_positive_int(name, size)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.normalize = normalize
        self.dropout = dropout
        self.backend = check_backend(backend)
        self.query_layer = nn.Linear(query_dim, attn_dim, bias=bias, **factory)
        self.key_layer = nn.Linear(key_dim, attn_dim, bias=False, **factory)
        self.v = nn.Parameter(torch.empty(attn_dim, **factory))
        self.g = nn.Parameter(torch.empty((), **factory)) if normalize else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.query_layer.reset_parameters()
        self.key_layer.reset_parameters()
        bound = 1.0 / math.sqrt(self.attn_dim)  # as nn.Linear(A, 1) would initialize v
        nn.init.uniform_(self.v, -bound, bound)
        if self.g is not None:
            nn.init.constant_(self.g, math.sqrt(1.0 / self.attn_dim))  # TF-Addons' initial gain
        if self.query_layer.bias is not None:
            nn.init.zeros_(self.query_layer.bias)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}, "
                f"normalize={self.normalize}, dropout={self.dropout}, backend={self.backend!r}")

    def score_vector(self) -> torch.Tensor:
        """The v used in the scores: the parameter itself, or g * v / ||v|| with `normalize`."""
        if self.g is None:
            return self.v
        # v = 0 has no direction: the clamp makes it the zero score vector (uniform weights, zero gradients through
        # the norm) instead of 0 / 0 = NaN everywhere.
        norm = torch.linalg.vector_norm(self.v).clamp_min(torch.finfo(self.v.dtype).tiny)
        return self.g * self.v / norm

    def score_parameters(self) -> tuple[torch.Tensor, ...]:
        """The parameters `score_vector` is computed from: (v,), or (v, g) with `normalize`."""
        return (self.v,) if self.g is None else (self.v, self.g)

    def _step_score_inputs(self, memory: AttentionMemory,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The score vector a step against `memory` computing in `dtype` passes, and the memory's prepared score
        weights when they still hold (`usable_score_weights`, else None). With weights that hold and no gradient
        wanted for v (or g), the score vector is the one recorded at precompute."""
        weights = usable_score_weights(memory.score_weights, memory.score_weights_source, self.score_parameters(),
                                       dtype)
        if weights is None:
            return self.score_vector(), None
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.score_parameters())
        return (self.score_vector() if wants_grad else memory.score_weights_source.score_vector), weights

    @torch.no_grad()
    def load_eager_weights(self, *, query_weight: torch.Tensor, key_weight: torch.Tensor, v: torch.Tensor,
                           query_bias: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> None:
        """Copy the weights of an eager Bahdanau module: W_q [A, Dq], W_k [A, Dk], v [A] (or [1, A], as an
        nn.Linear(A, 1) holds it), query_bias and key_bias [A]. Floating tensors of exactly these shapes (anything
        else is a ValueError / TypeError naming the argument: nothing is broadcast or reshaped but v's [1, A]).

        Both biases sit inside the tanh next to each other, so they are summed into `query_layer.bias`.
        """
        attn_dim = self.attn_dim
        expected = {"query_weight": (query_weight, [(attn_dim, self.query_dim)]),
                    "key_weight": (key_weight, [(attn_dim, self.key_dim)]),
                    "v": (v, [(attn_dim,), (1, attn_dim)]),
                    "query_bias": (query_bias, [(attn_dim,)]), "key_bias": (key_bias, [(attn_dim,)])}
        for name, (tensor, shapes) in expected.items():
            if tensor is None and name.endswith("_bias"):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
            if tuple(tensor.shape) not in shapes:
                allowed = " or ".join(str(list(shape)) for shape in shapes)
                raise ValueError(f"{name} must have shape {allowed}, got {list(tensor.shape)}")
        v = v.reshape(-1)
        biases = [b for b in (query_bias, key_bias) if b is not None]
        if biases and self.query_layer.bias is None:
            raise ValueError("the eager module has a bias but this layer was built with bias=False")
        self.query_layer.weight.copy_(query_weight)
        self.key_layer.weight.copy_(key_weight)
        self.v.copy_(v)
        if self.g is not None:
            self.g.copy_(torch.linalg.vector_norm(v))  # so that g * v / ||v|| == v
        if self.query_layer.bias is not None:
            self.query_layer.bias.copy_(sum(biases) if biases else 0.0)

    def _project(self, key: torch.Tensor, value: torch.Tensor | None, key_lengths,
                 key_padding_mask) -> AttentionMemory:
        """The memory, not yet validated (`forward` validates it with the call)."""
        if not isinstance(key, torch.Tensor) or key.dim() != 3 or key.shape[-1] != self.key_dim:
            shape = tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__
            raise ValueError(f"key must be [B, S, key_dim={self.key_dim}], got {shape}")
        check_input_dtype("key", key, self.key_layer.weight.dtype)
        return AttentionMemory(self.key_layer(key), key if value is None else value, key_lengths, key_padding_mask)

    def precompute(self, key: torch.Tensor, value: torch.Tensor | None = None, key_lengths=None,
                   key_padding_mask=None, *, index: torch.Tensor | None = None,
                   prepare_keys: bool = True) -> AttentionMemory:
        """Project the keys once per source batch. key [B, S, Dk], value [B, S, D] (default: key).

        The memory is validated here, once, values included (key_lengths within [0, S]: a host read), and the
        torch backend's tanh form for its steps is chosen from max |key_proj|; `step` then checks only
        metadata and reads nothing back to the host (see `AttentionMemory`). `index` [B'], the beam index the
        steps will pass, is range-checked here too. `prepare_keys=False` keeps no e^{2k} (`key_exp`): for layers
        whose steps always add an extra key term, which makes the prepared keys useless. The Triton backend's v
        pre-pass is done here too (`score_weights`, extra key term or not), for steps in this call's dtype (the
        autocast dtype under autocast) while v (and g) keep their values."""
        memory = self._project(key, value, key_lengths, key_padding_mask)
        tanh_form = check_memory(memory.key_proj, memory.value, self.v.detach(), key_lengths=key_lengths,
                                 key_padding_mask=key_padding_mask, index=index)
        # A NaN or inf at a hidden key (e.g. garbage in padding) is zeroed here, once, so that steps need no check
        # for it (README "NaN and inf"); the tanh form is then chosen from the keys that count.
        key_proj, value = hide_masked_keys(memory.key_proj, memory.value, key_lengths=key_lengths,
                                           key_padding_mask=key_padding_mask)
        if key_proj is not memory.key_proj or value is not memory.value:
            memory = replace(memory, key_proj=key_proj, value=value)
            tanh_form = check_memory(key_proj, value, self.v.detach(), key_lengths=key_lengths,
                                     key_padding_mask=key_padding_mask, index=index)
        key_exp = prepare_key_exp(memory.key_proj, tanh_form, self.backend) if prepare_keys else None
        # The steps compute in key_proj's dtype (the autocast dtype if autocast is on now; a step in another dtype
        # finds the weights' recorded dtype different and runs the pre-pass itself).
        with torch.no_grad():
            score_vector = self.score_vector()
        score_weights, source = ScoreWeightsSource.prepare(score_vector, self.score_parameters(),
                                                           call_dtype(memory.key_proj), self.backend)
        return replace(memory, checked=True, tanh_form=tanh_form, key_exp=key_exp, score_weights=score_weights,
                       score_weights_source=source)

    def _attend(self, query: torch.Tensor, memory: AttentionMemory, *, causal=False, extra_key_term=None,
                index=None, need_weights=False):
        """query [B_q, T, Dq] -> context [B_q, T, D], weights [B_q, T, S] or None."""
        apply_dropout = self.training and self.dropout > 0.0
        query_proj = self.query_layer(query)
        options = dict(key_lengths=memory.key_lengths, key_padding_mask=memory.key_padding_mask,
                       need_weights=need_weights or apply_dropout, index=index, extra_key_term=extra_key_term,
                       backend=self.backend)
        if memory.checked and not causal:
            # A step against a memory `precompute` validated: metadata checks only, no host read (AttentionMemory).
            tanh_form = step_tanh_form(memory.tanh_form, has_extra_key_term=extra_key_term is not None,
                                       backend=self.backend, device=memory.key_proj.device,
                                       dtype=memory.key_proj.dtype)
            key_exp = memory.key_exp if extra_key_term is None else None
            score_vector, score_weights = self._step_score_inputs(memory, call_dtype(query_proj))
            context, weights = additive_attention_on_memory(
                query_proj, memory.key_proj, memory.value, score_vector, tanh_form=tanh_form, key_exp=key_exp,
                score_weights=score_weights, **options)
        else:
            context, weights = additive_attention(query_proj, memory.key_proj, memory.value, self.score_vector(),
                                                  causal=causal, **options)
        if apply_dropout:
            values = memory.value if index is None else memory.value.index_select(0, index)
            context = torch.bmm(nn.functional.dropout(weights, self.dropout, training=True), values)
        return context, (weights if need_weights else None)

    def _check_query(self, query) -> None:
        if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3) or query.shape[-1] != self.query_dim:
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must be [B, T, query_dim={self.query_dim}] or [B, query_dim], got {shape}")
        check_input_dtype("query", query, self.query_layer.weight.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None, *,
                key_lengths=None, key_padding_mask=None, causal: bool = False, need_weights: bool = False):
        """query [B, T, Dq] (all decoder steps) or [B, Dq] (one step); key [B, S, Dk]; value [B, S, D] or None
        (= key). Returns context [B, T, D] (or [B, D]) and weights [B, T, S] (or [B, S]) or None."""
        self._check_query(query)
        memory = self._project(key, value, key_lengths, key_padding_mask)  # validated with the call
        single_step = query.dim() == 2
        context, weights = self._attend(query.unsqueeze(1) if single_step else query, memory, causal=causal,
                                        need_weights=need_weights)
        if single_step:
            return context.squeeze(1), (None if weights is None else weights.squeeze(1))
        return context, weights

    def step(self, query: torch.Tensor, memory: AttentionMemory, *, extra_key_term: torch.Tensor | None = None,
             index: torch.Tensor | None = None, need_weights: bool = False):
        """One decoder step against a precomputed memory.

        query [B', Dq]; extra_key_term [B', S, A] added to the key projection (location / coverage features);
        index [B'] maps each query row to its memory row (beam search: B' = B * beam, no memory copies).
        Returns context [B', D] and weights [B', S] or None.

        Against a memory from `precompute`, a step validates metadata only and reads no value back to the host
        (no GPU sync; capturable in a CUDA graph, eagerly or compiled): `index` values are the caller's word (an
        out-of-range one fails in the backends' gathers: IndexError on CPU, a device-side assert on CUDA).
        """
        if not isinstance(memory, AttentionMemory):
            raise TypeError(f"memory must be an AttentionMemory (from precompute), got {type(memory).__name__}")
        if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[-1] != self.query_dim:
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must be [B, query_dim={self.query_dim}] for a step, got {shape}")
        check_input_dtype("query", query, self.query_layer.weight.dtype)
        context, weights = self._attend(query.unsqueeze(1), memory, extra_key_term=extra_key_term, index=index,
                                        need_weights=need_weights)
        return context.squeeze(1), (None if weights is None else weights.squeeze(1))
