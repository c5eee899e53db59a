"""Stored results -> markdown tables and PNG plots, and the regression check against a baseline.

    stt-fast bench report [DIR]                           tables (stdout or --markdown) and plots
    stt-fast bench report [DIR] --baseline OLD.json       compare the newest run with OLD.json; exit 1 on
                                                          a slowdown or accuracy loss beyond the threshold
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stt_fast.files import atomic_output, refuse_to_replace, write_text_atomic


def load_results(root: str | os.PathLike, *, include_selftest: bool = False) -> list[dict]:
    """Every result JSON under root (a folder) or root itself (a file), oldest first. The short runs of
    `stt-fast selftest` (purpose "selftest") are left out of a folder's results unless include_selftest:
    a quick batch-1 check must never stand in for a machine's full run."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.json"))
    include_selftest = include_selftest or root.is_file()
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable benchmark result: {e}") from e
        if isinstance(data, dict) and data.get("schema") and "results" in data and "machine" in data:
            if data.get("purpose") == "selftest" and not include_selftest:
                continue
            data["_path"] = str(f)
            results.append(data)
    return sorted(results, key=lambda r: r["created"])


def latest(results: list[dict]) -> dict[tuple[str, str], dict]:
    """The newest run per (machine, config)."""
    out: dict[tuple[str, str], dict] = {}
    for r in results:
        out[(r["machine"]["slug"], r["config_name"])] = r
    return out


def _machine_line(r: dict) -> str:
    m = r["machine"]
    if m.get("gpu"):
        g = m["gpu"]
        device = f"{g['name']} (sm {g['compute_capability']}), driver {m.get('driver')}, CUDA {m.get('cuda')}"
    else:
        isa = f"; {', '.join(m['cpu_isa'])}" if m.get("cpu_isa") else ""
        device = f"{m['cpu']}, {m['cpu_count']} cores (CPU{isa})"
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "onnxruntime", "openvino", "tensorrt") if m.get(k))
    c = r["ceilings"]
    return (f"{device}; {versions}; measured peak {c['matmul_tflops']} TFLOP/s ({c['matmul_dtype']} "
            f"{c['matmul_size']}^3 matmul), copy {c['copy_gbps']} GB/s")


def timed(record: dict | None) -> list[dict]:
    """The batch entries of a record that were timed (not failed)."""
    return [b for b in (record or {}).get("batches", []) if "timing" in b]


def precision_family(precision: str) -> str:
    return precision if precision in ("fp32", "int8") else "half"


def fastest_peers(records: list[dict]) -> dict[tuple[str, int], tuple[float, str]]:
    """(precision family, batch) -> (median ms, backend) of the fastest peer measured."""
    fastest: dict[tuple[str, int], tuple[float, str]] = {}
    for rec in records:
        if rec.get("role") != "peer":
            continue
        for b in timed(rec):
            key = (precision_family(rec["precision"]), b["batch"])
            if key not in fastest or b["timing"]["median_ms"] < fastest[key][0]:
                fastest[key] = (b["timing"]["median_ms"], rec["backend"])
    return fastest


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(results: list[dict]) -> str:
    """One table per (machine, config), newest run each."""
    parts = []
    for (slug, config_name), r in sorted(latest(results).items()):
        gflops = r["model"]["flops_per_clip"] / 1e9
        program = r["model"].get("program_flops_per_clip")
        executed = f" (stt_fast's program executes {program / 1e9:.2f})" if program else ""
        parts.append(f"### {slug} / {config_name} ({r['created'][:10]})\n\n{_machine_line(r)}. "
                     f"Model: {r['model']['parameters'] / 1e6:.2f} M parameters, {gflops:.2f} GFLOPs per clip"
                     f"{executed}.\n")
        bound = any("fraction_of_bound" in b for rec in r["results"] for b in timed(rec))
        parts.append("| backend | role | batch | median ms | p90 ms | p99 ms | clips/s | vs eager-fp32 | "
                     "vs fastest peer | % of peak |" + (" % of bound |" if bound else "") +
                     " first call ms | rel. error | top-1 agree |")
        parts.append("|---|---|" + "---:|" * (11 + bound))
        notes, noisy = [], []
        for rec in r["results"]:
            if "batches" not in rec:
                notes.append(f"- {rec['backend']}: {rec.get('skipped') or rec.get('error')}")
                continue
            for b in rec["batches"]:
                if "timing" not in b:
                    notes.append(f"- {rec['backend']} batch {b['batch']}: FAILED: {b.get('error')}")
                    continue
                t = b["timing"]
                flag = " (noisy)" if b.get("noisy") else ""
                if b.get("noisy"):
                    noisy.append(f"{rec['backend']} batch {b['batch']}: {b['noisy']}")
                peer = _ratio(b.get("vs_fastest_peer"))
                parts.append(
                    f"| {rec['backend']}{flag} | {rec.get('role', '')} | {b['batch']} | {t['median_ms']:.2f} | "
                    f"{t['p90_ms']:.2f} | {t['p99_ms']:.2f} | {b['clips_per_second']:.1f} | "
                    f"{_ratio(b.get('speedup_vs_eager_fp32'))} | {peer} | {100 * b['fraction_of_peak']:.1f}% |"
                    + (f" {100 * b['fraction_of_bound']:.1f}% |" if bound and "fraction_of_bound" in b else
                       " |" if bound else "")
                    + f" {b['first_call_ms']:.0f} | {b['accuracy']['relative_error']:.1e} | "
                      f"{b['accuracy']['top1_agreement']:.3f} |")
            if rec.get("notes"):
                same = (f"; the same engine and graph as {rec['same_as']} on this machine, not a second one"
                        if rec.get("same_as") else "")
                notes.append(f"- {rec['backend']}: built in {rec['build_seconds']:.1f} s; {rec['notes']}{same}")
        peers = fastest_peers(r["results"])
        if peers:
            parts.append("\nFastest peer per batch size (what \"vs fastest peer\" divides by, same precision "
                         "family): " + "; ".join(f"batch {batch} {family}: {name} {ms:.2f} ms"
                                                for (family, batch), (ms, name) in sorted(peers.items())) + ".")
        labelled = [rec for rec in r["results"] if "labelled" in rec]
        if labelled:
            parts.append(f"\nLabelled set ({r.get('labelled_samples')} clips):\n")
            parts.append("| backend | WAR | UAR | WAR - reference | UAR - reference |")
            parts.append("|---|---:|---:|---:|---:|")
            for rec in labelled:
                lab = rec["labelled"]
                parts.append(f"| {rec['backend']} | {lab['war']:.4f} | {lab['uar']:.4f} | "
                             f"{lab.get('war_minus_reference', 0):+.4f} | {lab.get('uar_minus_reference', 0):+.4f} |")
        if noisy:
            notes.append(f"- noisy measurements ({r.get('noise_rule', 'spread or ceiling')}): " + "; ".join(noisy))
        if notes:
            parts.append("\n" + "\n".join(notes))
        analysis = _analysis(r)
        if analysis:
            parts.append(f"\n{analysis}")
        parts.append("")
    return "\n".join(parts)


