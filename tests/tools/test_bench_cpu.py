"""The CPU side of `attn-fast bench` (issue 13): the CPU limit of the factorized tanh's arithmetic, tanh elements/s
and the limit fraction in every CPU row, a column for every registered backend (none for one that cannot run), the
step through a prepared memory, thread scaling, the issue-13 targets and the README's Markdown table. Tiny shapes;
no test asserts a timing."""
import io
import json
import pathlib
import sys

import pytest
import torch

from attn_fast import validation
from attn_fast.backends import cpu_kernels
from attn_fast.tools.bench import cases, cpu_limit, report, runner, scaling, targets
from attn_fast.tools.bench.cases import CaseSpec
from attn_fast.tools.cli import main

CPU = torch.device("cpu")
needs_numba = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                 reason=f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def limit():
    """The CPU limit at 1 and 2 threads, briefly timed (the figures are not asserted, only their shape)."""
    return cpu_limit.measure_cpu_limit((1, 2), target_s=0.05)


def cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@needs_numba
def test_cpu_limit_is_positive_at_each_thread_count_and_vectorized(limit):
    assert limit["available"], limit
    assert set(limit["by_threads"]) == {"1", "2"}
    for threads, entry in limit["by_threads"].items():
        assert entry["threads"] == int(threads) and entry["elements_per_s"] > 0
        assert entry["best_elements_per_s"] >= entry["elements_per_s"]
        assert len(entry["samples_s"]) == 5
    assert limit["fastmath"] == sorted(cpu_kernels.FASTMATH)
    assert cpu_limit.limit_for(limit, 2) == limit["by_threads"]["2"]["elements_per_s"]
    assert cpu_limit.limit_for(limit, 3) is None
    assert cpu_limit.scaling(limit) == pytest.approx(
        limit["by_threads"]["2"]["elements_per_s"] / limit["by_threads"]["1"]["elements_per_s"])
    # The loop is packed at the machine's vector width: a division (or a reciprocal) per element in ymm/zmm
    # registers on an AVX2 machine, read from the compiled assembly.
    if "avx2" in cpu_flags():
        assert limit["vector_bits"] >= 256, limit["instructions"]
        assert limit["instructions"]["vdivps"] or limit["instructions"]["vrcpps"], limit["instructions"]


def test_cpu_limit_falls_back_without_numba(monkeypatch):
    def probe_numba():
        """The CPU backend's availability check, asked afresh (the real one remembers its first answer)."""
        try:
            import numba  # noqa: F401
        except ImportError as error:
            return f"numba is not importable ({error})"
        return None

    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", probe_numba)
    monkeypatch.setattr(cpu_limit, "_KERNEL", None)
    result = cpu_limit.measure_cpu_limit((1,))
    assert result["available"] is False and "numba" in result["note"] and "\n" not in result["note"]
    assert cpu_limit.limit_for(result, 1) is None and cpu_limit.scaling(result) is None
    row = cpu_limit.throughput(1000, 0.5, 1, result)
    assert row["elements_per_s"] == 2000 and row["cpu_limit_fraction"] is None
    assert report.cpu_limit_line(result) == result["note"]


def test_throughput_counts_the_backward_pass_twice():
    limit = {"available": True, "by_threads": {"2": {"elements_per_s": 8e9}}}
    forward = CaseSpec("long", "fp32", "forward", "cpu")
    both = CaseSpec("long", "fp32", "forward_backward", "cpu")
    elements = 8 * 400 * 400 * 256
    assert cpu_limit.throughput(runner.roofline.tanh_evaluations(forward), 0.1, 2, limit) == {
        "tanh_evaluations": elements, "elements_per_s": elements / 0.1, "threads": 2, "limit_elements_per_s": 8e9,
        "cpu_limit_fraction": elements / 0.1 / 8e9}
    assert cpu_limit.throughput(runner.roofline.tanh_evaluations(both), 0.1, 2, limit)["tanh_evaluations"] == (
        2 * elements)


