"""Random attention problems for tests and `attn-fast verify`: fresh random inputs (never zeros), every mask kind,
fully masked rows, beam `index`, location/coverage `extra_key_term`, non-contiguous layouts and saturating scales.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from attn_fast.functional import additive_attention_reference
from attn_fast.tolerances import relative_error

MASK_KINDS = ("none", "lengths", "padding", "padding_per_query", "causal", "mixed")


@dataclasses.dataclass
class AttentionCase:
    """One call's arguments. Float tensors in `dtype`; masks and index as the API expects them."""

    query_proj: torch.Tensor  # [B_q, T, A]
    key_proj: torch.Tensor  # [B_m, S, A]
    value: torch.Tensor  # [B_m, S, D]
    v: torch.Tensor  # [A]
    key_lengths: torch.Tensor | None = None  # [B_m] int64
    key_padding_mask: torch.Tensor | None = None  # [B_m, S] or [B_q, T, S] bool
    causal: bool = False
    index: torch.Tensor | None = None  # [B_q] int64
    extra_key_term: torch.Tensor | None = None  # [B_q, S, A]

    FLOAT_FIELDS = ("query_proj", "key_proj", "value", "v", "extra_key_term")

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query_proj, self.key_proj, self.value, self.v

    def options(self) -> dict:
        return {
            "key_lengths": self.key_lengths,
            "key_padding_mask": self.key_padding_mask,
            "causal": self.causal,
            "index": self.index,
            "extra_key_term": self.extra_key_term,
        }

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FLOAT_FIELDS if getattr(self, name) is not None}

    def cast(self, dtype: torch.dtype, *, device=None, requires_grad: bool = False) -> AttentionCase:
        """A copy with the float inputs cast to `dtype` (and moved to `device`), as fresh leaves with the same
        strides, so that a non-contiguous layout stays non-contiguous."""
        changes = {}
        for name, tensor in self.float_tensors().items():
            target = tensor.device if device is None else torch.device(device)
            cast = torch.empty_strided(tensor.shape, tensor.stride(), dtype=dtype, device=target)
            cast.copy_(tensor.detach())
            changes[name] = cast.requires_grad_(requires_grad)
        for name in ("key_lengths", "key_padding_mask", "index"):
            tensor = getattr(self, name)
            if tensor is not None and device is not None:
                changes[name] = tensor.to(device)
        return dataclasses.replace(self, **changes)


