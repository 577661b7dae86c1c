"""Static sm_90 / sm_80 report of the forward and backward kernels: compile offline (no GPU needed), read the SASS,
and model the whole GPU.

    python -m benchmarks.static_report [--shapes nmt_train tts_step ...] [--dtypes fp32 fp16 bf16] [--archs 90 80]
                                       [--output PATH]
    python -m benchmarks.static_report --predict             the prediction table of the saved sm_90 report
    python -m benchmarks.static_report --write-predictions   the bench's predictions file from the saved report
    python -m benchmarks.static_report --check               do the saved reports hold every launch planned today?

For each named benchmark shape (the bench's table, `attn_fast.tools.bench.shapes.NAMED_SHAPES`, plus this report's
own additions, `REPORT_ONLY_SHAPES`) and dtype, the launchers' own plans (`forward_compile_targets`,
`backward_compile_targets`: planned on meta tensors for the target's SM count, the same kernels, constexprs and warps
a real call would launch) are compiled for sm_90 (H100) and sm_80 (A100) with `triton.compile`, then disassembled
with the nvdisasm/cuobjdump shipped inside the triton package. Launches are compiled once per distinct
specialization: kernel, warps, stages, constexprs, pointer dtypes and the integers the JIT specializes (equal to 1,
divisible by 16).
Reported per kernel configuration: registers, stack bytes (> 0 means spills), shared memory and, for the tanh
kernels, the hot loop: the innermost loop around the block with the most per-element MUFU ops, counted along the
fast path (the factorized form's fallback branch for out-of-range inputs is left out and reported separately), and
for each use the whole-GPU model (kernels/occupancy.py): grid, CTAs resident per SM, waves, fill, padding.

Issue-slot model for Hopper (DESIGN.md, "Performance you can check without a GPU"): an SM issues 128
thread-instructions per clock and completes 16 MUFU ops per clock, so the loop can run at the MUFU limit only while
it spends <= 8 instructions per MUFU op. Predicted fraction of the MUFU limit = min(1, 8 / instructions per MUFU
op); tanh throughput relative to 16 tanh/clock/SM = that / MUFU ops per tanh: the per-SM figure. The whole-GPU
ceiling = per-SM figure x efficiency of the grid (idle SMs, partial waves, padded rows and key tiles). Real timings
decide on a GPU.

Outputs: the full reports (--output, default benchmarks/results/static_sm90.json, and static_sm80.json next to it)
and, when the run covers the whole bench table (every named shape and dtype, with the backward), the bench's subset
of the sm_90 report (`attn_fast.tools.bench.roofline.static_predictions`) as the package data file
attn_fast/tools/bench/static_sm90_predictions.json, which `attn-fast bench` reads, also from an installed wheel.

Compiling needs a process where TRITON_INTERPRET is not 1 (triton decides at @jit time); `main` re-runs itself
in a clean subprocess when it is set.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

from attn_fast.tools.bench import shapes as bench_shapes
from attn_fast.tools.bench.roofline import STATIC_PREDICTIONS_FILE, static_predictions
from attn_fast.tools.bench.shapes import NAMED_SHAPES, ProblemShape

#: Report-only additions to the bench's named shapes: sizes that reach the kernel configurations the named shapes
#: do not (the bench does not time them).
REPORT_ONLY_SHAPES: dict[str, ProblemShape] = {
    shape.name: shape
    for shape in (
        ProblemShape("nmt_fused", 32, 50, 50, 256, 128),  # nmt_train with D = 128: context fused into the score kernel
        ProblemShape("decode_fused", 32, 1, 200, 128, 128),  # single step, D = 128: fused, keys split
        ProblemShape("short_steps", 64, 4, 100, 256, 128),  # a few steps per call (T = 4 query rows per program)
        ProblemShape("mid", 32, 12, 50, 256, 128),  # 12 query rows: a tile of 16 or 32
        ProblemShape("decode_long", 1, 1, 8192, 256, 128),  # B = 1, long S: the most key splits one combine merges
        # long fp32 all-steps where the heuristic prepares the keys (a pre-pass writes e^{2k}, ForwardConfig)
        ProblemShape("long_prepared", 16, 800, 800, 512, 128),
    )
}
#: Every shape the report can compile: the bench's named shapes (not its CI-only "tiny"), then the additions.
SHAPES: dict[str, ProblemShape] = {**NAMED_SHAPES, **REPORT_ONLY_SHAPES}
#: The dtypes the Triton kernels take (the bench's table also has fp64, which only the torch backends run).
DTYPES: dict[str, torch.dtype] = {name: bench_shapes.DTYPES[name] for name in ("fp32", "fp16", "bf16")}
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPOSITORY / "benchmarks" / "results" / "static_sm90.json"
#: The bench's subset of the report, shipped as package data (see attn_fast/tools/bench/roofline.py).
PACKAGE_PREDICTIONS = REPOSITORY / "attn_fast" / "tools" / "bench" / STATIC_PREDICTIONS_FILE
SCORE_KERNEL = "_attention_forward_kernel"
#: The score kernel with prepared keys (a decoding memory's e^{2k}, or fp32 all-steps with the key pre-pass).
PREPARED_SCORE_KERNEL = "_attention_forward_prepared_kernel"
BACKWARD_KERNEL = "_attention_backward_kernel"
#: Kernels with a tanh loop to analyze (their tile constexprs share the names BLOCK_A/T/S and TANH_FORM).
TANH_KERNELS = (SCORE_KERNEL, PREPARED_SCORE_KERNEL, BACKWARD_KERNEL)
TARGET_ARCH = 90
#: Every compile target of the report: the predictions come from sm_90 (H100); sm_80 (A100) is the oldest GPU the
#: Triton backend is used on (attn_fast/functional.py `MIN_TRITON_CAPABILITY`), checked for spills and compiles.
ARCHS = (90, 80)
#: Hopper: thread-instructions issued per clock per SM / MUFU ops completed per clock per SM.
ISSUE_PER_MUFU = 128 / 16

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int8: "i8",
    torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


def _tool(name: str) -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def specialization(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of one `KernelLaunch`, the way the JIT would specialize it: tensors become
    pointers of their dtype assumed 16-byte aligned, integers equal to 1 become constants, multiples of 16 get the
    divisibility hint."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    signature, constants, attrs = {}, {}, {}
    for position, name in enumerate(kernel.arg_names):
        value = launch.arguments[name]
        if kernel.params[position].is_constexpr:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(position,)] = [["tt.divisibility", 16]]
        else:
            kind, hint = native_specialize_impl(BaseBackend, value, False, True, True)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constants[name] = value
            else:
                signature[name] = kind
                if hint == "D":
                    attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_launch(launch, arch: int = TARGET_ARCH):
    """Compile one `KernelLaunch` for sm_`arch` with the JIT's specialization (`specialization`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constants, attrs = specialization(launch)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps,
                                                                               "num_stages": launch.num_stages})


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str  # e.g. "FFMA", "MUFU.RCP", "BRA"
    target: str | None  # branch target label