def test_backends_follow_the_library_registry(monkeypatch):
    registered = cases.registered_backends()
    assert registered[:2] == ("reference", "compile")
    assert set(registered[2:]) == set(validation.BACKENDS) - {"auto", "reference"}
    assert "triton" not in cases.backends_for(CPU) and "triton" in cases.skipped_backends(CPU)
    # A library without the fused CPU kernels: no "cpu" column at all, and nothing to skip but Triton.
    monkeypatch.setattr(validation, "BACKENDS", ("auto", "triton", "torch", "reference"))
    assert cases.backends_for(CPU) == ("reference", "compile", "torch")
    # A backend registered later gets a column after the known ones.
    monkeypatch.setattr(validation, "BACKENDS", ("auto", "later", "cpu", "torch", "reference"))
    assert cases.registered_backends() == ("reference", "compile", "torch", "cpu", "later")
    assert cases.backend_label("later") == "later" and cases.backend_label("reference") == "eager"


def test_cpu_backend_without_numba_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "numba is not importable (test)")
    assert "cpu" not in cases.backends_for(CPU)
    assert cases.skipped_backends(CPU)["cpu"] == "numba is not importable (test)"
    with pytest.raises(ValueError, match="numba is not importable"):
        cases.build_attention("cpu", CPU)
    assert cases.backend_unusable_reason("cpu", torch.device("cuda")).startswith("the fused CPU kernels take CPU")


@needs_numba
def test_prepared_step_prepares_the_memory_once_outside_the_call():
    prepared = cases.PreparedCase(CaseSpec("tiny", "fp32", "prepared_step", "cpu"), CPU)
    assert prepared.spec.problem.tgt_len == 1 and prepared.inputs.query_proj.shape[1] == 1
    assert prepared.memory_options["tanh_form"] == "factorized"
    torch.testing.assert_close(prepared.memory_options["key_exp"], torch.exp(2 * prepared.inputs.key_proj))
    assert cases.check_case(prepared).passed
    eager = cases.PreparedCase(CaseSpec("tiny", "fp32", "prepared_step", "reference"), CPU)
    assert eager.memory_options["key_exp"] is None and cases.check_case(eager).passed  # nothing to prepare
    # A T = 1 shape keeps its prepared step (its plain decode step is its forward).
    modes = [spec.mode for spec in cases.case_specs(["tts_step"], ["fp32"], cases.MODES, ["cpu"])]
    assert modes == ["forward", "forward_backward", "prepared_step"]


