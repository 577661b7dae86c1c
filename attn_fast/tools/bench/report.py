"""Output of a bench run: the printed tables, the JSON file (every raw number) and the PNG figure."""
from __future__ import annotations

import json
import math
import pathlib

from attn_fast.tools.bench.cases import backend_label


def _number(value, form: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, form)


def _ratio(value, form: str) -> str:
    """A ratio against eager, e.g. "  3.21x"; "-" when there is none."""
    return _number(value, form) + ("x" if value else "")


def _targets_cell(targets: dict) -> str:
    """e.g. "2/3 met; missed: fwd >= 3x eager" (targets with no figure are counted as not measured)."""
    if not targets:
        return ""
    met = [name for name, target in targets.items() if target["met"]]
    missed = [name for name, target in targets.items() if target["met"] is False]
    unknown = len(targets) - len(met) - len(missed)
    cell = f"{len(met)}/{len(targets)} met"
    if missed:
        cell += "; missed: " + ", ".join(missed)
    if unknown:
        cell += f"; {unknown} not measured"
    return cell


def roofline_table(rows: list[dict]) -> str:
    """Per problem: the Triton kernels' % of the MUFU limit, measured (GPU) and predicted (static sm_90 report)."""
    header = f"{'shape/dtype/mode':<30} {'Triton measured':>15} {'predicted (static sm_90)':>25}"
    lines = ["Roofline: achieved tanh/s / (16 x SMs x SM clock)", header, "-" * len(header)]
    for row in rows:
        measured = _number(row.get("mufu_fraction"), ".0%", "not measured")
        predicted = _number(row.get("predicted_mufu_fraction"), ".0%", "not in report")
        lines.append(f"{row['group']:<30} {measured:>15} {predicted:>25}")
    return "\n".join(lines)


def op_table(result: dict) -> str:
    """One row per case: median time, speed-up against eager, on CPU the tanh elements/s (millions; a forward +
    backward counts each element twice, `cpu_limit.throughput`) and their fraction of the CPU limit, compile time,
    peak extra memory (of which "out MiB" are the call's outputs: context and, with the backward, the input
    gradients), the size of eager's [B, T, S, A] tensor, the memory saved against eager, the worst correctness error
    and the targets."""
    header = (f"{'shape/dtype/mode':<30} {'backend':<12} {'status':<6} {'median ms':>10} {'x eager':>8} "
              f"{'Melem/s':>8} {'% limit':>7} "
              f"{'compile s':>9} {'peak MiB':>9} {'out MiB':>8} {'4-D MiB':>8} {'mem saved':>9} {'max err':>8}  "
              "targets")
    lines = [header, "-" * len(header)]
    for case in result["cases"]:
        timing = case.get("timing") or {}
        memory = case.get("memory") or {}
        throughput = case.get("throughput") or {}
        errors = (case.get("check") or {}).get("errors") or {}
        status = case["status"]
        rate = throughput.get("elements_per_s")
        row = (f"{case['group']:<30} {backend_label(case['backend']):<12} {status:<6} "
               f"{_number(timing.get('median_s') and timing['median_s'] * 1e3, '10.3f'):>10} "
               f"{_ratio(case.get('speedup_vs_eager'), '7.2f'):>8} "
               f"{_number(rate and rate / 1e6, '8.1f', ''):>8} "
               f"{_number(throughput.get('cpu_limit_fraction'), '7.1%', ''):>7} "
               f"{_number(case.get('compile_s'), '9.1f', ''):>9} "
               f"{_number(memory.get('peak_extra_mib'), '9.1f'):>9} "
               f"{_number(memory.get('outputs_mib'), '8.1f', ''):>8} "
               f"{_number(memory.get('tanh_tensor_mib'), '8.1f', ''):>8} "
               f"{_ratio(case.get('memory_saved_vs_eager'), '8.1f'):>9} "
               f"{_number(max(errors.values()) if errors else None, '8.1e'):>8}  "
               f"{_targets_cell(case.get('targets') or {})}")
        lines.append(row)
        if status != "ok" and case.get("error"):
            lines.append(f"{'':<30} {'':<12} ^ {case['error']}")
        if memory.get("error"):
            lines.append(f"{'':<30} {'':<12} ^ memory: {memory['error']}")
    return "\n".join(lines)