def disassemble(cubin: bytes) -> tuple[dict, list[Instruction], dict[str, int]]:
    """Resource usage {registers, stack_bytes, shared_bytes (static only)}, the instructions, and label -> address."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), str(path)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    resources = {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)),
                 "shared_bytes": int(found.group(3))}
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*)", line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            target = re.search(r"`\((\.L_x_\d+)\)", found.group(3))
            instructions.append(Instruction(address, found.group(2), target.group(1) if target else None))
    return resources, instructions, labels


def _blocks(instructions: list[Instruction], labels: dict[str, int]) -> list[list[Instruction]]:
    """Straight-line blocks: split at every label and after every branch."""
    starts = set(labels.values())
    blocks, current = [], []
    for instruction in instructions:
        if instruction.address in starts and current:
            blocks.append(current)
            current = []
        current.append(instruction)
        if instruction.opcode.startswith("BRA"):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _opcode_counts(instructions: list[Instruction]) -> collections.Counter:
    return collections.Counter(i.opcode if i.opcode.startswith("MUFU") else i.opcode.split(".")[0]
                               for i in instructions)


def hot_loop(instructions: list[Instruction], labels: dict[str, int], elements_per_thread: int,
             element_op: str) -> dict:
    """Statistics of the score loop for one iteration over an A-chunk tile (`elements_per_thread` tanh per thread).

    The hot block is the block with the most `element_op` per instruction; the hot loop is the innermost backward
    branch around it. Blocks in the loop that hold one MUFU.EX2 per element next to the element op belong to the
    factorized form's fallback (saturated inputs) and are counted separately; where the fallback is a loop of its
    own (the range check before the loop), that loop is the fallback."""
    blocks = _blocks(instructions, labels)
    candidates = [b for b in blocks if sum(i.opcode == element_op for i in b) >= elements_per_thread]
    if not candidates:
        raise ValueError(f"no block with {elements_per_thread} x {element_op}")
    hot = min(candidates, key=lambda b: len(b) / sum(i.opcode == element_op for i in b))
    hot_start = hot[0].address
    loops = [(labels[i.target], i.address) for i in instructions
             if i.opcode.startswith("BRA") and i.target in labels
             and labels[i.target] <= hot_start <= i.address]
    if not loops:
        raise ValueError("the hot block is not inside a loop")
    loop_start, loop_end = min(loops, key=lambda span: span[1] - span[0])
    fast_path, fallback = [], []
    for block in blocks:
        if not (loop_start <= block[0].address <= loop_end):
            continue
        is_fallback = (element_op == "MUFU.RCP" and block is not hot
                       and sum(i.opcode == "MUFU.EX2" for i in block) >= elements_per_thread)
        (fallback if is_fallback else fast_path).extend(block)
    if not fallback and element_op == "MUFU.RCP":
        # The range check hoisted out of the loop (issue 12): the exp-form fallback is a loop of its own, the
        # innermost loop around a block with one MUFU.EX2 and one MUFU.RCP per element.
        exp_blocks = [b for b in blocks if not (loop_start <= b[0].address <= loop_end)
                      and sum(i.opcode == "MUFU.EX2" for i in b) >= elements_per_thread
                      and sum(i.opcode == "MUFU.RCP" for i in b) >= elements_per_thread]
        if exp_blocks:
            start = exp_blocks[0][0].address
            spans = [(labels[i.target], i.address) for i in instructions
                     if i.opcode.startswith("BRA") and i.target in labels and labels[i.target] <= start <= i.address]
            if spans:
                fallback_start, fallback_end = min(spans, key=lambda span: span[1] - span[0])
                fallback = [i for b in blocks if fallback_start <= b[0].address <= fallback_end for i in b]
    counts = _opcode_counts(fast_path)
    mufu = sum(n for op, n in counts.items() if op.startswith("MUFU"))
    per_tanh = len(fast_path) / elements_per_thread
    per_mufu = len(fast_path) / mufu
    mufu_fraction = min(1.0, ISSUE_PER_MUFU / per_mufu)
    return {
        "elements_per_thread": elements_per_thread,
        "instructions": len(fast_path),
        "element_op": element_op,
        "element_ops_per_element": counts[element_op] / elements_per_thread,
        "mufu_per_element": mufu / elements_per_thread,
        "instructions_per_tanh": round(per_tanh, 3),
        "instructions_per_mufu": round(per_mufu, 3),
        "predicted_mufu_limit_fraction": round(mufu_fraction, 3),
        "predicted_tanh_rate_fraction": round(mufu_fraction * elements_per_thread / mufu, 3),
        "shfl": counts["SHFL"],
        "local_memory_instructions": counts["STL"] + counts["LDL"],  # spill traffic inside the loop
        "opcodes": dict(counts.most_common(12)),
        "fallback_instructions_per_tanh": round(len(fallback) / elements_per_thread, 3) if fallback else None,
    }


def _element_op(tanh_form: str) -> str:
    return {"approx": "MUFU.TANH", "factorized": "MUFU.RCP", "exp": "MUFU.RCP", "libdevice": "MUFU.EX2"}[tanh_form]


def _constexprs(launch) -> dict:
    kernel = launch.kernel
    return {name: launch.arguments[name] for name, param in zip(kernel.arg_names, kernel.params) if param.is_constexpr}


def analyze_launch(launch, arch: int = TARGET_ARCH) -> dict:
    """Compile one launch for sm_`arch` and return its report entry."""
    compiled = compile_launch(launch, arch)
    resources, instructions, labels = disassemble(compiled.asm["cubin"])
    # cuobjdump counts static shared memory only; Triton allocates its buffers dynamically.
    resources["shared_bytes"] = max(resources["shared_bytes"], compiled.metadata.shared)
    constants = _constexprs(launch)
    entry = {"kernel": launch.kernel.__name__, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
             "constexprs": constants, "signature": _signature_summary(launch), **resources,
             "spills": resources["stack_bytes"] > 0}
    if launch.kernel.__name__ in TANH_KERNELS:
        form = constants["TANH_FORM"]
        threads = 32 * launch.num_warps
        elements = constants["BLOCK_A"] * constants["BLOCK_T"] * constants["BLOCK_S"] // threads
        entry["hot_loop"] = hot_loop(instructions, labels, elements, _element_op(form))
    return entry


def _signature_summary(launch) -> dict:
    """The non-constexpr part of the specialization that changes the code: pointer dtypes and integer kinds."""
    signature, constants, attrs = specialization(launch)
    names = launch.kernel.arg_names
    divisible = sorted(names[position[0]] for position in attrs)
    return {"types": {name: kind for name, kind in signature.items() if kind != "constexpr"},
            "divisible_by_16": divisible,
            "specialized": {name: value for name, value in constants.items()
                            if not launch.kernel.params[names.index(name)].is_constexpr}}


def _launch_key(launch) -> str:
    """What makes two launches compile to the same code: kernel, warps, stages, constexprs and the specialization
    (pointer dtypes, integers specialized to 1 or marked divisible by 16)."""
    signature, constants, attrs = specialization(launch)
    return json.dumps([launch.kernel.__name__, launch.num_warps, launch.num_stages, signature,
                       {name: repr(value) for name, value in constants.items()},
                       sorted(str(position) for position in attrs)], sort_keys=True)


def launch_hash(launch) -> str:
    """A short digest of `_launch_key`: what `--check` looks up in a saved report."""
    return hashlib.sha1(_launch_key(launch).encode()).hexdigest()[:16]


def check_reports(output: pathlib.Path, archs) -> list[str]:
    """What the saved reports (`output` and its other-target siblings) miss: every launch the planners make today
    for the report's shapes and every dtype (planned for each target's SM count, no compilation) must be an entry
    with the same specialization that lists the use. Returns one line per problem."""
    from attn_fast.kernels.occupancy import GPUS

    problems = []
    for arch in archs:
        path = output_for(output, arch)
        if not path.is_file():
            problems.append(f"sm_{arch}: {path} missing")
            continue
        report = json.loads(path.read_text())
        entries = {entry.get("specialization_key"): entry for entry in report["kernels"]}
        shapes = [SHAPES[name] for name in report["shapes"]]
        with planned_for(GPUS[arch]):
            targets = forward_compile_targets(shapes, DTYPES) + backward_compile_targets(shapes, DTYPES)
        for use, launch in targets:
            entry = entries.get(launch_hash(launch))
            if entry is None or use not in entry["used_by"]:
                problems.append(f"sm_{arch}: {use}: {launch.kernel.__name__} (warps {launch.num_warps}, "
                                f"{_constexprs(launch)}) not in {path.name}")
    return problems


def whole_gpu(launch, shape: ProblemShape, entry: dict, gpu) -> dict:
    """The whole-GPU model (kernels/occupancy.py) of one tanh-kernel launch at `shape`: the grid, CTAs resident per
    SM from the compiled registers, warps and shared memory, waves, fill, padding, and the ceiling = the hot loop's
    per-SM fraction of 16 tanh/clk/SM x efficiency."""
    from attn_fast.kernels import occupancy

    batch, tgt_len, src_len, attn_dim, value_dim = shape.sizes
    constants, arguments = entry["constexprs"], launch.arguments
    a_padded = -(-attn_dim // constants["BLOCK_A"]) * constants["BLOCK_A"]
    if launch.kernel.__name__ in (SCORE_KERNEL, PREPARED_SCORE_KERNEL):
        work = constants["BLOCK_T"] * arguments["keys_per_split"] * a_padded
        splits = launch.grid[1] if len(launch.grid) > 1 else 1
        traffic = occupancy.combine_bytes(query_rows=batch, tgt_len=tgt_len, value_dim=value_dim, splits=splits,
                                          fuse_context=bool(constants["FUSE_CONTEXT"]))
    else:
        work = arguments["rows_per_split"] * constants["BLOCK_S"] * constants["BLOCK_A"]
        splits, traffic = arguments["num_splits"], 0
    ctas = 1
    for size in launch.grid:
        ctas *= size
    resident = occupancy.resident_ctas(entry["registers"], launch.num_warps, entry["shared_bytes"], gpu)
    model = occupancy.grid_model(ctas, work, batch * tgt_len * src_len * attn_dim, launch.num_warps,
                                 resident=resident, sm_count=gpu.sm_count)
    per_sm = entry["hot_loop"]["predicted_tanh_rate_fraction"]
    return {"grid": list(launch.grid), "splits": splits, **model.as_dict(), "sm_count": gpu.sm_count,
            "combine_bytes": traffic, "ceiling": round(per_sm * model.efficiency, 4)}


def _meta(dtype: torch.dtype):
    """meta(*sizes): an uninitialized tensor on the meta device, enough for the launchers' plans (no data, no GPU)."""
    def meta(*sizes):
        return torch.empty(*sizes, device="meta", dtype=dtype)

    return meta


