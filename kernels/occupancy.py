"""A model of the whole GPU for one tanh-kernel launch: how many CTAs an SM holds, how the grid spreads over the SMs,
and how much of the work it issues is padding. Used by the launch heuristics (kernels/configs.py) to choose tiles and
splits, and by the static report (benchmarks/static_report.py) to turn its per-SM figure into a whole-GPU ceiling:

    whole-GPU ceiling = per-SM fraction of the MUFU limit (issue model of the hot loop) x efficiency
    efficiency        = useful tanh / (sm_count x saturating CTAs x waves x padded tanh per CTA)
                      = fill x padding

- CTAs per SM the resources allow (`resident_ctas`): registers (allocated per warp in units of 256, each of the 4
  sub-partitions holding 16K), warps (64 per SM), shared memory (plus 1 KB reserved per CTA), 32 CTAs at most.
- Saturating CTAs: the per-SM figure is taken to hold once an SM runs SATURATING_WARPS warps (one per scheduler);
  a CTA of fewer warps gets at most its share of the SM (`saturating_ctas`). Latency hiding beyond that (more than
  one warp per scheduler) is not modelled.
- CTAs are dealt evenly over the SMs; the busiest SM holds ceil(CTAs / SMs) of them. While it holds no more than
  its saturating count, every CTA runs at its full share and the time is one CTA's; beyond that the resident CTAs
  share the SM, so the time grows in steps of one CTA (`waves` = max(busiest, saturating) / saturating, a fraction
  when an SM holds more CTAs than fill it), or in whole rounds when fewer CTAs fit than would fill an SM.
- padding: the useful B*T*S*A tanh over what the CTAs issue: whole query tiles (BLOCK_T rows), whole key tiles of
  the longest split (every CTA of a wave waits for the longest), whole A-chunks.
Not modelled: the work outside the hot loop (prologue, epilogue, second kernels; `combine_bytes` estimates the
split partials' traffic), memory bandwidth, clocks, launch latency. Real timings decide on a GPU.
"""
from __future__ import annotations

import dataclasses
import math

from .launch import DEFAULT_SM_COUNT

#: Warps per SM at which the per-SM issue model's figure is taken to hold: one per scheduler (4 per SM).
SATURATING_WARPS = 4


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """Per-SM resources of one GPU generation (CUDA occupancy calculator figures)."""

    name: str
    sm_count: int
    registers_per_sm: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    shared_bytes_per_sm: int = 228 * 1024
    shared_reserved_per_cta: int = 1024


#: H100 SXM (sm_90) and A100 (sm_80): the two targets the static report compiles for.
GPUS = {
    90: GpuLimits("sm_90", DEFAULT_SM_COUNT, shared_bytes_per_sm=228 * 1024),
    80: GpuLimits("sm_80", 108, shared_bytes_per_sm=164 * 1024),
}


