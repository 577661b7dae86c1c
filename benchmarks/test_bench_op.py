"""pytest-benchmark suite of the attention op: every shape x dtype x mode x backend of `attn_fast.tools.bench.cases`
(the quick set of `attn-fast bench` by default, `--bench-full` for all), grouped per problem so that the backends
of one problem sit in one table. Each case is checked against the float64 reference before it is benchmarked (the
first call, which is also torch.compile's compilation, is outside the timing); an incorrect case fails its test
and is not timed. Backends: every one that runs on the device (`cases.backends_for`: eager, torch.compile of it,
the torch backend, the fused "cpu" backend where numba imports, Triton on CUDA); modes include the step through a
prepared memory (`prepared_step`), whose memory is prepared once, outside the rounds. CPU rows record the tanh
elements/s and their fraction of the CPU limit (`cpu_limit`, measured once per session) in `extra_info`."""
import math
import time

import pytest
import torch

from attn_fast.tools.bench import cpu_limit, roofline
from attn_fast.tools.bench.cases import MODES, PreparedCase, backends_for, case_specs, check_case
from attn_fast.tools.bench.runner import FULL_DTYPES, FULL_SHAPES, QUICK_DTYPES, QUICK_SHAPES

#: Seconds of samples per case (rounds adapt to the case's own duration: 3 to 50 rounds).
TARGET_S = 1.0


def pytest_generate_tests(metafunc):
    if "spec" not in metafunc.fixturenames:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.type
    full = metafunc.config.getoption("--bench-full")
    specs = case_specs(FULL_SHAPES if full else QUICK_SHAPES[kind], (FULL_DTYPES if full else QUICK_DTYPES)[kind],
                       MODES, backends_for(device))
    metafunc.parametrize("spec", specs, ids=[spec.key for spec in specs])


@pytest.fixture(scope="session")
def measured_cpu_limit(bench_device):
    """The CPU limit at torch's thread count, measured once per session (None on GPU)."""
    return cpu_limit.measure_cpu_limit() if bench_device.type == "cpu" else None


def test_op(benchmark, spec, bench_device, measured_cpu_limit):
    prepared = PreparedCase(spec, bench_device)
    check = check_case(prepared)
    assert check.passed, f"incorrect, not benchmarked: errors {check.errors}, tolerances {check.tolerances}"

    def run():
        prepared.run()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    run()
    one_call_s = time.perf_counter() - start
    benchmark.group = spec.group
    benchmark.extra_info.update(backend=spec.backend, threads=torch.get_num_threads(), errors=check.errors,
                                first_call_s=check.first_call_s, sizes=spec.problem.as_dict())
    if spec.backend == "compile":
        benchmark.extra_info["compile_s"] = check.first_call_s  # compilation + one call, never in the rounds
    rounds = int(min(50, max(3, math.ceil(TARGET_S / max(one_call_s, 1e-6)))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    if bench_device.type == "cpu" and benchmark.stats is not None:  # no stats under --benchmark-disable
        benchmark.extra_info["throughput"] = cpu_limit.throughput(
            roofline.tanh_evaluations(spec), benchmark.stats.stats.median, torch.get_num_threads(), measured_cpu_limit)