def forward_compile_targets(shapes: list[ProblemShape], dtypes: dict[str, torch.dtype],
                            need_weights=(False, True)) -> list[tuple[str, object]]:
    """(use, launch) pairs: the `KernelLaunch`es `kernels.forward.plan_forward` plans for each shape and dtype
    (contiguous inputs, no mask, default configuration, an H100's 132 SMs), with and without `need_weights`. `use`
    is "shape/dtype", or "shape/dtype/weights" when the weights are asked for."""
    # attn_fast.kernels is the top-level kernels/ folder, installed under that name by setup.py's package_dir mapping.
    from attn_fast.kernels.forward import plan_forward
    from attn_fast.validation import attention_call

    targets = []
    for shape in shapes:
        batch, tgt_len, src_len, attn_dim, value_dim = shape.sizes
        for dtype_name, dtype in dtypes.items():
            meta = _meta(dtype)
            for weights in need_weights:
                plan = plan_forward(attention_call(meta(batch, tgt_len, attn_dim), meta(batch, src_len, attn_dim),
                                                   meta(batch, src_len, value_dim), meta(attn_dim),
                                                   need_weights=weights))
                use = f"{shape.name}/{dtype_name}{'/weights' if weights else ''}"
                targets.extend((use, launch) for launch in plan.launches)
    return targets


