"""Launch configurations of the forward and backward kernels: small, readable, reproducible heuristics (no
autotuning). Each choice below was made on offline sm_90 compiles read with the issue model of docs/DESIGN.md
("Performance you can check without a GPU"); the measured figures behind them are in benchmarks/NOTES.md
("Static figures behind the kernel configurations") and benchmarks/results/static_sm90.json, not here.

Forward (`forward_config`):
- The score loop works on an A-major tile [BLOCK_A, BLOCK_T, BLOCK_S] per A-chunk with 64 tanh per thread:
  64 x 32 x 8 with 8 warps, 32 x 32 x 8 with 4, 16 x 32 x 8 with 2, and for fp16/bf16 scores mode 8 x 32 x 8 with
  1 (ALL_STEPS_TILES*). With D = 256 fused, the fp32 [BLOCK_T, BLOCK_D] accumulator needs more registers: 32 x 32 x 16
  with 8 warps or 16 x 32 x 8 with 2.
- Which tile, how many key splits, and fused context or scores mode: the least modelled time (`_modelled_seconds`):
  the tanh work at the tile's per-SM estimate times the whole-GPU efficiency of its grid (kernels/occupancy.py:
  waves of CTAs over the SMs, query rows padded to whole tiles, keys padded to whole tiles of the longest split),
  plus the bytes the split partials and scores mode move. So a small batch takes smaller query tiles and key
  splits (any number of key tiles per split, at most MAX_COMBINE_SPLITS splits) until the grid fills whole waves,
  and T is covered by the tile size that pads it least.
- fp32 all-steps calls of at least PREPARE_KEYS_MIN_TANH tanh without an extra key term also weigh prepared keys
  (PREPARED_TILES): a pre-pass writes e^{2k} once per key (in the launch that does the v pre-pass anyway), the
  score loop loads both factors, 1 MUFU op per tanh at any tile; the model adds the pre-pass's bytes. Caption
  (T = 20) takes it with 8-row tiles; nmt_train and long keep computing the exponentials per tile.
- Single-step decoding (T small) cannot share a key across query rows, so the tile is long in S instead:
  [16, 1, 128] (scores only) or [16, 1, 64] (fused: the [BLOCK_S, BLOCK_D] value tile sits in registers too, so
  D <= 128 there). fp32 decoding uses the exp tanh (the factorized one saves nothing with one row when it must
  compute e^{2k} itself), or the factorized tanh when the call brings the memory's prepared e^{2k}.
- The P @ value product uses tl.dot (tensor cores). Larger value dims (and calls that return the weights) store
  the raw scores instead and compute weights and context in a second, tanh-free kernel tiled over D.
- NUM_STAGES is 1: pipelining the A-chunk loads raised the instruction count without saving registers; loads come
  from L1/L2 (each key chunk is reused by BLOCK_T query rows).

Backward tanh pass (`backward_config`, kernels/backward.py): program = (query row b, key tile of BLOCK_S keys,
A-chunk of BLOCK_A units); it walks the query rows BLOCK_T at a time and evaluates a key-major
[BLOCK_S, BLOCK_T, BLOCK_A] tile per step. Triton lays such a tile out with the lanes and warps along A (the last,
fastest dim) and the keys in each thread's registers, so that
- the sum over keys for grad_query_proj stays inside each thread (no SHFL, no shared memory),
- the grad_row_keys / grad_v accumulators [BLOCK_S, BLOCK_A] are elementwise per thread,
- a thread's dE values for one query row are contiguous: 128-bit loads, 1/4 load per element.
- BLOCK_A = 32 * num_warps: one attention unit per thread; 32 keys x 1 query row per step (more keys spill, fewer
  amortize the per-step work worse, two query rows per step break the 128-bit dE loads, and the forward's A-major
  orientation would move the per-row sum over keys across lanes).
- 4 warps (BLOCK_A = 128) when A >= 128; fewer for small A, so that no lane idles. Short sources: BLOCK_S = the
  next power of two of S (at least 4), 32 at most.
- Query-row splits: while B_q x key tiles x A-chunks gives fewer than two programs per SM, the query rows are split
  across programs too (at least MIN_ROWS_PER_SPLIT rows each): with one program per SM, nothing hides the latency
  of a step's loads. How many: at least two programs per SM, and then the count the whole-GPU model of
  kernels/occupancy.py finishes first, charging each program SPLIT_OVERHEAD_STEPS query steps for its work outside
  the loop (long, H100: 5 splits, 1,040 CTAs, instead of 2 and 416 CTAs in 4 waves of which the last is 15% full).
- fp32 uses the factorized tanh (1 MUFU.RCP per element, fp32-accurate; e^{2q} once per query row and e^{2k} once
  per program), falling back to the exp form (2 MUFU ops) for a program whose |q| or |k| exceeds the factorized
  limit, and taking the exp form outright below FACTORIZED_MIN_ROWS query rows. fp16/bf16 use tanh.approx.f32.
"""
from __future__ import annotations