def model_table(model: dict) -> str:
    config = model["config"]
    lines = [f"Seq2Seq '{config['name']}': vocab {config['vocab_size']}, embed {config['embed_dim']}, hidden "
             f"{config['hidden_dim']}, attention {config['attn_dim']}; B={config['batch']} S={config['src_len']} "
             f"T={config['tgt_len']}, beam {config['beam_size']}"]
    header = (f"{'decoder':<9} {'backend':<10} {'status':<6} {'train ms':>9} {'x eager':>8} {'greedy sent/s':>13} "
              f"{'x eager':>8} {'beam sent/s':>11} {'x eager':>8}")
    lines += [header, "-" * len(header)]
    for entry in model["results"]:
        if entry["status"] != "ok":
            lines.append(f"{entry['decoder']:<9} {entry['backend']:<10} failed ({entry.get('error')})")
            continue

        speedups = {name: f"{_ratio(entry.get(f'{name}_speedup_vs_eager'), '7.2f'):>8}"
                    for name in ("train", "greedy", "beam")}
        lines.append(f"{entry['decoder']:<9} {entry['backend']:<10} {'ok':<6} "
                     f"{entry['train_step']['median_s'] * 1e3:>9.1f} {speedups['train']} "
                     f"{entry['greedy_sentences_per_s']:>13.1f} {speedups['greedy']} "
                     f"{entry['beam_sentences_per_s']:>11.1f} {speedups['beam']}")
    return "\n".join(lines)


def cpu_limit_line(limit: dict) -> str:
    """One line: the CPU limit at each thread count, the vector width it ran at and the fastmath flags."""
    if not limit.get("available"):
        return limit.get("note", "CPU limit not measured")
    rates = ", ".join(f"{threads} thread(s) {entry['elements_per_s'] / 1e9:.2f}"
                      for threads, entry in sorted(limit["by_threads"].items(), key=lambda item: int(item[0])))
    packed = ", ".join(f"{name} {'/'.join(f'{count} {register}' for register, count in registers.items())}"
                       for name, registers in limit["instructions"].items() if registers)
    flags = "/".join(limit["fastmath"])
    return (f"CPU limit (score += v * (1 / (1 + eq * ek)) per element, float32, numba, fastmath {flags}): "
            f"{rates} G elements/s; {limit['vector_bits']}-bit vectors ({packed or 'no packed instructions found'})")


def scaling_table(scaling: dict) -> str:
    """The thread-scaling rows (`scaling.run_scaling_bench`): median ms and % of the CPU limit per thread count,
    the speed-up and the efficiency."""
    if not scaling.get("rows"):
        return scaling.get("note", "no thread scaling")
    counts = [str(threads) for threads in scaling["thread_counts"]]
    header = (f"{'shape/dtype/mode':<30} {'backend':<8} "
              + " ".join(f"{f'{threads} thr ms':>10} {'% limit':>7}" for threads in counts)
              + f" {'speed-up':>8} {'efficiency':>10}")
    limit_speedup = scaling.get("limit_speedup")
    title = (f"Thread scaling ({' vs '.join(counts)} threads; the CPU limit itself scaled "
             f"{_ratio(limit_speedup, '.2f').strip()} over the same counts)")
    lines = [title, header, "-" * len(header)]
    for row in scaling["rows"]:
        cells = []
        for threads in counts:
            entry = row["by_threads"].get(threads) or {}
            median = entry.get("median_s")
            cells.append(f"{_number(median and median * 1e3, '10.3f'):>10} "
                         f"{_number((entry.get('throughput') or {}).get('cpu_limit_fraction'), '7.1%', ''):>7}")
        group = f"{row['shape']}/{row['dtype']}/{row['mode']}"
        line = (f"{group:<30} {row['backend']:<8} " + " ".join(cells)
                + f" {_ratio(row.get('speedup'), '7.2f'):>8} {_number(row.get('efficiency'), '10.0%'):>10}")
        lines.append(line)
        failures = [entry.get("error") for entry in row["by_threads"].values() if entry.get("status") != "ok"]
        if row.get("error") or failures:
            lines.append(f"{'':<30} ^ {row.get('error') or failures[0]}")
    return "\n".join(lines)