def resident_ctas(registers: int, num_warps: int, shared_bytes: int, gpu: GpuLimits = GPUS[90]) -> int:
    """CTAs of a compiled kernel one SM holds at once: the least of what registers, warps, shared memory and the
    CTA limit allow (0 if one CTA does not fit)."""
    per_warp = math.ceil(max(registers, 1) * 32 / gpu.register_unit) * gpu.register_unit
    warps_by_registers = 4 * ((gpu.registers_per_sm // 4) // per_warp)  # 4 sub-partitions, a warp lives in one
    by_registers = warps_by_registers // num_warps
    by_warps = gpu.max_warps_per_sm // num_warps
    by_shared = gpu.shared_bytes_per_sm // (shared_bytes + gpu.shared_reserved_per_cta)
    return min(by_registers, by_warps, by_shared, gpu.max_ctas_per_sm)


def saturating_ctas(num_warps: int) -> int:
    """CTAs of `num_warps` warps an SM needs for the per-SM figure to hold (SATURATING_WARPS warps)."""
    return max(1, -(-SATURATING_WARPS // num_warps))


@dataclasses.dataclass(frozen=True)
class GridModel:
    ctas: int
    resident: int  # CTAs per SM the resources allow
    saturating: int  # CTAs per SM that fill it
    busiest_sm: int  # CTAs on the busiest SM
    waves: float  # time in units of one CTA running at its full share of an SM
    fill: float  # CTAs / (SMs x saturating x waves)
    padding: float  # useful tanh / tanh the CTAs issue
    efficiency: float  # fill x padding

    def as_dict(self) -> dict:
        return {name: round(value, 4) if isinstance(value, float) else value
                for name, value in dataclasses.asdict(self).items()}


def grid_model(ctas: int, work_per_cta: int, useful_work: int, num_warps: int, resident: int | None = None,
               sm_count: int = DEFAULT_SM_COUNT) -> GridModel:
    """The whole-GPU efficiency of `ctas` equal CTAs of `work_per_cta` padded tanh each, `useful_work` of which are
    needed in all. `resident`: CTAs per SM from the compiled kernel's resources (`resident_ctas`); None takes the
    saturating count (what the launch heuristics assume before anything is compiled)."""
    saturating = saturating_ctas(num_warps)
    resident = saturating if resident is None else resident
    if ctas <= 0 or resident <= 0:
        return GridModel(ctas, resident, saturating, 0, 0.0, 0.0, 0.0, 0.0)
    busiest = -(-ctas // sm_count)
    if resident >= saturating:
        waves = max(busiest, saturating) / saturating
    else:  # an SM never fills: rounds of `resident` CTAs, each at its share
        waves = float(-(-busiest // resident))
    fill = ctas / (sm_count * saturating * waves)
    padding = useful_work / (ctas * work_per_cta)
    return GridModel(ctas, resident, saturating, busiest, waves, fill, padding, fill * padding)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_grid(*, query_rows: int, tgt_len: int, src_len: int, attn_dim: int, block_t: int, block_s: int,
                 block_a: int, num_splits: int) -> tuple[int, int, int]:
    """(CTAs, padded tanh per CTA, splits) of `_attention_forward_kernel`, with kernels/forward.py `plan_forward`'s
    split arithmetic: each split covers whole key tiles, empty splits are dropped."""
    key_tiles = cdiv(max(src_len, 1), block_s)
    tiles_per_split = cdiv(key_tiles, max(1, num_splits))
    splits = cdiv(key_tiles, tiles_per_split)
    ctas = query_rows * cdiv(tgt_len, block_t) * splits
    return ctas, block_t * tiles_per_split * block_s * cdiv(attn_dim, block_a) * block_a, splits


def backward_grid(*, query_rows: int, tgt_len: int, src_len: int, attn_dim: int, block_t: int, block_s: int,
                  block_a: int, num_splits: int) -> tuple[int, int, int]:
    """(CTAs, padded tanh per CTA, splits) of `_attention_backward_kernel`, with kernels/backward.py
    `plan_backward`'s arithmetic: each split covers whole query steps, empty splits are dropped."""
    rows_per_split = cdiv(cdiv(max(tgt_len, 1), max(1, num_splits)), block_t) * block_t
    splits = max(1, cdiv(tgt_len, rows_per_split))
    ctas = query_rows * splits * cdiv(src_len, block_s) * cdiv(attn_dim, block_a)
    return ctas, rows_per_split * block_s * block_a, splits


def combine_bytes(*, query_rows: int, tgt_len: int, value_dim: int, splits: int, fuse_context: bool) -> int:
    """Bytes the key splits add to the forward (written, then read by the combine pass): per split and row the fp32
    max and sum, and with the fused context its unnormalized fp32 [D] partial. 0 without splits."""
    if splits <= 1:
        return 0
    per_row = 8 + (4 * value_dim if fuse_context else 0)
    return 2 * splits * query_rows * tgt_len * per_row