def backward_compile_targets(shapes: list[ProblemShape] | None = None,
                             dtypes: dict[str, torch.dtype] | None = None) -> list[tuple[str, object]]:
    """(use, launch) pairs: the launches `attention_backward_tanh_pass` makes with its default configuration for
    each all-steps shape (T > 1) and dtype (contiguous inputs, dE from `grad_scores_buffer` as the backend allocates
    it, no index/extra term, causal=False, an H100's 132 SMs), planned on meta tensors. `use` is
    "shape/dtype/backward"; `launch` is a `KernelLaunch` like the forward's, with the same tile constexpr names
    (the hot loop's elements per thread are BLOCK_A * BLOCK_T * BLOCK_S / threads).

    Shapes with T = 1 are left out: Triton specializes T = 1 to a constant, the query loop disappears, and the
    hot-*loop* analysis finds none. Defaults: every shape of `SHAPES`, every dtype of `DTYPES`."""
    # attn_fast.kernels is the top-level kernels/ folder, installed under that name by setup.py's package_dir mapping.
    from attn_fast.kernels.backward import grad_scores_buffer, plan_backward

    targets = []
    for shape in SHAPES.values() if shapes is None else shapes:
        batch, tgt_len, src_len, attn_dim, _ = shape.sizes
        if tgt_len == 1:
            continue
        for dtype_name, dtype in (DTYPES if dtypes is None else dtypes).items():
            meta = _meta(dtype)
            grad_scores = grad_scores_buffer(batch, tgt_len, src_len, "meta")
            plan = plan_backward(meta(batch, tgt_len, attn_dim), meta(batch, src_len, attn_dim), meta(attn_dim),
                                 grad_scores)
            targets.extend((f"{shape.name}/{dtype_name}/backward", launch) for launch in plan.launches)
    return targets


