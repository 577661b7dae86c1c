"""Deploying a model that uses attn-fast: its exported graph decomposed to standard ATen ops, for ONNX.

`torch.export.export` of a model that calls the library keeps the backend's custom op (`attn_fast::torch_forward`,
`attn_fast::cpu_forward` or `attn_fast::triton_forward`) in the graph as one opaque node: the right thing for
AOTInductor or `torch.compile` on the exported program, which then run our kernels, but not for ONNX, whose
runtimes know nothing of that op. `decompositions()` maps each of these ops to its exact math in standard ATen
ops (tanh scores, the masks, the zero-safe masked softmax, the weighted values), and

    onnx_program = attn_fast.export.export_onnx(model, args)              # torch.export, decompose, ONNX
    # or, step by step:
    exported = attn_fast.export.decompose(torch.export.export(model, args))
    onnx_program = torch.onnx.export(exported, args, dynamo=True)

gives a graph that ONNX Runtime runs. Only the exported graph changes; eager and compiled calls keep the fused
kernels. `register_onnx_decompositions()` (opt-in) lets a plain `torch.onnx.export(model, args, dynamo=True)` find
the decompositions itself.

What the decomposition computes, and what it costs:
- The reference formula (`attn_fast.backends.reference`, the oracle of every test), in the backend's compute dtype
  (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64) with the context cast back to the input dtype, exactly as the
  ops return it; key_lengths, key_padding_mask ([B, S] or [B, T, S]), causal, a beam `index` and an extra key term
  (location / coverage features) included. A row with no visible key gets weights 0 and context 0, as in eager.
- It materializes the [B, T, S, A] tanh tensor. We chose this over chunking on purpose: an exported graph with a
  dynamic decoder length T cannot loop over chunks without ONNX Loop/Scan control flow, and the graphs deployed
  are decoding steps (T = 1), where the tensor is [B, 1, S, A], as large as what every eager framework module
  (Tacotron-2, Coqui, OpenNMT-py) holds at each step. A whole-sequence (teacher-forced) export with large T * S * A
  pays the eager frameworks' memory, not attn-fast's.
- The tanh-form and chunk-size options of the ops, a memory's prepared e^{2 key_proj} (`key_exp`) and its
  prepared score weights (`score_weights`, the Triton op's v pre-pass done once), only choose how the fused
  kernels compute the same numbers: the decomposition ignores them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# The CPU backend's op is registered when its module is imported, which dispatch does lazily (its numba kernels
# are compiled on first use, not on import): imported here so that `decompositions()` always covers it.
from attn_fast.backends import cpu_backend, reference  # noqa: F401
from attn_fast.backends.common import compute_dtype
from attn_fast.validation import AttentionCall

__all__ = ["FORWARD_OPS", "decompose", "decompositions", "exact_attention", "export_onnx",
           "register_onnx_decompositions"]

#: The forward ops of the backends, by name in the `attn_fast` op namespace. Each takes the call flat
#: (`AttentionCall.op_inputs`: query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index,
#: causal) followed by options of its own, and returns (context in the input dtype, P in the compute dtype).
FORWARD_OPS = ("torch_forward", "cpu_forward", "triton_forward")


def exact_attention(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor,
                    extra_key_term: torch.Tensor | None, key_lengths: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, index: torch.Tensor | None,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward ops' math in standard ATen ops, for the op inputs as the backends receive them.

    query_proj [B_q, T, A], key_proj [B_m, S, A], value [B_m, S, D], v [A], extra_key_term [B_q, S, A] or None,
    key_lengths [B_m] or None, key_padding_mask [B_m, S] / [B_q, T, S] bool or None, index [B_q] or None.
    Returns context [B_q, T, D] in the input dtype and P [B_q, T, S] in the compute dtype, as the ops do.
    """
    dtype = compute_dtype(query_proj.dtype)

    def in_compute_dtype(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    call = AttentionCall.from_op_inputs(
        in_compute_dtype(query_proj), in_compute_dtype(key_proj), in_compute_dtype(value), in_compute_dtype(v),
        in_compute_dtype(extra_key_term), key_lengths, key_padding_mask, index, causal, need_weights=True)
    context, probs = reference.attend(call)
    return context.to(query_proj.dtype), probs


def _torch_forward(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal,
                   tanh_form, chunk_elements, key_exp=None):
    """attn_fast::torch_forward: the tanh form, the block size and key_exp change how, not what, it computes."""
    return exact_attention(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index,
                           causal)


def _cpu_forward(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal,
                 tanh_form, key_exp=None):
    """attn_fast::cpu_forward (the compiled CPU kernels): the same results as the torch backend's op."""
    return exact_attention(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index,
                           causal)


def _triton_forward(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal,
                    keep_probs, key_exp=None, score_weights=None):
    """attn_fast::triton_forward: P in fp32 when `keep_probs`, else an empty fp32 tensor (as the op returns it);
    key_exp and score_weights (prepared from the keys and v) change how, not what, it computes."""
    context, probs = exact_attention(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask,
                                     index, causal)
    return context, (probs.float() if keep_probs else probs.new_empty(0, dtype=torch.float32))


_DECOMPOSITIONS: dict[str, Callable] = {
    "torch_forward": _torch_forward, "cpu_forward": _cpu_forward, "triton_forward": _triton_forward,
}


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """{op overload: its decomposition} for every forward op of `FORWARD_OPS` registered in this process (a
    backend's op exists once its module is imported: the Triton one only where triton is importable), for
    `ExportedProgram.run_decompositions`. Merge it into a table of your own, or use `decompose`."""
    table = {}
    for name in FORWARD_OPS:
        # torch.ops.attn_fast raises AttributeError for an op not registered (its backend never imported).
        packet = getattr(torch.ops.attn_fast, name, None)
        if packet is not None:
            table[packet.default] = _DECOMPOSITIONS[name]
    return table


def decompose(exported_program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`exported_program` with every attn-fast forward op replaced by its standard-op decomposition (and torch's
    default decompositions applied, as `run_decompositions()` applies them). Returns a new program."""
    if not isinstance(exported_program, torch.export.ExportedProgram):
        raise TypeError(f"exported_program must be a torch.export.ExportedProgram, got "
                        f"{type(exported_program).__name__}")
    table = torch.export.default_decompositions()
    for op, decomposition in decompositions().items():
        table[op] = decomposition
    return exported_program.run_decompositions(table)


def export_onnx(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None,
                strict: bool = False, **onnx_options):
    """`torch.onnx.export(..., dynamo=True)` of a model that uses attn-fast: `torch.export.export(model, args,
    kwargs, dynamic_shapes=..., strict=...)`, then `decompose`, then the ONNX exporter on the decomposed program.

    onnx_options: passed to `torch.onnx.export` (e.g. `input_names`, `output_names`, `opset_version`; `f` to write
    the file). Returns the `torch.onnx.ONNXProgram` (`.save(path)`, `.model_proto`). Needs the `onnx` and
    `onnxscript` packages (`pip install attn-fast[export]`, which adds onnxruntime to run the result).
    """
    exported = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return torch.onnx.export(decompose(exported), tuple(args), kwargs=kwargs, dynamo=True, **onnx_options)


def register_onnx_decompositions() -> None:
    """Opt-in: add `decompositions()` to the table PyTorch's ONNX exporter draws its decompositions from, so that a
    plain `torch.onnx.export(model, args, dynamo=True)` of a model that uses attn-fast gives standard ONNX ops.

    That table, `torch._decomp.decomposition_table`, is private to PyTorch (checked with torch 2.13, whose ONNX
    exporter builds its table from it and `torch.export.default_decompositions()`); `torch.export`'s own defaults
    and `torch.compile` select their decompositions by op lists and do not take ours from it. Registering twice
    is harmless. Prefer `export_onnx` or `decompose`, which touch no global state; call this once before the
    export, after the backends your model uses have run once (the Triton op exists only after its first use).
    """
    table = getattr(torch._decomp, "decomposition_table", None)
    if not isinstance(table, dict):
        raise RuntimeError("this PyTorch has no torch._decomp.decomposition_table: use attn_fast.export.export_onnx "
                           "or attn_fast.export.decompose instead")
    table.update(decompositions())