import dataclasses

import torch

from . import occupancy
from .launch import DEFAULT_SM_COUNT

#: Largest power-of-two padded value dim whose [BLOCK_T, BLOCK_D] fp32 accumulator stays in registers
#: (BLOCK_T >= 16), and for decoding, where the [BLOCK_S, BLOCK_D] value tile is the larger one.
MAX_FUSED_VALUE_DIM = 256
MAX_FUSED_VALUE_DIM_DECODE = 128
#: Query steps (T) up to which a call is tiled like single-step decoding (few query rows per program).
DECODE_MAX_TGT_LEN = 8


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Everything the forward launcher needs to know besides the tensors."""

    block_t: int  # query rows per program
    block_s: int  # keys per inner-loop tile
    block_a: int  # attention-dim chunk of the A-major tanh tile
    block_d: int  # value dim, padded to a power of two (one tile in the fused kernel)
    num_warps: int
    num_stages: int  # software-pipelining depth of the A-chunk loop (query/key projection loads)
    tanh_form: str  # see kernels/tanh.py
    num_splits: int  # key ranges processed by separate programs, combined afterwards (1 = no split)
    fuse_context: bool  # True: online softmax + P @ value in the score kernel; False: scores, then a second kernel
    prepare_keys: bool = False  # fp32 all-steps: e^{2k} by a key pre-pass, loaded by the score loop (PREPARED_TILES)


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Configuration of the tanh-free kernel that turns stored scores into weights and context."""

    block_t: int
    block_s: int
    block_d: int
    num_warps: int
    num_stages: int  # Triton's software pipelining of the key loop (cp.async prefetch of scores and value)


def default_tanh_form(dtype: torch.dtype, block_t: int, has_key_exp: bool = False) -> str:
    """fp32 needs an fp32-accurate tanh (tolerance 1e-5): the factorized form costs 1 MUFU op per element when a
    tile has many query rows to share the per-row exponentials, or when the call brings the keys' e^{2k} prepared
    with a decoding memory (`has_key_exp`: the kernel loads them instead of computing them), and the exp form
    otherwise (decoding without prepared keys). fp16/bf16 tolerate tanh.approx (max relative error 2^-11), 1 MUFU
    op per element."""
    if dtype == torch.float32:
        return "factorized" if block_t >= 16 or has_key_exp else "exp"
    return "approx"


#: Most key splits one combine pass merges: `_combine_splits_kernel` holds a [splits, BLOCK_D] fp32 tile in
#: registers, which spills beyond 32-64 splits (B = 1, long S); more key tiles than this make longer splits.
MAX_COMBINE_SPLITS = 32