@contextlib.contextmanager
def planned_for(gpu):
    """Plan launches for `gpu`'s SM count (meta tensors report DEFAULT_SM_COUNT, an H100's 132 SMs)."""
    from attn_fast.kernels import launch as kernel_launch

    original = kernel_launch.sm_count
    kernel_launch.sm_count = lambda device: gpu.sm_count
    try:
        yield
    finally:
        kernel_launch.sm_count = original


def build_report(shape_names, dtype_names, need_weights=(False, True), backward=True, arch: int = TARGET_ARCH) -> dict:
    """Compile every distinct launch of the named shapes and dtypes (`SHAPES`, `DTYPES`) for sm_`arch`, planned for
    that GPU's SM count (kernels/occupancy.py `GPUS`): the forward with and without weights and, with `backward`,
    the fused backward tanh pass. A launch several uses share (same kernel, constexprs, warps, stages and
    specialization: pointer dtypes, integers specialized or divisible by 16) is compiled once and lists them all in
    its `used_by`; tanh kernels get the whole-GPU model of each use in `whole_gpu`."""
    from attn_fast.kernels.occupancy import GPUS, SATURATING_WARPS

    gpu = GPUS[arch]
    entries: dict[str, dict] = {}

    def add(use, launch):
        key = _launch_key(launch)
        if key not in entries:
            entries[key] = analyze_launch(launch, arch)
            entries[key]["specialization_key"] = launch_hash(launch)
            entries[key]["used_by"] = []
        entry = entries[key]
        if use not in entry["used_by"]:
            entry["used_by"].append(use)
        if "hot_loop" in entry:
            entry.setdefault("whole_gpu", {})[use] = whole_gpu(launch, SHAPES[use.split("/")[0]], entry, gpu)

    shapes = [SHAPES[name] for name in shape_names]
    dtypes = {name: DTYPES[name] for name in dtype_names}
    with planned_for(gpu):
        forward = forward_compile_targets(shapes, dtypes, need_weights)
        backward_targets = backward_compile_targets(shapes, dtypes) if backward else []
    for use, launch in forward + backward_targets:
        add(use, launch)
    import triton

    return {
        "target": f"sm_{arch}",
        "sm_count": gpu.sm_count,
        "triton": triton.__version__,
        "model": "predicted_mufu_limit_fraction = min(1, 8 / instructions_per_mufu); "
                 "predicted_tanh_rate_fraction = that / mufu_per_element (per SM); "
                 "whole_gpu[use].ceiling = predicted_tanh_rate_fraction x efficiency, efficiency = fill x padding "
                 f"(kernels/occupancy.py: {SATURATING_WARPS} warps fill an SM, CTAs dealt evenly over the SMs)",
        "shapes": {name: SHAPES[name].as_dict() for name in shape_names},
        "kernels": list(entries.values()),
    }