def ragged_table(ragged: dict) -> str:
    """The ragged-batch rows (`ragged.run_ragged_bench`) as a text table."""
    header = (f"{'shape':<10} {'dtype':<5} {'backend':<8} {'full ms':>9} {'ragged ms':>10} {'saving':>7} "
              f"{'visible keys':>12}")
    lines = [f"Ragged batches, forward + backward (lengths {ragged['lengths']} vs all S visible)", header,
             "-" * len(header)]
    for row in ragged["rows"]:
        full, short = row["full"], row["ragged"]
        if full["status"] != "ok" or short["status"] != "ok":
            reason = full.get("error") if full["status"] != "ok" else short.get("error")
            lines.append(f"{row['shape']:<10} {row['dtype']:<5} {row['backend']:<8} failed ({reason})")
            continue
        lines.append(f"{row['shape']:<10} {row['dtype']:<5} {row['backend']:<8} {full['median_s'] * 1e3:>9.2f} "
                     f"{short['median_s'] * 1e3:>10.2f} {row['saving']:>7.0%} {row['visible_fraction']:>12.0%}")
    return "\n".join(lines)


def _load_note(machine: dict) -> str:
    """The load average at the start, and a warning when other work likely competed for the cores the run used."""
    load = machine.get("load_average_1m_start")
    if load is None:
        return ""
    note = f", load average {load:.1f}"
    cores, threads = machine.get("cpu_count") or 1, machine.get("threads") or 1
    # Only load that the cores the run left idle could not absorb slows its threads; 0.5 is the noise floor.
    if machine["device"] == "cpu" and load > max(0.5, cores - threads):
        note += (f"\nNOTE: the CPU was busy when the run started (load {load:.1f} on {cores} cores, {threads} "
                 "thread(s) here; the 1-minute average also still counts a process that just ended): multithreaded "
                 "timings, and even the ratios between backends, are unreliable under contention (many small "
                 "parallel regions suffer most); rerun on a quiet machine or with --threads 1")
    return note


def format_report(result: dict) -> str:
    machine = result["machine"]
    lines = [f"attn-fast bench ({'full' if result['settings']['full'] else 'quick'}) on {machine['device_name']}, "
             f"{machine['threads']} thread(s), torch {machine['torch']}, triton {machine['triton']}, {result['date']}"
             + _load_note(machine),
             "times: " + result["timing_method"], ""]
    skipped = (result.get("settings") or {}).get("skipped_backends") or {}
    lines += [f"not timed: {backend_label(backend)} ({reason})" for backend, reason in skipped.items()]
    if result.get("cpu_limit"):
        lines.append(cpu_limit_line(result["cpu_limit"]))
    if skipped or result.get("cpu_limit"):
        lines.append("")
    lines.append(op_table(result))
    roofline = result.get("roofline") or {}
    if roofline.get("rows"):
        lines += ["", roofline_table(roofline["rows"]), roofline["note"]]
    if result.get("model"):
        lines += ["", model_table(result["model"])]
    if result.get("ragged"):
        lines += ["", ragged_table(result["ragged"])]
    if result.get("scaling"):
        lines += ["", scaling_table(result["scaling"])]
    summary = result["summary"]
    lines += ["", f"{summary['cases']} cases: {summary['ok']} ok, {summary['failed']} failed; targets "
                  f"{summary['targets_met']} met, {summary['targets_missed']} missed, "
                  f"{summary['targets_unmeasured']} not measured; {result['wall_s']:.0f} s"]
    return "\n".join(lines)


MODE_LABELS = {"forward": "forward", "forward_backward": "forward+backward", "decode_step": "decode step",
               "prepared_step": "prepared step"}


def _markdown_time(case: dict | None, fastest: bool) -> str:
    """"19.7 ms (9.6×)" with the ratio to eager, the ratio in bold for the fastest backend of the row (none when eager
    is the fastest); "failed" or "-"."""
    if case is None:
        return "-"
    if case["status"] != "ok":
        return "failed"
    cell = f"{case['timing']['median_s'] * 1e3:.1f} ms"
    speedup = case.get("speedup_vs_eager")
    if speedup is not None and case["backend"] != "reference":
        cell += f" (**{speedup:.1f}×**)" if fastest else f" ({speedup:.1f}×)"
    return cell