def test_the_prepared_memory_holds_the_triton_v_pre_pass():
    """`memory_options` keeps what `AdditiveAttention.precompute` keeps: for the Triton backend also the score
    weights of its v pre-pass (run under the interpreter here), which its prepared steps then skip; None for the
    backends without that launch."""
    pytest.importorskip("triton")
    inputs = cases.PreparedCase(CaseSpec("tiny", "fp32", "prepared_step", "torch"), CPU).inputs
    assert cases.memory_options("torch", inputs)["score_weights"] is None
    weights = cases.memory_options("triton", inputs)["score_weights"]
    attn_dim = inputs.v.shape[0]
    assert weights is not None and weights.shape == (-(-attn_dim // 64) * 64 + 2,)
    torch.testing.assert_close(weights[:attn_dim], -0.5 / inputs.v)  # c = -1 / (2 v), the reciprocal forms' weights


@pytest.mark.slow
@needs_numba
def test_every_cpu_row_reports_elements_per_second_and_limit_fraction(tmp_path):
    table = io.StringIO()
    modes = ["forward", "forward_backward", "prepared_step"]
    result = runner.run_bench(device="cpu", shapes=["tiny"], modes=modes, backends=["reference", "cpu"], model=False,
                              memory=False, ragged_batches=False, out_dir=tmp_path, progress=False, out=table)
    saved = json.loads(pathlib.Path(result["files"]["json"]).read_text())
    assert saved["cpu_limit"]["available"]
    assert set(saved["cpu_limit"]["by_threads"]) == {"1", str(torch.get_num_threads())}
    assert [(case["mode"], case["backend"]) for case in saved["cases"]] == [
        (mode, backend) for mode in modes for backend in ("reference", "cpu")]
    for case in saved["cases"]:
        assert case["status"] == "ok", case
        throughput = case["throughput"]
        passes = 2 if case["mode"] == "forward_backward" else 1
        sizes = case["sizes"]
        # Visible keys only (roofline.visible_tanh_evaluations): T * A per visible key of each row, per pass; the
        # bench's key_lengths are in 1..S, so at least one key per row and at most all of them.
        per_key = passes * sizes["T"] * sizes["A"]
        assert throughput["tanh_evaluations"] % per_key == 0
        assert sizes["B"] <= throughput["tanh_evaluations"] // per_key <= sizes["B"] * sizes["S"]
        assert throughput["elements_per_s"] == pytest.approx(
            throughput["tanh_evaluations"] / case["timing"]["median_s"])
        assert throughput["threads"] == torch.get_num_threads()
        assert 0 < throughput["cpu_limit_fraction"] < 1.5, case
    assert saved["scaling"] is None  # quick runs leave it out unless asked
    printed = table.getvalue()
    assert "Melem/s" in printed and "% limit" in printed and printed.count("CPU limit (") == 1
    assert "tiny/fp32/prepared_step" in printed

    markdown = report.markdown_table(saved, "runs/x.json")
    assert "| shape (B, T, S, A, D) | mode | eager | cpu | cpu: % of CPU limit | peak MiB (eager / cpu) |" in markdown
    assert "`runs/x.json`" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| tiny (")]
    assert len(rows) == len(modes) and rows[-1].startswith("| tiny (2, 1, 7, 8, 6) | prepared step |")
    for row, group in zip(rows, dict.fromkeys(case["group"] for case in saved["cases"])):
        medians = {case["backend"]: case["timing"]["median_s"] for case in saved["cases"] if case["group"] == group}
        fastest = min(medians, key=medians.get)
        assert row.count("**") == (0 if fastest == "reference" else 2), row  # the fastest's ratio in bold


@needs_numba
def test_thread_scaling_checks_and_times_each_count(limit):
    threads_before = torch.get_num_threads()
    result = scaling.run_scaling_bench(["tiny"], "fp32", ["cpu"], thread_counts=(2, 1), target_s=0.01, limit=limit)
    assert result["thread_counts"] == [1, 2] and result["limit_speedup"] == cpu_limit.scaling(limit)
    assert [row["mode"] for row in result["rows"]] == list(scaling.SCALING_MODES)
    for row in result["rows"]:
        one, two = row["by_threads"]["1"], row["by_threads"]["2"]
        assert one["status"] == two["status"] == "ok", row
        assert row["speedup"] == one["median_s"] / two["median_s"] and row["efficiency"] == row["speedup"] / 2
        for entry in (one, two):
            assert 0 < entry["throughput"]["cpu_limit_fraction"] < 1.5
            assert all(error < 1e-5 for error in entry["errors"].values())
    assert torch.get_num_threads() == threads_before  # restored after each count
    printed = report.scaling_table(result)
    assert "Thread scaling (1 vs 2 threads" in printed and "tiny/fp32/forward_backward" in printed
    assert "| tiny | forward+backward | cpu |" in report.markdown_scaling_table(result)


def test_thread_scaling_needs_the_cpu_backend_and_two_threads():
    assert "not in this run" in runner.thread_scaling_section(["tiny"], "fp32", ["reference", "torch"],
                                                              target_s=0.01, limit=None, seed=0)["note"]


def _case(backend, mode, shape, median_s, peak_mib=None, fraction=None):
    case = {"group": f"{shape}/fp32/{mode}", "shape": shape, "mode": mode, "backend": backend,
            "sizes": {"T": 1 if mode == "prepared_step" else 20}, "status": "ok", "timing": {"median_s": median_s}}
    if peak_mib is not None:
        case["memory"] = {"peak_extra_mib": peak_mib}
    if fraction is not None:
        case["throughput"] = {"cpu_limit_fraction": fraction}
    return case


def test_issue_13_targets_are_ratios_of_the_run():
    long_forward = [_case("reference", "forward", "long", 6.0, 2500.0), _case("torch", "forward", "long", 0.3, 13.0),
                    _case("cpu", "forward", "long", 0.05, 10.0, fraction=0.4)]
    targets.annotate(long_forward, "cpu")
    fused = long_forward[2]["targets"]
    assert fused["forward >= 60x eager"]["value"] == pytest.approx(120.0) and fused["forward >= 60x eager"]["met"]
    assert fused["peak memory <= torch backend's"]["met"] is True
    assert fused[">= 50% of CPU limit"] == {"wanted": ">= 0.5", "value": 0.4, "met": False}

    # nmt_train's thresholds are 3x/4x the torch backend's speed-ups of the issue's day (3.8x, 9.6x), not this
    # run's torch case; a missing torch case leaves only the memory comparison unmeasured.
    nmt = [_case("reference", "forward_backward", "nmt_train", 1.0),
           _case("cpu", "forward_backward", "nmt_train", 0.1)]
    targets.annotate(nmt, "cpu")
    assert nmt[1]["targets"]["forward+backward >= 11.4x eager"] == {"wanted": ">= 11.4", "value": 10.0,
                                                                    "met": False}
    assert nmt[1]["targets"]["peak memory <= torch backend's"]["met"] is None

    steps = [_case("reference", "prepared_step", "tts_step", 3e-3), _case("torch", "prepared_step", "tts_step", 2e-3),
             _case("cpu", "prepared_step", "tts_step", 2e-3)]
    targets.annotate(steps, "cpu")
    assert steps[2]["targets"] == {"prepared step >= 3x eager": {"wanted": ">= 3", "value": 1.5, "met": False}}
    assert steps[1]["targets"] == {}  # the torch backend's single steps keep having no CPU target (issue 6)


def test_markdown_flag_parses_and_shows_a_saved_run(tmp_path, capsys):
    saved = {"date": "2026-01-01 00:00:00 UTC", "settings": {"dtypes": ["fp32"]},
             "machine": {"device_name": "Some CPU", "threads": 2, "torch": "2.13.0"},
             "cases": [dict(_case("reference", "forward", "long", 2.0), sizes={k: 1 for k in "BTSAD"}),
                       dict(_case("cpu", "forward", "long", 0.5, fraction=0.25), speedup_vs_eager=4.0,
                            sizes={k: 1 for k in "BTSAD"})]}
    saved["cases"][0]["speedup_vs_eager"] = 1.0
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    assert main(["bench", "--show", str(path), "--markdown"]) == 0
    shown = capsys.readouterr().out
    assert "| long (1, 1, 1, 1, 1) | forward | 2000.0 ms | 500.0 ms (**4.0×**) | 25% | - / - |" in shown


def test_cpu_elements_count_visible_keys_only():
    """elements/s credit a kernel that skips padded keys with the work it does: T * A per visible key, twice for
    forward + backward, and every key without lengths (then the same count as the 4-D tensor's elements)."""
    from attn_fast.tools.bench import roofline
    from attn_fast.tools.bench.cases import CaseSpec

    spec = CaseSpec("nmt_train", "fp32", "forward", "cpu")
    problem = spec.problem
    lengths = torch.randint(1, problem.src_len + 1, (problem.batch,))
    visible = roofline.visible_tanh_evaluations(spec, lengths)
    assert visible == problem.tgt_len * int(lengths.sum()) * problem.attn_dim
    assert roofline.visible_tanh_evaluations(spec, None) == roofline.tanh_evaluations(spec)
    both_passes = CaseSpec("nmt_train", "fp32", "forward_backward", "cpu")
    assert roofline.visible_tanh_evaluations(both_passes, lengths) == 2 * visible
    assert roofline.visible_tanh_evaluations(spec, lengths + 10 * problem.src_len) == roofline.tanh_evaluations(spec)
