"""pytest-benchmark suite of the attention op: every shape x dtype x mode x backend of `attn_fast.tools.bench.cases`
(the quick set of `attn-fast bench` by default, `--bench-full` for all), grouped per problem so that the backends
of one problem sit in one table. Each case is checked against the float64 reference before it is benchmarked (the
first call, which is also torch.compile's compilation, is outside the timing); an incorrect case fails its test
and is not timed."""
import math
import time

import torch

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


def test_op(benchmark, spec, bench_device):
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