def markdown_table(result: dict, source: str | None = None) -> str:
    """The README's CPU table of a run, in Markdown: one row per problem and mode, every backend's median with its
    ratio to eager (the fastest's in bold), the fused "cpu" backend's fraction of the CPU limit, and the peak extra
    memory of each backend; then the Seq2Seq rows and the thread scaling when the run has them. Every figure comes
    from `result` (a run's JSON), `source` names the file in the caption."""
    machine, settings = result["machine"], result["settings"]
    backends = list(dict.fromkeys(case["backend"] for case in result["cases"]))
    by_key = {(case["group"], case["backend"]): case for case in result["cases"]}
    groups = list(dict.fromkeys(case["group"] for case in result["cases"]))
    limit_backend = "cpu" if "cpu" in backends else None
    caption = (f"**CPU** ({machine['device_name']}, {machine['threads']} threads, torch {machine['torch']}, "
               f"{result['date']}, {'/'.join(settings['dtypes'])}, `key_lengths` mask"
               + (f"; from `{source}`" if source else "") + "; ratios against eager in parentheses):")
    header = ["shape (B, T, S, A, D)", "mode", *(backend_label(backend) for backend in backends)]
    if limit_backend:
        header.append(f"{limit_backend}: % of CPU limit")
    header.append("peak MiB (" + " / ".join(backend_label(backend) for backend in backends) + ")")
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cases = [by_key.get((group, backend)) for backend in backends]
        present = next(case for case in cases if case is not None)
        sizes = ", ".join(str(present["sizes"][key]) for key in "BTSAD")
        timed = [case for case in cases if case is not None and case["status"] == "ok"]
        fastest = min(timed, key=lambda case: case["timing"]["median_s"], default=None)  # eager's cell has no ratio
        row = [f"{present['shape']} ({sizes})", MODE_LABELS.get(present["mode"], present["mode"])]
        row += [_markdown_time(case, case is fastest) for case in cases]
        if limit_backend:
            fraction = ((by_key.get((group, limit_backend)) or {}).get("throughput") or {}).get("cpu_limit_fraction")
            row.append(_number(fraction, ".0%"))
        peaks = [((case or {}).get("memory") or {}).get("peak_extra_mib") for case in cases]
        row.append(" / ".join(_number(peak, ".1f") for peak in peaks))
        lines.append("| " + " | ".join(row) + " |")
    if result.get("cpu_limit"):
        lines += ["", cpu_limit_line(result["cpu_limit"])]
    if result.get("model"):
        lines += ["", markdown_model_table(result["model"])]
    if (result.get("scaling") or {}).get("rows"):
        lines += ["", markdown_scaling_table(result["scaling"])]
    return "\n".join(lines)


def _with_ratio(text: str, entry: dict, metric: str) -> str:
    """A model figure with its speed-up against the eager model of the same decoder, e.g. "812.0 ms (1.42×)"."""
    speedup = entry.get(f"{metric}_speedup_vs_eager")
    return text if speedup is None or entry["backend"] == "reference" else f"{text} ({speedup:.2f}×)"