_LABELS = {"BLOCK_T": "BT", "BLOCK_S": "BS", "BLOCK_A": "BA", "BLOCK_D": "BD", "TANH_FORM": "tanh",
           "FUSE_CONTEXT": "fused", "WRITE_WEIGHTS": "weights", "SPLIT": "split"}


def format_report(report: dict) -> str:
    lines = []
    for entry in report["kernels"]:
        constants = entry["constexprs"]
        settings = " ".join(f"{label}={constants[name]}" for name, label in _LABELS.items() if name in constants)
        lines.append(f"{entry['kernel']} warps={entry['num_warps']} {settings}  [{', '.join(entry['used_by'])}]")
        lines.append(f"    registers {entry['registers']}, stack {entry['stack_bytes']} B"
                     f"{' (SPILLS)' if entry['spills'] else ''}, shared {entry['shared_bytes']} B")
        if "hot_loop" in entry:
            h = entry["hot_loop"]
            lines.append(
                f"    hot loop: {h['instructions']} instructions for {h['elements_per_thread']} tanh per thread: "
                f"{h['instructions_per_tanh']} per tanh, {h['mufu_per_element']:.3f} MUFU per tanh "
                f"({h['element_ops_per_element']:g} {h['element_op']}), SHFL {h['shfl']}; "
                f"<= {h['predicted_mufu_limit_fraction']:.0%} of the MUFU limit, "
                f"<= {h['predicted_tanh_rate_fraction']:.0%} of 16 tanh/clk/SM")
            if h["fallback_instructions_per_tanh"]:
                lines.append(f"    fallback (saturated inputs): {h['fallback_instructions_per_tanh']} per tanh")
            for use, g in entry.get("whole_gpu", {}).items():
                lines.append(
                    f"    whole GPU ({use}): grid {g['grid']} = {g['ctas']} CTAs, {g['resident']} resident / "
                    f"{g['saturating']} fill an SM of {g['sm_count']}, {g['waves']:g} waves, fill {g['fill']:.0%}, "
                    f"padding {g['padding']:.0%}: ceiling {g['ceiling']:.0%} of the MUFU limit"
                    + (f", split partials {g['combine_bytes'] / 1e6:.1f} MB" if g["combine_bytes"] else ""))
    return "\n".join(lines)


