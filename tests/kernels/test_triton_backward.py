"""The fused backward tanh pass (kernels/backward.py) against float64 autograd.

Oracle: E = sum_a v[a] tanh(qp[b, i, a] + kp_rows[b, j, a]) materialized in float64 on the dtype-rounded inputs,
with kp_rows = key_proj[index] (+ extra_key_term), and torch.autograd.grad(E, (qp, kp_rows, v), dE).

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny but
cross the tile edges of the default configurations (BLOCK_S 4..32, BLOCK_A 2..128) and of small explicit ones
(several key tiles, A-chunks, query steps of 2 rows and query-row splits). Every test runs with the uninitialized
output buffers pre-filled with NaN (`poisoned_buffers`), so an element the kernel forgets to write fails.
"""
from __future__ import annotations

import pytest
import torch

from attn_fast.tolerances import gradient_tolerance, relative_error
from attn_fast.tools.testing import random_case

# attn_fast.kernels is the top-level kernels/ folder, installed under that name by setup.py's package_dir mapping.
forward = pytest.importorskip("attn_fast.kernels.forward")
backward = pytest.importorskip("attn_fast.kernels.backward")
configs = pytest.importorskip("attn_fast.kernels.configs")
launcher = pytest.importorskip("attn_fast.kernels.launch")
BackwardConfig = configs.BackwardConfig

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The reciprocal tanh forms overflow to +-inf on purpose for saturated inputs (1 / inf = 0 is the limit); the
# interpreter computes with numpy, which reports each such overflow.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_buffers(poison):
    """Every buffer the launchers allocate uninitialized starts as NaN (the backward allocates through
    launcher.empty_buffer): unwritten elements fail the comparison."""
    return poison(launcher)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def random_grad_scores(query_rows, tgt_len, src_len, *, device, causal=False, seed=0) -> torch.Tensor:
    """dE as the backend hands it over: random fp32, zero at random hidden positions, in one fully hidden row
    (when there are two or more), and above the diagonal with causal."""
    generator = torch.Generator().manual_seed(seed)
    grad_scores = torch.randn(query_rows, tgt_len, src_len, generator=generator)
    grad_scores[torch.rand(query_rows, tgt_len, src_len, generator=generator) < 0.3] = 0.0
    if query_rows * tgt_len >= 2:
        grad_scores[0, tgt_len // 2] = 0.0
    if causal:
        keys = torch.arange(src_len)
        grad_scores[:, keys[None, :] > torch.arange(tgt_len)[:, None]] = 0.0
    return grad_scores.to(device)


def expected_gradients(case, grad_scores):
    """float64 autograd of the materialized scores: (grad query_proj, grad per-row keys, grad v)."""
    case64 = case.cast(torch.float64, requires_grad=True)  # on the case's device: the GPU test's shapes are large
    row_keys = case64.key_proj if case64.index is None else case64.key_proj[case64.index]
    if case64.extra_key_term is not None:
        row_keys = row_keys + case64.extra_key_term
    scores = (case64.v * torch.tanh(case64.query_proj[:, :, None, :] + row_keys[:, None, :, :])).sum(-1)
    return torch.autograd.grad(scores, (case64.query_proj, row_keys, case64.v), grad_scores.double())


def run_backward(case, grad_scores, **options):
    return backward.attention_backward_tanh_pass(
        case.query_proj, case.key_proj, case.v, grad_scores, index=case.index, extra_key_term=case.extra_key_term,
        **options,
    )


def check(case, grad_scores, *, tolerance=None, **options):
    """Run the kernel, check shapes, dtypes, finiteness and the errors against float64; return the gradients."""
    grads = run_backward(case, grad_scores, **options)
    expected = expected_gradients(case, grad_scores)
    tolerance = gradient_tolerance(case.query_proj.dtype) if tolerance is None else tolerance
    for name, grad, reference in zip(("grad_query_proj", "grad_row_keys", "grad_v"), grads, expected):
        assert grad.dtype == torch.float32 and grad.shape == reference.shape, name
        assert torch.isfinite(grad).all(), name
        error = relative_error(grad, reference)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.3g}"
    return grads


# ----------------------------------------------------------------------------------------------------------------
# shapes, dtypes, layouts

