"""key_lengths reach both backwards (issue 12, point 9): padded keys cost no tanh work in training.

- Gradients with ragged key lengths match the float64 reference on both backends, with every uninitialized buffer
  poisoned (NaN), so that the zeros the skipped key tiles must still write are really written.
- The skipping itself: the Triton tanh pass is handed NaN in dE at the key tiles that lie entirely beyond a row's
  length (dE is promised 0 there) and its results stay exact, which only holds if those tiles are never walked;
  the torch backend's backward blocks are recorded and stop at the longest length of their rows.
"""
from __future__ import annotations

import pytest
import torch

from attn_fast import additive_attention
from attn_fast.backends import common, torch_backend
from attn_fast.tolerances import gradient_tolerance, relative_error
from attn_fast.tools.testing import errors_against_reference, random_case

backward = pytest.importorskip("attn_fast.kernels.backward")
launcher = pytest.importorskip("attn_fast.kernels.launch")

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    return poison(launcher), poison(common)


def reference_tanh_pass(query_proj, key_proj, v, grad_scores, index=None):
    """float64 autograd of sum(E * dE) with E = tanh(q + k) @ v: (d query_proj, d row keys, d v)."""
    query = query_proj.double().requires_grad_(True)
    row_keys = (key_proj if index is None else key_proj[index]).double().requires_grad_(True)
    v64 = v.double().requires_grad_(True)
    scores = torch.tanh(query[:, :, None, :] + row_keys[:, None, :, :]) @ v64
    (scores * grad_scores.double()).sum().backward()
    return query.grad, row_keys.grad, v64.grad


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(("beam", "num_splits"), [(0, None), (2, None), (0, 2)])
def test_triton_tanh_pass_skips_padded_key_tiles(triton_device, deterministic, beam, num_splits):
    case = random_case(3, 6, 70, 16, 4, beam=beam, seed=5).cast(torch.float32, device=triton_device)
    memory_rows, query_rows = case.key_proj.shape[0], case.query_proj.shape[0]
    key_lengths = torch.tensor([10, 40, 0], device=triton_device)[:memory_rows]
    index = case.index
    row_lengths = key_lengths if index is None else key_lengths[index]
    grad_scores = torch.randn(query_rows, 6, 70, device=triton_device)
    keys = torch.arange(70, device=triton_device)
    grad_scores[(keys[None, :] >= row_lengths[:, None])[:, None, :].expand_as(grad_scores)] = 0.0
    expected = reference_tanh_pass(case.query_proj, case.key_proj, case.v, grad_scores, index)

    block_s = backward.plan_backward(case.query_proj, case.key_proj, case.v, grad_scores,
                                     num_splits=num_splits).config.block_s
    tile_ends = (row_lengths + block_s - 1) // block_s * block_s  # keys of the tiles the rows still reach
    skipped = (keys[None, :] >= tile_ends[:, None])[:, None, :].expand_as(grad_scores)
    assert skipped.any()
    poisoned = grad_scores.clone()
    poisoned[skipped] = float("nan")

    results = backward.attention_backward_tanh_pass(
        case.query_proj, case.key_proj, case.v, poisoned, index=index, key_lengths=key_lengths,
        deterministic=deterministic, num_splits=num_splits)
    for name, result, reference in zip(("grad_query", "grad_row_keys", "grad_v"), results, expected):
        assert not torch.isnan(result).any(), name
        assert relative_error(result, reference) <= gradient_tolerance(torch.float32), name
    # Keys past the length: exactly 0 (written, not left as poison).
    grad_row_keys = results[1]
    assert torch.equal(grad_row_keys[keys[None, :].expand(query_rows, -1) >= row_lengths[:, None]],
                       torch.zeros_like(grad_row_keys[keys[None, :].expand(query_rows, -1) >= row_lengths[:, None]]))

    # Without key_lengths the same NaN reaches the outputs: the tiles above are read unless skipped.
    unskipped = backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, poisoned, index=index,
                                                      deterministic=deterministic, num_splits=num_splits)
    assert torch.isnan(unskipped[2]).any()


def test_triton_tanh_pass_rejects_bad_key_lengths(triton_device):
    case = random_case(2, 3, 5, 4, 2).cast(torch.float32, device=triton_device)
    grad_scores = torch.zeros(2, 3, 5, device=triton_device)
    with pytest.raises(ValueError, match="key_lengths"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, grad_scores,
                                              key_lengths=torch.ones(3, dtype=torch.int64, device=triton_device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [dict(), dict(beam=2, extra_key_term=True), dict(mask="mixed")])
def test_ragged_lengths_gradients_match_reference(triton_device, backend, options):
    mask = options.pop("mask", "lengths")
    case = random_case(4, 5, 70, 16, 6, mask=mask, **options, seed=7)
    case.key_lengths = torch.tensor([70, 35, 1, 12])
    device = triton_device if backend == "triton" else torch.device("cpu")
    case = case.cast(torch.float32, device=device)

    def run(*inputs, **arguments):
        return additive_attention(*inputs, **arguments, backend=backend)

    errors = errors_against_reference(case, torch.float32, run)
    for name, error in errors.items():
        assert error <= gradient_tolerance(torch.float32), (name, errors)


def test_torch_backward_blocks_stop_at_the_longest_length(monkeypatch):
    """One query row per block (chunk_elements = T * S * A): each backward block covers exactly its row's length."""
    lengths = [70, 35, 1, 0, 12]
    case = random_case(5, 3, 70, 8, 4, mask="lengths", seed=2)
    case.key_lengths = torch.tensor(lengths)
    leaves = case.cast(torch.float32, requires_grad=True)
    visited = []
    original_walk = torch_backend._Operands.walk

    def recording_walk(self, *, skip_padded_keys=False):
        for block in original_walk(self, skip_padded_keys=skip_padded_keys):
            if skip_padded_keys:
                rows, _, keys, _, _ = block
                visited.append((rows.start, keys.start, keys.stop))
            yield block

    monkeypatch.setattr(torch_backend._Operands, "walk", recording_walk)
    call = torch_backend.AttentionCall(*leaves.inputs(), key_lengths=leaves.key_lengths)
    context, _ = torch_backend.attend(call, chunk_elements=3 * 70 * 8)
    context.sum().backward()
    keys_per_row = [0] * len(lengths)
    for row, start, stop in visited:
        keys_per_row[row] += stop - start
    assert keys_per_row == lengths
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.float_tensors().values())