def _noncontiguous(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same values in a strided, non-contiguous layout: every other element of a twice-as-wide buffer,
    with the first two dims transposed in memory."""
    if tensor.dim() == 1:
        wide = torch.empty(tensor.shape[0], 2, dtype=tensor.dtype, device=tensor.device)
        wide.normal_(generator=generator)
        wide[:, 0] = tensor
        return wide[:, 0]
    order = list(range(tensor.dim()))
    order[0], order[1] = order[1], order[0]
    shape = [tensor.shape[i] for i in order]
    shape[-1] *= 2
    wide = torch.empty(shape, dtype=tensor.dtype, device=tensor.device).normal_(generator=generator)
    strided = wide[..., ::2].permute(*order)
    strided.copy_(tensor)
    return strided


def random_case(
    batch: int,
    tgt_len: int,
    src_len: int,
    attn_dim: int,
    value_dim: int,
    *,
    mask: str = "none",
    fully_masked_rows: bool = False,
    beam: int = 0,
    extra_key_term: bool = False,
    noncontiguous: bool = False,
    scale: float = 1.0,
    saturate: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> AttentionCase:
    """A random problem with B = `batch` memory rows (and B * `beam` query rows when `beam` > 0).

    `scale` multiplies the projections: 1 keeps tanh in its curved range, 1e4 saturates it everywhere.
    `saturate` multiplies only every other attention unit (|q + k| up to ~`saturate` there), so that tanh
    saturates on half the units while the other half keep the gradients meaningful (an all-saturated problem
    has gradients of ~e^-18, whose relative error says nothing).
    `fully_masked_rows` makes at least one query row see no key (when the mask kind allows it).
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    query_rows = batch * beam if beam else batch
    unit_scale = torch.full((attn_dim,), float(scale), dtype=torch.float64)
    if saturate is not None:
        unit_scale[::2] *= saturate
    case = AttentionCase(
        query_proj=normal(query_rows, tgt_len, attn_dim) * unit_scale,
        key_proj=normal(batch, src_len, attn_dim) * unit_scale,
        value=normal(batch, src_len, value_dim),
        # Scores of order 1-3: the softmax is neither uniform nor one-hot.
        v=normal(attn_dim, std=2.0 / math.sqrt(attn_dim)),
    )
    if beam:
        case.index = torch.arange(batch).repeat_interleave(beam)[torch.randperm(query_rows, generator=generator)]
    if extra_key_term:
        case.extra_key_term = normal(query_rows, src_len, attn_dim, std=0.5) * unit_scale

    if mask in ("lengths", "mixed"):
        case.key_lengths = torch.randint(1, src_len + 1, (batch,), generator=generator)
        if fully_masked_rows:
            case.key_lengths[0] = 0
    if mask in ("padding", "mixed"):
        case.key_padding_mask = torch.rand(batch, src_len, generator=generator) < 0.3
        if fully_masked_rows:
            case.key_padding_mask[-1] = True
    if mask == "padding_per_query":
        case.key_padding_mask = torch.rand(query_rows, tgt_len, src_len, generator=generator) < 0.3
        if fully_masked_rows:
            case.key_padding_mask[0, tgt_len // 2] = True
    if mask in ("causal", "mixed"):
        case.causal = True
        if fully_masked_rows and mask == "causal":
            # With causal alone row 0 always sees key 0; hide it with lengths so that rows go empty.
            case.key_lengths = torch.randint(0, src_len + 1, (batch,), generator=generator)
            case.key_lengths[0] = 0

    if noncontiguous:
        for name, tensor in case.float_tensors().items():
            setattr(case, name, _noncontiguous(tensor, generator))
    return case.cast(dtype, device=device)


def errors_against_reference(case: AttentionCase, dtype: torch.dtype, run, *, gradients: bool = True,
                             seed: int = 0) -> dict[str, float]:
    """Relative errors of one backend against the float64 reference on the same (rounded) inputs.

    `run(query_proj, key_proj, value, v, need_weights=True, **case.options())` is called on `case` cast to
    `dtype`; with `gradients`, both sides are back-propagated from the same random output gradients (through
    the context and through the weights). Returns {"context", "weights", "grad_<input>"...: error}. Raises
    AssertionError if `run` modified any input.
    """
    tested = case.cast(dtype, requires_grad=gradients)
    # The reference sees exactly the values the backend sees: the dtype-rounded inputs, then float64.
    oracle = tested.cast(torch.float64, requires_grad=gradients)
    before = {name: tensor.detach().clone() for name, tensor in tested.float_tensors().items()}

    expected_context, expected_weights = additive_attention_reference(*oracle.inputs(), **oracle.options(),
                                                                      need_weights=True)
    context, weights = run(*tested.inputs(), need_weights=True, **tested.options())
    errors = {"context": relative_error(context, expected_context),
              "weights": relative_error(weights, expected_weights)}
    if gradients:
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        grad_context = torch.randn(expected_context.shape, generator=generator, dtype=torch.float64)
        grad_weights = torch.randn(expected_weights.shape, generator=generator, dtype=torch.float64)
        device = expected_context.device
        grad_context, grad_weights = grad_context.to(device), grad_weights.to(device)
        ((expected_context * grad_context).sum() + (expected_weights * grad_weights).sum()).backward()
        ((context * grad_context.to(dtype)).sum() + (weights * grad_weights.to(dtype)).sum()).backward()
        for name in tested.float_tensors():
            errors[f"grad_{name}"] = relative_error(getattr(tested, name).grad, getattr(oracle, name).grad)
    for name, tensor in tested.float_tensors().items():
        if not torch.equal(tensor.detach(), before[name]):
            raise AssertionError(f"{name} was modified by the call")
    return errors