def _analysis(result: dict) -> str:
    """The maintainers' reading of a machine's runs, kept beside its results as <config>.notes.md (what
    was tried, measured, and what stands in the way of a target)."""
    if "_path" not in result:
        return ""
    notes = Path(result["_path"]).parent / f"{result['config_name']}.notes.md"
    return notes.read_text().strip() if notes.is_file() else ""


PLOT_FILES = ("latency_vs_batch.png", "speedup.png", "accuracy.png")


def plots(results: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """latency_vs_batch.png (a panel per backend, a line per machine), speedup.png, accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    runs = latest(results)
    backends = sorted({rec["backend"] for r in runs.values() for rec in r["results"] if timed(rec)})
    written = []

    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    # every plot names the machines and dates its numbers come from
    provenance = "; ".join(f"{slug} ({config_name}), {r['created'][:10]}" for (slug, config_name), r in
                           sorted(runs.items()))

    def save(fig, name):
        fig.text(0.995, 0.005, f"measured: {provenance}", ha="right", va="bottom", fontsize=6, color="0.35")
        path = out_dir / name
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
        plt.close(fig)
        written.append(path)

    cols = min(3, max(1, len(backends)))
    rows = (len(backends) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, backend in zip(axes.flat, backends):
        for (slug, config_name), r in sorted(runs.items()):
            rec = next((x for x in r["results"] if x["backend"] == backend and timed(x)), None)
            if rec:
                ax.plot([b["batch"] for b in timed(rec)], [b["timing"]["median_ms"] for b in timed(rec)],
                        marker="o", label=f"{slug} / {config_name}")
        ax.set(title=backend, xlabel="batch", ylabel="median latency (ms)", xscale="log", yscale="log")
        batches = sorted({b["batch"] for r in runs.values() for x in r["results"] if x["backend"] == backend
                          for b in timed(x)})
        ax.set_xticks(batches)  # a tick at each measured batch size (8 included), plain numbers
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())  # log minor labels ("3x10^0 4x10^0") overlapped
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(backends):]:
        ax.axis("off")
    fig.tight_layout()
    save(fig, "latency_vs_batch.png")

    for name, key, ylabel, log in (("speedup.png", "speedup_vs_eager_fp32", "speed-up over eager-fp32", False),
                                   ("accuracy.png", "relative_error", "logits relative error", True)):
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(backends) * max(1, len(runs))), 3.8))
        width = 0.8 / max(1, len(runs))
        for i, ((slug, config_name), r) in enumerate(sorted(runs.items())):
            values = []
            for backend in backends:
                rec = next((x for x in r["results"] if x["backend"] == backend and timed(x)), None)
                b = timed(rec)[-1] if rec else None  # the largest batch
                value = (b["accuracy"][key] if key == "relative_error" else b.get(key)) if b else None
                values.append(value)
            positions = [j + i * width for j in range(len(backends))]
            # an exact 0 has no place on a log axis: no bar, a label saying so (not a bar at 1e-12)
            drawn = [float("nan") if v is None or (log and v == 0) else v for v in values]
            ax.bar(positions, drawn, width, label=f"{slug} / {config_name}")
            for x, v in zip(positions, values):
                if log and v == 0:
                    ax.annotate("0 (exact)", (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                fontsize=6, rotation=90, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(backends))], backends, rotation=30, ha="right")
        ax.set(ylabel=f"{ylabel} (largest batch)", yscale="log" if log else "linear")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, name)
    return written


# Two runs whose measured matmul peaks differ more than this are not compared at all: scaling by the peak
# is a first-order correction (a compute-bound model), not a way to compare different machines.
COMPARABLE_PEAK_RATIO = 2.0


def peak_ratio(current: dict, baseline: dict) -> float:
    """This run's measured matmul peak over the baseline's: how much faster this machine was measured to be.
    ValueError when the two runs cannot be compared (another kind of device, or peaks over 2x apart)."""
    devices = current["machine"].get("device"), baseline["machine"].get("device")
    if devices[0] != devices[1]:
        raise ValueError(f"this run is on {devices[0]}, the baseline on {devices[1]}: compare runs of one machine")
    now, then = current["ceilings"]["matmul_tflops"], baseline["ceilings"]["matmul_tflops"]
    ratio = now / then
    if not 1 / COMPARABLE_PEAK_RATIO <= ratio <= COMPARABLE_PEAK_RATIO:
        raise ValueError(f"the machines differ too much to compare: measured matmul peak {now:.4g} TFLOP/s in this "
                         f"run vs {then:.4g} in the baseline ({ratio:.2f}x; over {COMPARABLE_PEAK_RATIO:.0f}x apart). "
                         "Compare runs of the same machine, measured when it was quiet")
    return ratio


def compare(current: dict, baseline: dict, threshold: float = 0.10) -> list[str]:
    """Regressions of current against baseline; [] when none. A regression is: a backend or batch size
    measured in the baseline that is missing from the current run or failed there (skipped as
    unavailable, errored); a median latency more than `threshold` slower once scaled by the two runs'
    measured matmul peaks (peak_ratio: a busier or slower machine is not a regression); a lower top-1
    agreement; a relative error above both 2x the baseline's and 1e-6."""
    speed = peak_ratio(current, baseline)
    found = []
    now = {r["backend"]: r for r in current["results"]}
    for old_record in baseline["results"]:
        name = old_record["backend"]
        if "batches" not in old_record:
            continue  # not measured in the baseline either
        record = now.get(name)
        if record is None:
            found.append(f"{name}: measured in the baseline, missing from this run")
            continue
        if "batches" not in record:
            found.append(f"{name}: measured in the baseline, not in this run "
                         f"({record.get('error') or record.get('skipped')})")
            continue
        batches = {b["batch"]: b for b in record["batches"]}
        for old in old_record["batches"]:
            where = f"{name} batch {old['batch']}"
            b = batches.get(old["batch"])
            if b is None or "timing" not in old:
                if b is None:
                    found.append(f"{where}: measured in the baseline, missing from this run")
                continue
            if "timing" not in b:
                found.append(f"{where}: failed in this run ({b.get('error')})")
                continue
            new_ms, old_ms = b["timing"]["median_ms"] * speed, old["timing"]["median_ms"]
            if new_ms > old_ms * (1 + threshold):
                scaled = f" scaled by the peak ratio {speed:.2f}" if abs(speed - 1) > 1e-9 else ""
                found.append(f"{where}: median {new_ms:.3f} ms{scaled} vs {old_ms:.3f} ms "
                             f"(+{100 * (new_ms / old_ms - 1):.1f}% > {100 * threshold:.0f}%)")
            if b["accuracy"]["top1_agreement"] < old["accuracy"]["top1_agreement"]:
                found.append(f"{where}: top-1 agreement {b['accuracy']['top1_agreement']:.3f} vs "
                             f"{old['accuracy']['top1_agreement']:.3f}")
            new_err, old_err = b["accuracy"]["relative_error"], old["accuracy"]["relative_error"]
            if new_err > max(2 * old_err, 1e-6):
                found.append(f"{where}: relative error {new_err:.2e} vs {old_err:.2e}")
    return found


def write_report(root: str | os.PathLike, markdown_path: str | os.PathLike | None = None,
                 plots_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 include_selftest: bool = False) -> str:
    """The tables of the results under root (written to markdown_path when given) and the plots (into
    plots_dir); existing files are refused unless overwrite."""
    refuse_to_replace([markdown_path] if markdown_path else [], overwrite)
    refuse_to_replace([Path(plots_dir) / name for name in PLOT_FILES] if plots_dir else [], overwrite)
    results = load_results(root, include_selftest=include_selftest)
    if not results:
        raise ValueError(f"no benchmark results under {root}: run `make bench` (or `stt-fast bench`) to make some, "
                         "or read the committed ones: `stt-fast bench report benchmarks/results`")
    text = markdown(results)
    if markdown_path:
        write_text_atomic(markdown_path, text)
    if plots_dir:
        plots(results, plots_dir)
    return text