def markdown_model_table(model: dict) -> str:
    """The Seq2Seq rows in Markdown: train step, greedy and beam throughput per decoder and backend."""
    config = model["config"]
    lines = [f"Seq2Seq '{config['name']}' (vocabulary {config['vocab_size']}, embed {config['embed_dim']}, hidden "
             f"{config['hidden_dim']}, attention {config['attn_dim']}; B={config['batch']}, S={config['src_len']}, "
             f"T={config['tgt_len']}, beam {config['beam_size']}):", "",
             "| decoder | backend | train step | greedy sentences/s | beam sentences/s |", "|---|---|---|---|---|"]
    for entry in model["results"]:
        if entry["status"] != "ok":
            lines.append(f"| {entry['decoder']} | {backend_label(entry['backend'])} | failed | - | - |")
            continue

        cells = [_with_ratio(f"{entry['train_step']['median_s'] * 1e3:.1f} ms", entry, "train"),
                 _with_ratio(f"{entry['greedy_sentences_per_s']:.1f}", entry, "greedy"),
                 _with_ratio(f"{entry['beam_sentences_per_s']:.1f}", entry, "beam")]
        lines.append(f"| {entry['decoder']} | {backend_label(entry['backend'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_scaling_table(scaling: dict) -> str:
    """The thread-scaling rows in Markdown: median per thread count, speed-up and the CPU limit's own speed-up."""
    counts = [str(threads) for threads in scaling["thread_counts"]]
    lines = [f"Thread scaling (the CPU limit itself: {_ratio(scaling.get('limit_speedup'), '.2f').strip()} from "
             f"{counts[0]} to {counts[-1]} threads):", "",
             "| shape | mode | backend | " + " | ".join(f"{threads} thread(s)" for threads in counts)
             + " | speed-up |", "|" + "---|" * (4 + len(counts))]
    for row in scaling["rows"]:
        cells = []
        for threads in counts:
            median = (row["by_threads"].get(threads) or {}).get("median_s")
            cells.append(_number(median and median * 1e3, ".1f") + (" ms" if median else ""))
        lines.append(f"| {row['shape']} | {MODE_LABELS.get(row['mode'], row['mode'])} | {row['backend']} | "
                     + " | ".join(cells) + f" | {_ratio(row.get('speedup'), '.2f')} |")
    return "\n".join(lines)


def _strict_json(value):
    """The result with non-finite floats (an error of inf for NaN output) as strings: valid, strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def write_json(result: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict_json(result), indent=1, default=str, allow_nan=False) + "\n")


def write_plot(result: dict, path: pathlib.Path) -> None:
    """Speed-up against eager (top) and peak extra memory (bottom, with the eager 4-D tensor marked) per problem
    and backend; a third panel with the model's speed-ups when the model was benchmarked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display; called from a CLI or a test
    from matplotlib import pyplot as plt

    cases = result["cases"]
    groups = list(dict.fromkeys(case["group"] for case in cases))
    backends = list(dict.fromkeys(case["backend"] for case in cases))
    by_key = {(case["group"], case["backend"]): case for case in cases}
    model_results = [r for r in (result.get("model") or {}).get("results", []) if r["status"] == "ok"]
    panels = 3 if model_results else 2
    figure, axes = plt.subplots(panels, 1, figsize=(max(8, 1.4 * len(groups) + 3), 4 * panels), squeeze=False)
    axes = axes[:, 0]
    width = 0.8 / max(1, len(backends))
    positions = range(len(groups))
    for index, backend in enumerate(backends):
        offsets = [p + (index - (len(backends) - 1) / 2) * width for p in positions]
        speedups = [by_key.get((g, backend), {}).get("speedup_vs_eager") or 0 for g in groups]
        peaks = [max((by_key.get((g, backend), {}).get("memory") or {}).get("peak_extra_mib") or 0, 0) for g in groups]
        axes[0].bar(offsets, speedups, width, label=backend_label(backend))
        axes[1].bar(offsets, peaks, width, label=backend_label(backend))
    tanh_mib = [next((c["memory"]["tanh_tensor_mib"] for c in cases if c["group"] == g and c.get("memory")), None)
                for g in groups]
    if any(tanh_mib):
        axes[1].scatter([p for p, m in zip(positions, tanh_mib) if m], [m for m in tanh_mib if m], marker="_",
                        s=600, color="black", label="eager [B,T,S,A] tensor", zorder=3)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("speed-up vs eager (x)")
    axes[1].set_ylabel("peak extra memory (MiB)")
    for axis in axes[:2]:
        axis.set_xticks(list(positions))
        axis.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    if any((c.get("speedup_vs_eager") or 0) > 0 for c in cases):
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if any(((c.get("memory") or {}).get("peak_extra_mib") or 0) > 0 for c in cases):
        axes[1].set_yscale("log")
    axes[0].set_title(f"attn-fast bench on {result['machine']['device_name']} ({result['machine']['threads']} "
                      f"threads), {result['date']}", fontsize=10)
    if model_results:
        labels = [f"{r['decoder']}/{r['backend']}" for r in model_results]
        metrics = ("train_speedup_vs_eager", "greedy_speedup_vs_eager", "beam_speedup_vs_eager")
        metric_width = 0.8 / len(metrics)
        for index, metric in enumerate(metrics):
            offsets = [p + (index - 1) * metric_width for p in range(len(labels))]
            axes[2].bar(offsets, [r.get(metric) or 0 for r in model_results], metric_width,
                        label=metric.removesuffix("_speedup_vs_eager"))
        axes[2].axhline(1.0, color="grey", linewidth=0.8)
        axes[2].set_xticks(range(len(labels)))
        axes[2].set_xticklabels(labels, fontsize=8)
        axes[2].set_ylabel("Seq2Seq speed-up vs eager (x)")
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