#: All-steps tiles (BLOCK_T, BLOCK_S, BLOCK_A, warps), 64 tanh per thread per A-chunk each, that compile to
#: <= 4.5 instructions per tanh on sm_90; `forward_config` picks among them with the whole-GPU model of
#: kernels/occupancy.py. The 8-row tile only for fp16/bf16 scores mode (fp32 pays 1.16 MUFU ops and ~5.2
#: instructions per tanh there; fused, its [8, BLOCK_D] tl.dot is too small).
ALL_STEPS_TILES = ((64, 32, 8, 8), (32, 32, 8, 4), (16, 32, 8, 2))
ALL_STEPS_TILES_HALF_SCORES = ((8, 32, 8, 1),)
#: With a [BLOCK_T, 256] fp32 accumulator (fused, 128 < D <= 256): no 64-row tile.
ALL_STEPS_TILES_WIDE = ((32, 32, 16, 8), (16, 32, 8, 2))
#: fp32 all-steps tiles with prepared keys (`ForwardConfig.prepare_keys`): a pre-pass kernel writes e^{2k} once per
#: key, each program writes its rows' c e^{2q} once, and the score loop loads both factors: 1 MUFU op per tanh at
#: any tile (3.75-4.25 instructions per tanh on sm_90, against 1 + (BT + BS) / (BT BS) MUFU ops computing them in
#: every tile), so 8-row tiles pad T less at no MUFU cost (caption, T = 20: 24 rows instead of 32). Scores mode:
#: the 8-row tiles too; fused: 32 rows only (the 64-row fused tile keeps 8 B of stack on sm_80, and fused fp32
#: never takes 2 warps, see `forward_config`). 4-row tiles compile to 4.6-4.8 instructions per tanh, and the 8-row
#: 1-warp tile (4.25) keeps 8 B of stack on sm_90 with the key range check and splits: left out.
PREPARED_TILES = ((64, 32, 8, 8), (32, 32, 8, 4), (16, 32, 8, 2), (8, 64, 8, 2))
PREPARED_TILES_FUSED = ((32, 32, 8, 4),)
#: Least tanh work (B*T*S*A) for which prepared keys are considered: below it a call does not fill the GPU for long
#: (2^25 tanh are ~8 us at the MUFU limit of an H100), the model's throughput terms decide nothing, and the plain
#: kernel spares the pre-pass's B_m x S x A fp32 buffer.
PREPARE_KEYS_MIN_TANH = 1 << 25
#: The costs `_modelled_seconds` weighs against the tanh work (H100 SXM): HBM bytes per second, 16 tanh/clk per SM
#: at 1.98 GHz, and a few microseconds for the second kernel of scores mode (the launch the fused path saves).
HBM_BYTES_PER_S = 3.35e12
MUFU_PER_S_PER_SM = 16 * 1.98e9
LAUNCH_SECONDS = 4e-6


def per_sm_estimate(tanh_form: str, block_t: int, block_s: int, prepare_keys: bool = False) -> float:
    """The per-SM fraction of 16 tanh/clk the issue model predicts for a tile before it is compiled: 1 / (MUFU ops
    per tanh), the candidate tiles being within 8 instructions per MUFU op (the static report checks). With prepared
    keys the factorized form's exponentials are outside the score loop: 1 MUFU op per tanh."""
    if tanh_form == "factorized" and prepare_keys:
        return 1.0
    if tanh_form == "factorized":
        return 1.0 / (1.0 + (block_t + block_s) / (block_t * block_s))
    return 0.5 if tanh_form in ("exp", "libdevice") else 1.0