# (B, T, S, A): T = 1 and S = 1, S on and just past the 32-key tile (the last tile shifted back), S shorter than
# the tile (masked dE loads), A not a power of two and past the 128-unit chunk (two chunks).
SHAPES = [
    (2, 1, 1, 3),
    (2, 1, 37, 13),
    (1, 5, 1, 4),
    (2, 3, 20, 6),
    (2, 6, 32, 8),
    (2, 7, 33, 9),
    (1, 4, 65, 130),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_config_matches_float64(shape, dtype, triton_device):
    batch, tgt_len, src_len, attn_dim = shape
    case = random_case(batch, tgt_len, src_len, attn_dim, 2, dtype=dtype, device=triton_device, seed=sum(shape))
    check(case, random_grad_scores(batch, tgt_len, src_len, seed=len(shape), device=triton_device))


# Small explicit tiles: several key tiles (full and partial), A-chunks (full and partial) and 2-row query steps
# with a partial last step, with every tanh form.
SMALL_CONFIGS = [
    BackwardConfig(block_t=2, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized"),
    BackwardConfig(block_t=1, block_s=8, block_a=2, num_warps=1, num_stages=1, tanh_form="exp", num_splits=2),
    BackwardConfig(block_t=2, block_s=4, block_a=8, num_warps=2, num_stages=1, tanh_form="approx", num_splits=3),
]


def config_id(config):
    return f"{config.tanh_form}-t{config.block_t}s{config.block_s}a{config.block_a}x{config.num_splits}"


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=config_id)
@pytest.mark.parametrize("shape", [(2, 5, 11, 7), (1, 4, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_small_tiles_cross_every_edge(config, shape, triton_device):
    batch, tgt_len, src_len, attn_dim = shape
    case = random_case(batch, tgt_len, src_len, attn_dim, 2, device=triton_device, seed=3)
    check(case, random_grad_scores(batch, tgt_len, src_len, seed=4, device=triton_device), config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_beam_index_extra_key_term_and_noncontiguous_inputs(dtype, triton_device):
    """index maps 6 query rows onto 2 memory rows; every float input (and dE) is strided and non-contiguous."""
    case = random_case(2, 3, 35, 10, 2, beam=3, extra_key_term=True, noncontiguous=True, dtype=dtype,
                       device=triton_device, seed=11)
    assert not case.query_proj.is_contiguous() and not case.key_proj.is_contiguous()
    grad_scores = random_grad_scores(6, 3, 35, seed=12, device=triton_device)
    grad_scores = grad_scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not grad_scores.is_contiguous()
    check(case, grad_scores)


@pytest.mark.parametrize("option", ["index", "extra_key_term"])
def test_index_and_extra_key_term_alone(option, triton_device):
    if option == "index":
        case = random_case(3, 4, 9, 6, 2, beam=2, device=triton_device, seed=13)
    else:
        case = random_case(3, 4, 9, 6, 2, extra_key_term=True, device=triton_device, seed=13)
    check(case, random_grad_scores(case.query_proj.shape[0], 4, 9, seed=14, device=triton_device),
          config=SMALL_CONFIGS[0])


def test_padded_grad_scores_rows_from_the_buffer_helper(triton_device):
    """dE written into `grad_scores_buffer` (row stride padded to 16) gives the same gradients as contiguous dE."""
    case = random_case(2, 3, 21, 6, 2, device=triton_device, seed=15)
    grad_scores = random_grad_scores(2, 3, 21, seed=16, device=triton_device)
    padded = backward.grad_scores_buffer(2, 3, 21, triton_device)
    padded.copy_(grad_scores)
    assert padded.shape == (2, 3, 21) and padded.stride(1) % backward.GRAD_SCORES_ROW_ALIGN == 0
    contiguous_grads = run_backward(case, grad_scores, deterministic=True)
    padded_grads = run_backward(case, padded, deterministic=True)
    for contiguous_grad, padded_grad in zip(contiguous_grads, padded_grads):
        assert torch.equal(contiguous_grad, padded_grad)


# ----------------------------------------------------------------------------------------------------------------
# numerics: saturation and the tanh forms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_inputs_stay_finite_and_accurate(dtype, triton_device):
    """Every other attention unit has |q + k| up to ~1e4: the fp32 factorized form must fall back (e^{2x} would
    overflow), and no form may produce NaN/inf (1 - t^2 = 0 there, t = +-1)."""
    case = random_case(2, 5, 34, 12, 2, saturate=3e3, dtype=dtype, device=triton_device, seed=17)
    assert float(case.query_proj.abs().max()) > 1e3
    check(case, random_grad_scores(2, 5, 34, seed=18, device=triton_device))


@pytest.mark.parametrize("tanh_form", configs.BACKWARD_TANH_FORMS)
def test_every_tanh_form_meets_the_fp32_tolerance(tanh_form, triton_device):
    """Under the interpreter "approx" runs the portable formula, so it meets fp32's tolerance too; on a GPU only
    the reciprocal forms are held to it ("approx" is the half-precision choice)."""
    if tanh_form == "approx" and triton_device.type == "cuda":
        pytest.skip("tanh.approx.f32 is for fp16/bf16")
    case = random_case(2, 4, 19, 7, 2, scale=3.0, device=triton_device, seed=19)
    check(case, random_grad_scores(2, 4, 19, seed=20, device=triton_device), tanh_form=tanh_form)


def test_large_projections_with_small_sums_take_the_exact_form(triton_device):
    """|q|, |k| ~ 30 (beyond the factorized form's range of 20, where e^{2q} e^{2k} leaves fp32) but q + k ~ 1 in
    key tile 0: the program must notice and take the exp form, or those gradients are garbage. Key tile 1 keeps
    |k| ~ 1 (q + k ~ -30, saturated)."""
    case = random_case(1, 3, 8, 4, 2, device=triton_device, seed=21)
    case.query_proj.data -= 30.0
    case.key_proj.data[0, :4] += 30.0
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    check(case, random_grad_scores(1, 3, 8, seed=22, device=triton_device), config=config)


@pytest.mark.parametrize("src_len", [6, 3])
def test_keys_past_the_last_tile_add_nothing_at_the_edge_of_the_factorized_range(src_len, triton_device):
    """The keys a key tile reads but does not own are set to +inf, so that 1 - t^2 = 0 there in every form: with
    S = 6 and tiles of 4 the last tile reads keys 2..5 and owns 4, 5 (keys 2, 3 belong to the first tile); with
    S = 3 the only tile masks key 3, past S. q ~ -18 and k ~ +18 (q + k ~ 0, still in the factorized range): a
    key not owned that got any finite e^{2k} instead (up to e^{40}) would give r = 1 / (1 + e^{-36} e^{40}), far
    from 0, and its dE would leak into grad_query_proj and grad_v."""
    case = random_case(1, 3, src_len, 4, 2, scale=0.5, device=triton_device, seed=51)
    case.query_proj.data -= 18.0
    case.key_proj.data += 18.0
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    check(case, random_grad_scores(1, 3, src_len, seed=52, device=triton_device), config=config)


@pytest.mark.parametrize(("src_len", "keys_fit"), [(32, True), (50, True), (33, True), (20, False)])
def test_last_key_tile_is_shifted_back_unless_the_source_is_shorter_than_a_tile(src_len, keys_fit):
    """KEYS_FIT (S >= BLOCK_S): the last key tile ends at key S and loads dE without a key mask; only a source
    shorter than one tile takes the masked loads (kernels/backward.py, module docstring)."""
    meta = torch.empty(2, 3, 256, device="meta")
    keys = torch.empty(2, src_len, 256, device="meta")
    plan = backward.plan_backward(meta, keys, torch.empty(256, device="meta"),
                                  backward.grad_scores_buffer(2, 3, src_len, "meta"))
    assert plan.config.block_s == 32
    assert plan.launches[0].arguments["KEYS_FIT"] is keys_fit


def test_default_tanh_forms_per_dtype():
    def form(dtype, tgt_len=50, **options):
        return configs.backward_config(query_rows=32, tgt_len=tgt_len, src_len=50, attn_dim=256,
                                                dtype=dtype, **options).tanh_form

    assert form(torch.float32) == "factorized"
    assert form(torch.float32, tgt_len=1) == "exp"  # too few rows to pay for the per-key exponentials
    assert form(torch.float16) == form(torch.bfloat16) == "approx"
    assert form(torch.float16, tanh_form="exp") == "exp"
    with pytest.raises(ValueError, match="tanh_form"):
        form(torch.float32, tanh_form="libdevice")


# ----------------------------------------------------------------------------------------------------------------
# causal skipping


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_matches_float64(dtype, triton_device):
    case = random_case(2, 9, 9, 5, 2, dtype=dtype, device=triton_device, seed=23)
    grad_scores = random_grad_scores(2, 9, 9, causal=True, seed=24, device=triton_device)
    check(case, grad_scores, causal=True, config=SMALL_CONFIGS[0] if dtype == torch.float32 else None)


@pytest.mark.parametrize(("tgt_len", "src_len"), [(7, 12), (9, 11)])
def test_causal_skips_exactly_the_query_steps_before_each_key_tile(tgt_len, src_len, triton_device):
    """With causal=True the kernel must not visit (query step, key tile) pairs that lie before the tile: fed a dE
    that is NOT zero above the diagonal, it must give the gradients of dE with exactly those pairs removed (and
    not the gradients of the full dE). Key tiles of 4, query steps of 2 rows: row i sees tile k iff
    i >= floor(4k / 2) * 2. With S = 11 the last tile reads keys 7..10 and owns 8..10: its start for causal is
    its first owned key, and key 7 (owned by the tile before) must add nothing at the rows it visits."""
    config = BackwardConfig(block_t=2, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    case = random_case(1, tgt_len, src_len, 6, 2, device=triton_device, seed=25)
    grad_scores = random_grad_scores(1, tgt_len, src_len, seed=26, device=triton_device)
    rows = torch.arange(tgt_len, device=triton_device)[:, None]
    tile_start = (torch.arange(src_len, device=triton_device) // 4 * 4)[None, :]
    visited = rows >= tile_start // 2 * 2
    assert not visited.all() and visited.any()
    grads = run_backward(case, grad_scores, causal=True, config=config)
    expected = expected_gradients(case, grad_scores * visited.to(grad_scores.device))
    full = expected_gradients(case, grad_scores)
    for grad, reference, reference_full in zip(grads, expected, full):
        assert relative_error(grad, reference) <= gradient_tolerance(torch.float32)
        assert relative_error(grad, reference_full) > 1e-3


def test_key_tiles_after_the_last_query_row_write_zeros(triton_device):
    """S > T with causal: key tiles past the last query row are never visited, yet their grad_row_keys must be
    written (as zeros), not left uninitialized (NaN under poisoned_buffers)."""
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    case = random_case(2, 3, 13, 5, 2, device=triton_device, seed=27)
    grad_scores = random_grad_scores(2, 3, 13, causal=True, seed=28, device=triton_device)
    _, grad_row_keys, _ = check(case, grad_scores, causal=True, config=config)
    assert (grad_row_keys[:, 4:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# determinism


def test_deterministic_mode_is_bit_identical_on_repeat(triton_device):
    """Under torch.use_deterministic_algorithms(True), grad_query_proj comes from per-key-tile partials summed in a
    fixed order: two calls give the same bits (several key tiles, so atomics would have had an order to vary)."""
    case = random_case(1, 5, 10, 6, 2, beam=2, extra_key_term=True, device=triton_device, seed=29)
    grad_scores = random_grad_scores(2, 5, 10, seed=30, device=triton_device)
    config = BackwardConfig(block_t=2, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = check(case, grad_scores, config=config)
        second = run_backward(case, grad_scores, config=config)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_flag_selects_partials_or_atomics(deterministic, triton_device):
    case = random_case(2, 3, 10, 6, 2, device=triton_device, seed=31)
    grad_scores = random_grad_scores(2, 3, 10, seed=32, device=triton_device)
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    plan = backward.plan_backward(case.query_proj, case.key_proj, case.v, grad_scores, deterministic=deterministic,
                                  config=config)
    assert plan.grad_query.shape == ((3 if deterministic else 1), 2, 3, 6)  # 3 key tiles of 4 keys
    check(case, grad_scores, deterministic=deterministic, config=config)


def test_each_key_tile_writes_only_its_own_partial(triton_device):
    """The deterministic contract: partial k holds exactly key tile k's share of grad_query_proj (so that no two
    programs ever add into one element, and the fixed-order sum decides the result alone)."""
    case = random_case(2, 3, 10, 6, 2, device=triton_device, seed=45)
    grad_scores = random_grad_scores(2, 3, 10, seed=46, device=triton_device)
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized")
    plan = backward.plan_backward(case.query_proj, case.key_proj, case.v, grad_scores, deterministic=True,
                                  interpret=launcher.is_interpreter(), config=config)
    for launch in plan.launches:
        launch.kernel[launch.grid](**launch.arguments, num_warps=launch.num_warps, num_stages=launch.num_stages)
    keys = torch.arange(10, device=triton_device)
    for tile in range(3):
        in_tile = ((keys >= 4 * tile) & (keys < 4 * tile + 4)).to(grad_scores.dtype)
        expected_query, _, _ = expected_gradients(case, grad_scores * in_tile)
        assert relative_error(plan.grad_query[tile], expected_query) <= gradient_tolerance(torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_split_query_rows_bit_identical_in_deterministic_mode(causal, triton_device):
    """Query rows split across programs: grad_row_keys is then added by several programs (atomics, or per-split
    partials in deterministic mode, summed in a fixed order)."""
    case = random_case(1, 9, 10, 6, 2, extra_key_term=True, device=triton_device, seed=47)
    grad_scores = random_grad_scores(1, 9, 10, causal=causal, seed=48, device=triton_device)
    config = BackwardConfig(block_t=2, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized",
                            num_splits=3)
    plan = backward.plan_backward(case.query_proj, case.key_proj, case.v, grad_scores, deterministic=True,
                                  config=config)
    assert plan.grad_row_keys.shape[0] == 3 and plan.launches[0].arguments["rows_per_split"] == 4  # 4 + 4 + 1
    first = check(case, grad_scores, causal=causal, deterministic=True, config=config)
    second = run_backward(case, grad_scores, causal=causal, deterministic=True, config=config)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check(case, grad_scores, causal=causal, deterministic=False, config=config)


def test_each_split_writes_only_its_own_rows_keys_partial(triton_device):
    case = random_case(1, 7, 6, 4, 2, device=triton_device, seed=49)
    grad_scores = random_grad_scores(1, 7, 6, seed=50, device=triton_device)
    config = BackwardConfig(block_t=1, block_s=4, block_a=4, num_warps=1, num_stages=1, tanh_form="factorized",
                            num_splits=2)
    plan = backward.plan_backward(case.query_proj, case.key_proj, case.v, grad_scores, deterministic=True,
                                  interpret=launcher.is_interpreter(), config=config)
    for launch in plan.launches:
        launch.kernel[launch.grid](**launch.arguments, num_warps=launch.num_warps, num_stages=launch.num_stages)
    rows = torch.arange(7, device=triton_device)[:, None]
    for split, (start, stop) in enumerate(((0, 4), (4, 7))):
        in_split = ((rows >= start) & (rows < stop)).to(grad_scores.dtype)
        _, expected_keys, _ = expected_gradients(case, grad_scores * in_split)
        assert relative_error(plan.grad_row_keys[split], expected_keys) <= gradient_tolerance(torch.float32)


def test_heuristic_splits_query_rows_only_for_small_grids():
    """Small grids (fewer than two programs per SM) split their query rows: at least into two programs per SM, and
    then into the count the whole-GPU model finishes first (kernels/configs.py `_split_steps`: waves x (rows per
    split + SPLIT_OVERHEAD_STEPS)); at most into splits of MIN_ROWS_PER_SPLIT rows."""
    def splits(query_rows, tgt_len, src_len=50, attn_dim=256, sm_count=132):
        return configs.backward_config(query_rows=query_rows, tgt_len=tgt_len, src_len=src_len,
                                       attn_dim=attn_dim, dtype=torch.float32, sm_count=sm_count).num_splits

    assert splits(32, 50) == 3  # 128 programs for 132 SMs: 3 splits of 17 rows (the most 16-row splits)
    assert splits(32, 20) == 1  # too few rows to split
    assert splits(256, 50) == 1  # 1,024 programs already
    # long: 208 programs; 2 splits (the two-per-SM count) give 416 CTAs, 4 waves on 132 SMs of which the last is 15%
    # full (4 x 203 steps); 5 give 1,040 CTAs in 8 nearly full waves (8 x 83 steps). On an A100's 108 SMs 2 splits
    # already fill 4 waves.
    assert splits(8, 400, src_len=400) == 5
    assert splits(8, 400, src_len=400, sm_count=108) == 2
    # 26 programs: 11 splits (286 CTAs, 3 waves of 37 rows) was the two-per-SM count; 15 splits (390 CTAs, still
    # 3 waves) have 27 rows each.
    assert splits(1, 400, src_len=400) == 15
    assert splits(1, 40, src_len=400) == 2  # no split below 16 rows


# ----------------------------------------------------------------------------------------------------------------
# contract


def test_inputs_are_not_modified(triton_device):
    case = random_case(2, 3, 9, 5, 2, beam=2, extra_key_term=True, device=triton_device, seed=33)
    grad_scores = random_grad_scores(4, 3, 9, seed=34, device=triton_device)
    before = [t.clone() for t in (*case.float_tensors().values(), grad_scores, case.index)]
    run_backward(case, grad_scores)
    after = [*case.float_tensors().values(), grad_scores, case.index]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_no_buffer_of_size_b_t_s_a(poisoned_buffers, triton_device):
    batch, tgt_len, src_len, attn_dim = 2, 5, 9, 6
    case = random_case(batch, tgt_len, src_len, attn_dim, 2, device=triton_device, seed=35)
    run_backward(case, random_grad_scores(batch, tgt_len, src_len, seed=36, device=triton_device), deterministic=True)
    assert poisoned_buffers, "the launcher should allocate through launcher.empty_buffer"
    assert max(buffer.numel() for buffer in poisoned_buffers) < batch * tgt_len * src_len * attn_dim


def test_empty_steps_and_keys_give_zero_gradients(triton_device):
    for tgt_len, src_len in ((0, 5), (3, 0)):
        case = random_case(2, max(tgt_len, 1), max(src_len, 1), 4, 2, device=triton_device, seed=37)
        query_proj = case.query_proj[:, :tgt_len]
        key_proj = case.key_proj[:, :src_len]
        grad_scores = torch.zeros(2, tgt_len, src_len, device=triton_device)
        grad_query, grad_row_keys, grad_v = backward.attention_backward_tanh_pass(query_proj, key_proj, case.v,
                                                                                  grad_scores)
        assert grad_query.shape == (2, tgt_len, 4) and grad_row_keys.shape == (2, src_len, 4)
        assert (grad_query == 0).all() and (grad_row_keys == 0).all() and (grad_v == 0).all()


def test_invalid_arguments_are_rejected(triton_device):
    case = random_case(2, 3, 5, 4, 2, device=triton_device, seed=39)
    grad_scores = random_grad_scores(2, 3, 5, device=triton_device)
    with pytest.raises(ValueError, match="grad_scores"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, grad_scores.double())
    with pytest.raises(ValueError, match="grad_scores"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, grad_scores[:, :, :4])
    with pytest.raises(ValueError, match="dtype"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj.half(), case.v, grad_scores)
    with pytest.raises(ValueError, match="index"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, grad_scores,
                                              index=torch.zeros(2, device=triton_device))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(launcher, "is_interpreter", lambda: False)
    case = random_case(1, 2, 3, 4, 2, seed=41, device="cpu")  # CPU on purpose, whatever the Triton device
    with pytest.raises(RuntimeError, match="CUDA"):
        backward.attention_backward_tanh_pass(case.query_proj, case.key_proj, case.v, torch.zeros(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------------
# static report hook


def test_static_report_backward_targets_are_the_default_launches():
    """The static report (benchmarks/static_report.py) plans the backward's default launches on meta tensors, one
    per all-steps shape and dtype, as launches it can compile (kernel, arguments, warps, stages) with the constexpr
    names its hot-loop analysis reads."""
    from benchmarks import static_report

    targets = static_report.backward_compile_targets()
    all_steps = [shape for shape in static_report.SHAPES.values() if shape.tgt_len > 1]
    assert len(targets) == len(all_steps) * len(static_report.DTYPES)
    for use, launch in targets:
        assert use.endswith("/backward")
        assert launch.kernel is backward._attention_backward_kernel
        assert launch.num_warps >= 1 and launch.num_stages >= 1
        arguments = launch.arguments
        assert arguments["query_proj"].device.type == "meta"
        assert arguments["grad_scores"].stride(1) % backward.GRAD_SCORES_ROW_ALIGN == 0
        for name in ("BLOCK_A", "BLOCK_T", "BLOCK_S", "TANH_FORM"):
            assert name in arguments
        assert arguments["BLOCK_A"] * arguments["BLOCK_T"] * arguments["BLOCK_S"] % (32 * launch.num_warps) == 0


# ----------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_benchmark_shapes(dtype, triton_device):
    """The real tanh forms at the default configurations. Besides accuracy, fp16/bf16 here check what only a GPU
    can: with tanh.approx, keys past S in the last tile have t = tanh(inf) = 1, so grad_v must mask them out."""
    from attn_fast.tools.bench.shapes import NAMED_SHAPES

    for shape in NAMED_SHAPES.values():
        if shape.tgt_len == 1:  # decode steps are covered by the small-shape tests
            continue
        causal = shape.name == "long"
        case = random_case(shape.batch, shape.tgt_len, shape.src_len, shape.attn_dim, 2, dtype=dtype,
                           device=triton_device, seed=43)
        grad_scores = random_grad_scores(shape.batch, shape.tgt_len, shape.src_len, causal=causal, seed=44,
                                         device=triton_device)
        check(case, grad_scores, causal=causal)