#: H100 SXM: SMs and the boost clock, for the predicted times only (a loaded GPU may clock lower).
H100_SMS, H100_CLOCK_HZ = 132, 1.98e9


def prediction_table(report: dict) -> str:
    """Per named shape and dtype (weights not asked for): the tanh kernel's per-SM issue-model figure, its whole-GPU
    ceiling (kernels/occupancy.py: grid, waves, padding) and the time the tanh work alone would take on an H100 at
    the whole-GPU ceiling (16 tanh/clk/SM). A prediction to be checked against device timings, not a measurement."""
    lines = [f"{'shape/dtype':<26} {'regs':>4} {'spill':>5} {'instr/tanh':>10} {'MUFU/tanh':>9} {'per SM':>6} "
             f"{'CTAs':>5} {'waves':>5} {'fill':>4} {'pad':>4} {'WHOLE GPU':>9} {'tanh (M)':>9} {'predicted us':>12}"]
    limit = 16 * report.get("sm_count", H100_SMS) * H100_CLOCK_HZ
    for entry in report["kernels"]:
        if "hot_loop" not in entry:
            continue
        for use in entry["used_by"]:
            if use.endswith("/weights"):
                continue
            sizes = report["shapes"][use.split("/")[0]]
            tanh_count = sizes["B"] * sizes["T"] * sizes["S"] * sizes["A"]
            loop = entry["hot_loop"]
            grid = entry.get("whole_gpu", {}).get(use)
            ceiling = grid["ceiling"] if grid else loop["predicted_tanh_rate_fraction"]
            seconds = tanh_count / (limit * ceiling) if ceiling else float("inf")
            shape = (f"{grid['ctas']:>5} {grid['waves']:>5.2g} {grid['fill']:>4.0%} {grid['padding']:>4.0%} "
                     if grid else f"{'':>5} {'':>5} {'':>4} {'':>4} ")
            lines.append(f"{use:<26} {entry['registers']:>4} {entry['stack_bytes']:>5} "
                         f"{loop['instructions_per_tanh']:>10.2f} {loop['mufu_per_element']:>9.3f} "
                         f"{loop['predicted_tanh_rate_fraction']:>6.0%} {shape}{ceiling:>9.0%} "
                         f"{tanh_count / 1e6:>9.1f} {seconds * 1e6:>12.1f}")
    return "\n".join(lines)


