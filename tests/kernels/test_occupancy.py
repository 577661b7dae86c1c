"""The whole-GPU model (kernels/occupancy.py) and the launch heuristics that use it (kernels/configs.py): CTAs per SM
from registers, warps and shared memory; waves, fill and padding; the planners' grids as the model counts them;
whole waves at the named shapes; the cap on key splits per combine pass. Pure arithmetic and meta-tensor plans: no
kernel runs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from attn_fast.kernels import configs, occupancy  # noqa: E402
from attn_fast.kernels.backward import grad_scores_buffer, plan_backward  # noqa: E402
from attn_fast.kernels.forward import plan_forward  # noqa: E402
from attn_fast.tools.bench.shapes import NAMED_SHAPES  # noqa: E402
from attn_fast.validation import attention_call  # noqa: E402

H100, A100 = occupancy.GPUS[90], occupancy.GPUS[80]


def meta(dtype, *sizes):
    return torch.empty(*sizes, device="meta", dtype=dtype)


def test_resident_ctas_from_registers_warps_and_shared_memory():
    assert occupancy.resident_ctas(255, 4, 4096, H100) == 2  # the backward: 8 warps of 256 registers
    assert occupancy.resident_ctas(170, 8, 1024, H100) == 1
    assert occupancy.resident_ctas(168, 4, 1024, H100) == 3  # 168 x 32 per warp: 3 warps per 16K sub-partition
    assert occupancy.resident_ctas(32, 1, 0, H100) == 32  # the CTA limit
    assert occupancy.resident_ctas(64, 4, 100 * 1024, H100) == 2  # shared memory (plus 1 KB reserved each)
    assert occupancy.resident_ctas(64, 4, 100 * 1024, A100) == 1


def test_grid_model_counts_idle_sms_partial_waves_and_padding():
    # The forward at nmt_train before issue 12: 32 CTAs of 8 warps, 64 x 64 padded tiles for 50 x 50.
    model = occupancy.grid_model(32, 64 * 64 * 256, 32 * 50 * 50 * 256, 8, resident=1)
    assert model.waves == 1 and model.fill == pytest.approx(32 / 132)
    assert model.padding == pytest.approx(2500 / 4096)
    assert model.efficiency == pytest.approx(32 / 132 * 2500 / 4096)
    # 133 one-SM CTAs: a second wave for one of them.
    assert occupancy.grid_model(133, 1, 133, 4).waves == 2
    # 2-warp CTAs: two fill an SM; three on the busiest SM share it (1.5 waves).
    two_warp = occupancy.grid_model(3 * 132, 1, 3 * 132, 2, resident=4)
    assert two_warp.saturating == 2 and two_warp.waves == 1.5 and two_warp.fill == 1.0
    # Fewer resident than fill an SM: rounds.
    assert occupancy.grid_model(264, 1, 264, 1, resident=2).waves == 1.0
    assert occupancy.grid_model(0, 1, 0, 4).efficiency == 0.0


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("sizes", [(32, 50, 50, 256, 512), (32, 1, 200, 128, 512), (32, 20, 196, 512, 2048),
                                   (8, 400, 400, 256, 256), (1, 1, 8192, 256, 128), (3, 37, 101, 24, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_grid_is_the_planners_grid(sizes, dtype, need_weights):
    batch, tgt_len, src_len, attn_dim, value_dim = sizes
    plan = plan_forward(attention_call(meta(dtype, batch, tgt_len, attn_dim), meta(dtype, batch, src_len, attn_dim),
                                       meta(dtype, batch, src_len, value_dim), meta(dtype, attn_dim),
                                       need_weights=need_weights))
    config = plan.config
    # The plain score kernel, or (fp32 caption: prepared keys) the prepared one: the same grid arithmetic.
    score = next(launch for launch in plan.launches
                 if launch.kernel.__name__ in ("_attention_forward_kernel", "_attention_forward_prepared_kernel"))
    ctas, work, splits = occupancy.forward_grid(query_rows=batch, tgt_len=tgt_len, src_len=src_len,
                                                attn_dim=attn_dim, block_t=config.block_t, block_s=config.block_s,
                                                block_a=config.block_a, num_splits=config.num_splits)
    assert ctas == score.grid[0] * score.grid[1] and splits == score.grid[1]
    assert work == config.block_t * score.arguments["keys_per_split"] * (-(-attn_dim // config.block_a)
                                                                          * config.block_a)
    assert splits <= configs.MAX_COMBINE_SPLITS


@pytest.mark.parametrize("sizes", [(32, 50, 50, 256), (8, 400, 400, 256), (1, 400, 400, 256), (5, 7, 13, 17)])
def test_backward_grid_is_the_planners_grid(sizes):
    batch, tgt_len, src_len, attn_dim = sizes
    plan = plan_backward(meta(torch.float32, batch, tgt_len, attn_dim), meta(torch.float32, batch, src_len, attn_dim),
                         meta(torch.float32, attn_dim), grad_scores_buffer(batch, tgt_len, src_len, "meta"))
    config = plan.config
    ctas, work, splits = occupancy.backward_grid(query_rows=batch, tgt_len=tgt_len, src_len=src_len,
                                                 attn_dim=attn_dim, block_t=config.block_t, block_s=config.block_s,
                                                 block_a=config.block_a, num_splits=config.num_splits)
    (launch,) = plan.launches
    assert ctas == launch.grid[0] and splits == launch.arguments["num_splits"]
    assert work == launch.arguments["rows_per_split"] * config.block_s * config.block_a


def modelled_ceiling(shape, dtype, need_weights=False):
    batch, tgt_len, src_len, attn_dim, value_dim = shape.sizes
    config = configs.forward_config(query_rows=batch, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim,
                                    value_dim=value_dim, dtype=dtype, need_weights=need_weights)
    ctas, work, _ = occupancy.forward_grid(query_rows=batch, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim,
                                           block_t=config.block_t, block_s=config.block_s, block_a=config.block_a,
                                           num_splits=config.num_splits)
    model = occupancy.grid_model(ctas, work, batch * tgt_len * src_len * attn_dim, config.num_warps)
    return configs.per_sm_estimate(config.tanh_form, config.block_t, config.block_s) * model.efficiency


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_heuristic_fills_the_gpu_at_the_named_shapes(dtype):
    """The heuristic's own estimate (before compiling; the static report checks the compiled figures): issue 12's
    targets at long (>= 80% of the MUFU limit) and caption (>= 60%, fp16/bf16: fp32 keeps 16+-row tiles, whose
    20 -> 32 padded query rows cap it near 44%), and nmt_train 4x what one CTA per batch row gave (14%)."""
    assert modelled_ceiling(NAMED_SHAPES["long"], dtype) >= 0.80
    assert modelled_ceiling(NAMED_SHAPES["nmt_train"], dtype) >= 0.55
    assert modelled_ceiling(NAMED_SHAPES["caption"], dtype) >= (0.43 if dtype == torch.float32 else 0.60)


def test_key_splits_per_combine_pass_are_capped():
    config = configs.forward_config(query_rows=1, tgt_len=1, src_len=65536, attn_dim=256, value_dim=128,
                                    dtype=torch.float16, need_weights=False)
    assert 1 < config.num_splits <= configs.MAX_COMBINE_SPLITS
    # An explicit override above the cap gets longer splits, not a combine pass that spills.
    plan = plan_forward(attention_call(meta(torch.float16, 1, 1, 256), meta(torch.float16, 1, 8192, 256),
                                       meta(torch.float16, 1, 8192, 128), meta(torch.float16, 256)), num_splits=128)
    assert plan.launches[1].grid[1] <= configs.MAX_COMBINE_SPLITS
    combine = next(launch for launch in plan.launches if launch.kernel.__name__ == "_combine_splits_kernel")
    assert combine.arguments["BLOCK_SPLITS"] <= configs.MAX_COMBINE_SPLITS


def test_small_batches_split_keys_even_with_few_key_tiles():
    """Key splits with 1-2 key tiles are allowed now (issue 12: only >= 4 were)."""
    config = configs.forward_config(query_rows=32, tgt_len=50, src_len=50, attn_dim=256, value_dim=512,
                                    dtype=torch.float32, need_weights=False)
    assert config.num_splits == 2 and -(-50 // config.block_s) == 2


TILES = ([(tile, True, 40) for tile in configs.ALL_STEPS_TILES]
         + [(tile, False, 40) for tile in configs.ALL_STEPS_TILES + configs.ALL_STEPS_TILES_HALF_SCORES]
         + [(tile, True, 200) for tile in configs.ALL_STEPS_TILES_WIDE])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("tile", "fuse_context", "value_dim"), TILES, ids=lambda value: str(value))
def test_every_candidate_tile_is_correct(triton_device, tile, fuse_context, value_dim, num_splits):
    """Each tile the heuristic may pick, fused or scores mode as it may pick it, with and without key splits: the
    kernels' context and weights against the float64 reference (interpreter on CPU)."""
    from attn_fast.functional import additive_attention_reference
    from attn_fast.kernels.forward import attention_forward
    from attn_fast.tolerances import forward_tolerance
    from attn_fast.tools.testing import random_case, relative_error

    block_t, block_s, block_a, num_warps = tile
    dtype = torch.float32
    case = random_case(2, 19, 70, 24, value_dim, mask="lengths", seed=7, device=triton_device).cast(dtype)
    config = configs.ForwardConfig(block_t=block_t, block_s=block_s, block_a=block_a, block_d=max(16, 1 << (
        value_dim - 1).bit_length()), num_warps=num_warps, num_stages=1, tanh_form="factorized",
        num_splits=num_splits, fuse_context=fuse_context)
    call = attention_call(*case.inputs(), **case.options(), need_weights=not fuse_context)
    context, _, weights = attention_forward(call, config=config)
    case64 = case.cast(torch.float64)
    expected_context, expected_weights = additive_attention_reference(*case64.inputs(), **case64.options(),
                                                                      need_weights=True)
    assert relative_error(context, expected_context) <= forward_tolerance(dtype)
    if not fuse_context:
        assert relative_error(weights, expected_weights) <= forward_tolerance(dtype)