def _modelled_seconds(config: ForwardConfig, *, query_rows, tgt_len, src_len, attn_dim, value_dim,
                      sm_count, memory_rows=None) -> float:
    """Modelled time of a forward configuration: the tanh work at per-SM estimate x whole-GPU efficiency, plus the
    bytes of the split partials (written, then read by the combine pass) and of scores mode (scores written and
    re-read) and scores mode's second launch; with prepared keys (fp32 only), the key pre-pass (fp32 key_proj read,
    e^{2k} and max |k| written; no launch of its own: it carries the v pre-pass every call launches)
    and the programs' c e^{2q} rows (written once; re-read from L2). The combine pass's launch is left out on
    purpose: small batches (decode steps) split whenever that spreads the tanh work over more SMs, latency-bound as
    they are anyway."""
    ctas, work, splits = occupancy.forward_grid(
        query_rows=query_rows, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim, block_t=config.block_t,
        block_s=config.block_s, block_a=config.block_a, num_splits=config.num_splits)
    useful = query_rows * tgt_len * max(src_len, 1) * attn_dim
    model = occupancy.grid_model(ctas, work, useful, config.num_warps, sm_count=sm_count)
    ceiling = (per_sm_estimate(config.tanh_form, config.block_t, config.block_s, config.prepare_keys)
               * model.efficiency)
    traffic = occupancy.combine_bytes(query_rows=query_rows, tgt_len=tgt_len, value_dim=value_dim, splits=splits,
                                      fuse_context=config.fuse_context)
    launches = 0
    if not config.fuse_context:
        traffic += 2 * 4 * query_rows * tgt_len * src_len
        launches += 1
    if config.prepare_keys:
        keys = (query_rows if memory_rows is None else memory_rows) * src_len
        a_padded = -(-attn_dim // config.block_a) * config.block_a
        traffic += keys * attn_dim * (4 + 4) + keys * 4 + splits * query_rows * tgt_len * a_padded * 4
    return useful / (MUFU_PER_S_PER_SM * sm_count * ceiling) + traffic / HBM_BYTES_PER_S + launches * LAUNCH_SECONDS


def forward_config(
    *,
    query_rows: int,
    tgt_len: int,
    src_len: int,
    attn_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    need_weights: bool,
    sm_count: int = DEFAULT_SM_COUNT,
    tanh_form: str | None = None,
    num_splits: int | None = None,
    has_key_exp: bool = False,
    can_prepare_keys: bool = False,
    memory_rows: int | None = None,
    prepare_keys: bool | None = None,
) -> ForwardConfig:
    """The configuration for one call. `tanh_form` and `num_splits` override the heuristic (tests, benchmarks).
    `has_key_exp`: the call brings the memory's prepared e^{2 key_proj} (fp32 decode then takes the factorized
    form, `default_tanh_form`). `can_prepare_keys`: an fp32 all-steps call whose keys a pre-pass may turn into
    e^{2k} (no extra key term), which adds the PREPARED_TILES candidates from PREPARE_KEYS_MIN_TANH tanh on;
    `memory_rows` (B_m, default B_q) sizes that pre-pass in the model. `prepare_keys` overrides the choice
    (benchmarks): True keeps only the prepared-keys candidates (a ValueError where the call cannot take them), False
    none of them.

    Candidates: fused context (when the weights are not asked for and the value dim fits, see the module
    docstring) and scores mode, each with its tiles (decoding: its one decode tile) and every key split count
    from 1 to the key tiles (at most MAX_COMBINE_SPLITS). Chosen: the least `_modelled_seconds` (kernels/occupancy.py
    for waves over sm_count SMs and padded rows and key tiles); within 1% of it, the fewest splits, then the least
    padded work, then the most query rows per tile."""
    block_d = max(16, next_power_of_2(value_dim))
    attn_pow2 = next_power_of_2(attn_dim)
    num_stages = 1  # see the module docstring
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    modes = []  # (fuse_context, tiles, prepare_keys)
    if tgt_len <= DECODE_MAX_TGT_LEN:
        # Decoding: few query rows share each key, so the tile is long in S instead: [16, 1, 128] for T = 1.
        # Fused, the [BLOCK_S, BLOCK_D] value tile must fit in registers too: half the keys, D <= 128.
        block_t = next_power_of_2(tgt_len)
        block_a = min(attn_pow2, max(2, 16 // block_t))
        if not need_weights and block_d <= MAX_FUSED_VALUE_DIM_DECODE:
            modes.append((True, [(block_t, 64, block_a, 4)], False))
        modes.append((False, [(block_t, 128, block_a, 4)], False))
        form = tanh_form or default_tanh_form(dtype, block_t, has_key_exp)
    else:
        if not need_weights and block_d <= MAX_FUSED_VALUE_DIM:
            fused_tiles = ALL_STEPS_TILES_WIDE if block_d > 128 else ALL_STEPS_TILES
            if dtype == torch.float32:  # fp32 accumulators: the 2-warp tile reaches 255 registers (sm_80 spills)
                fused_tiles = tuple(tile for tile in fused_tiles if tile[3] > 2)
            modes.append((True, fused_tiles, False))
        modes.append((False, ALL_STEPS_TILES + (ALL_STEPS_TILES_HALF_SCORES if dtype != torch.float32 else ()),
                      False))
        # All-steps tiles share their query rows' exponentials: fp32 takes the factorized form at any BLOCK_T.
        form = tanh_form or default_tanh_form(dtype, 16)
        preparable = can_prepare_keys and not has_key_exp and dtype == torch.float32 and form == "factorized"
        large = query_rows * tgt_len * src_len * attn_dim >= PREPARE_KEYS_MIN_TANH
        if preparable and (prepare_keys or (prepare_keys is None and large)):
            if prepare_keys:
                modes = []
            if not need_weights and block_d <= 128:
                modes.append((True, PREPARED_TILES_FUSED, True))
            modes.append((False, PREPARED_TILES, True))
    if prepare_keys and not any(prepared for _, _, prepared in modes):
        raise ValueError("prepare_keys=True needs an fp32 all-steps call in the factorized form without an extra key "
                         "term or a memory's key_exp")

    candidates = []  # (modelled seconds, padded work, config)
    for fuse_context, tiles, prepare_keys in modes:
        for block_t, block_s, block_a, num_warps in tiles:
            key_tiles = -(-max(src_len, 1) // block_s)
            if num_splits is not None:
                split_choices = [num_splits]
            else:  # only split counts the launcher keeps as they are (whole key tiles per split, none empty)
                split_choices = [k for k in range(1, min(key_tiles, MAX_COMBINE_SPLITS) + 1)
                                 if -(-key_tiles // -(-key_tiles // k)) == k]
            for splits in split_choices:
                config = ForwardConfig(
                    block_t=block_t, block_s=block_s, block_a=min(attn_pow2, block_a), block_d=block_d,
                    num_warps=num_warps, num_stages=num_stages, tanh_form=form, num_splits=splits,
                    fuse_context=fuse_context, prepare_keys=prepare_keys)
                if query_rows * tgt_len == 0:
                    return config
                seconds = _modelled_seconds(config, query_rows=query_rows, tgt_len=tgt_len, src_len=src_len,
                                            attn_dim=attn_dim, value_dim=value_dim, sm_count=sm_count,
                                            memory_rows=memory_rows)
                ctas, work, _ = occupancy.forward_grid(
                    query_rows=query_rows, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim, block_t=block_t,
                    block_s=block_s, block_a=config.block_a, num_splits=splits)
                candidates.append((seconds, ctas * work, config))
    cutoff = min(seconds for seconds, _, _ in candidates) * 1.01
    return min(((padded, config) for seconds, padded, config in candidates if seconds <= cutoff),
               key=lambda item: (item[1].num_splits, item[0], -item[1].block_t))[1]


def context_config(*, tgt_len: int, value_dim: int, need_weights: bool = False,
                   dtype: torch.dtype = torch.float32) -> ContextConfig:
    """Scores -> weights and context: tensor-core tiles, D split across programs in chunks of <= 64. No tanh here,
    so loads are the cost: 2 pipeline stages (3 left a spilled register around the loop at BT = 32). These
    tiles compile without spills on sm_90 and sm_80 (64 x 64 x 128 with 4 warps spilled ~1 KB with need_weights;
    the 64-row, 8-warp tile spills 152 B on sm_80 in fp32 with need_weights, so that case takes 32 rows)."""
    block_t = min(64, next_power_of_2(tgt_len))
    if need_weights and dtype == torch.float32:
        block_t = min(block_t, 32)
    return ContextConfig(
        block_t=block_t,
        block_s=32,
        block_d=min(64, max(16, next_power_of_2(value_dim))),
        num_warps=8 if block_t == 64 else 4,
        num_stages=2,
    )


#: tanh forms the backward supports (kernels/tanh.py names). "libdevice" is left out: 2 MUFU ops, no gain.
BACKWARD_TANH_FORMS = ("factorized", "exp", "approx")


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Everything the backward launcher needs besides the tensors."""

    block_t: int  # query rows per step of the program's loop
    block_s: int  # keys per program (the key tile)
    block_a: int  # attention units per program (the A-chunk)
    num_warps: int
    num_stages: int  # software pipelining of loops Triton pipelines by itself (the query loop is not one of them)
    tanh_form: str  # "factorized" (fp32), "exp", "approx" (fp16/bf16)
    num_splits: int = 1  # query rows split across this many programs (grad_row_keys then added, not stored)


#: Fewest query rows a split of the query rows keeps: a program pays its key chunk, e^{2k} and the grad_row_keys
#: atomics once per split, which 16 query steps amortize well.
MIN_ROWS_PER_SPLIT = 16
#: What a program does outside its query loop (key chunk, e^{2k}, the loop set-up, the grad_row_keys and grad_v
#: writes), in query steps: ~700 instructions per thread against ~245 per step of the sm_90 fp32 loop, plus the
#: latency of its first loads. The price of one more split in `_split_steps`.
SPLIT_OVERHEAD_STEPS = 3

#: Fewest query rows for which fp32 takes the factorized form: a program pays one accurate e^{2k} (an EX2 and ~6
#: FMA-pipe instructions) per key it owns and saves one EX2 per element, i.e. per key and query row.
FACTORIZED_MIN_ROWS = 4


def default_backward_tanh_form(dtype: torch.dtype, tgt_len: int) -> str:
    """fp32 needs an fp32-accurate tanh (gradient tolerance 5e-5): the factorized form (1 MUFU op per element)
    once there are enough query rows to pay for the per-key exponentials, else the exp form (2 MUFU ops).
    fp16/bf16 tolerate tanh.approx (max relative error 2^-11): 1 MUFU op per element."""
    if dtype == torch.float32:
        return "factorized" if tgt_len >= FACTORIZED_MIN_ROWS else "exp"
    return "approx"


def _split_steps(*, splits: int, query_rows: int, tgt_len: int, src_len: int, attn_dim: int, block_s: int,
                 block_a: int, sm_count: int) -> float:
    """Modelled time of the backward with `splits` query-row splits, in query steps of one program at its full share
    of an SM: the waves of the grid (kernels/occupancy.py) x (rows per split + SPLIT_OVERHEAD_STEPS)."""
    ctas, work, _ = occupancy.backward_grid(query_rows=query_rows, tgt_len=tgt_len, src_len=src_len,
                                            attn_dim=attn_dim, block_t=1, block_s=block_s, block_a=block_a,
                                            num_splits=splits)
    model = occupancy.grid_model(ctas, work, query_rows * tgt_len * src_len * attn_dim, max(1, block_a // 32),
                                 sm_count=sm_count)
    return model.waves * (work // (block_s * block_a) + SPLIT_OVERHEAD_STEPS)


def backward_config(*, query_rows: int, tgt_len: int, src_len: int, attn_dim: int, dtype: torch.dtype,
                    sm_count: int = DEFAULT_SM_COUNT, tanh_form: str | None = None,
                    num_splits: int | None = None) -> BackwardConfig:
    """The configuration for one call; `tanh_form` and `num_splits` override the heuristic (tests, benchmarks).

    The query rows are walked in a loop, so their number changes the work per program, not the tile. When the
    (row, key tile, A-chunk) programs cannot give every SM two of them, the query rows are split across programs
    as well (at least MIN_ROWS_PER_SPLIT rows each): with one 4-warp program per SM, nothing hides the latency of
    each step's loads. From the count that gives two per SM up to that cap, the split count is the one the whole-GPU
    model finishes first (`_split_steps`; the fewest on a tie)."""
    if tanh_form is not None and tanh_form not in BACKWARD_TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {BACKWARD_TANH_FORMS}, got {tanh_form!r}")
    block_a = min(128, max(2, next_power_of_2(attn_dim)))
    block_s = min(32, max(4, next_power_of_2(src_len)))
    if num_splits is None:
        programs = query_rows * -(-src_len // block_s) * -(-attn_dim // block_a)
        num_splits = 1
        if 0 < programs < 2 * sm_count:
            most = max(1, tgt_len // MIN_ROWS_PER_SPLIT)
            fewest = min(-(-2 * sm_count // programs), most)
            sizes = dict(query_rows=query_rows, tgt_len=tgt_len, src_len=src_len, attn_dim=attn_dim,
                         block_s=block_s, block_a=block_a, sm_count=sm_count)
            num_splits = min(range(fewest, most + 1), key=lambda splits: _split_steps(splits=splits, **sizes))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return BackwardConfig(
        block_t=1,
        block_s=block_s,
        block_a=block_a,
        num_warps=max(1, block_a // 32),
        num_stages=1,
        tanh_form=tanh_form or default_backward_tanh_form(dtype, tgt_len),
        num_splits=num_splits,
    )