def output_for(output: pathlib.Path, arch: int) -> pathlib.Path:
    """Where the report for sm_`arch` goes, given the sm_90 report's path."""
    if arch == TARGET_ARCH:
        return output
    if f"sm{TARGET_ARCH}" in output.name:
        return output.with_name(output.name.replace(f"sm{TARGET_ARCH}", f"sm{arch}"))
    return output.with_name(f"{output.stem}.sm{arch}{output.suffix}")


def _write_json(value: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")
    print(f"written: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT,
                        help="the sm_90 report; other targets go next to it (static_sm80.json, or NAME.sm80.json)")
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCHS), choices=list(ARCHS),
                        help="compile targets (default: sm_90 and sm_80)")
    parser.add_argument("--predictions-output", type=pathlib.Path,
                        help="where the bench's predictions go (default: the package data file "
                             f"{PACKAGE_PREDICTIONS.relative_to(REPOSITORY)}, and only when the run covers every "
                             "named shape and dtype with the backward: a partial report must not replace it)")
    parser.add_argument("--no-backward", action="store_true", help="forward kernels only")
    parser.add_argument("--check", action="store_true",
                        help="check that the saved reports hold every launch the planners make today (no compilation)")
    parser.add_argument("--predict", action="store_true",
                        help="print the prediction table from the saved JSON report (no compilation)")
    parser.add_argument("--write-predictions", action="store_true",
                        help="write the bench's predictions from the saved JSON report at --output (no compilation)")
    args = parser.parse_args(argv)
    if args.predict:
        print(prediction_table(json.loads(args.output.read_text())))
        return 0
    if args.write_predictions:
        _write_json(static_predictions(json.loads(args.output.read_text())),
                    args.predictions_output or PACKAGE_PREDICTIONS)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels decorated under the interpreter cannot be compiled: start over in a clean process.
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "benchmarks.static_report", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(command, env=environment, cwd=REPOSITORY).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the Triton 3.9 default, without its warning
    if args.check:
        problems = check_reports(args.output, args.archs)
        print("\n".join(problems) if problems else "every planned launch is in the saved reports")
        return 1 if problems else 0
    for arch in args.archs:
        report = build_report(args.shapes, args.dtypes, backward=not args.no_backward, arch=arch)
        print(f"== sm_{arch} ==")
        print(format_report(report))
        _write_json(report, output_for(args.output, arch))
        if arch == TARGET_ARCH:
            main_report = report
    if TARGET_ARCH not in args.archs:
        return 0
    report = main_report
    covers_bench = set(NAMED_SHAPES) <= set(args.shapes) and set(DTYPES) <= set(args.dtypes) and not args.no_backward
    predictions_output = args.predictions_output or (PACKAGE_PREDICTIONS if covers_bench else None)
    if predictions_output is not None:
        _write_json(static_predictions(report), predictions_output)
    else:
        print(f"not written: {PACKAGE_PREDICTIONS} (a partial run; --predictions-output PATH to write them elsewhere)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
