"""Measuring and verifying: `stt-fast bench` (and `bench report`), `kernels plan|aot` and `selftest`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stt_fast.config import DEFAULT_PRESET, PRESETS

from .common import (
    Parser,
    add_quiet,
    device_name,
    int_list,
    name_list,
    non_negative_float,
    positive_float,
    positive_int,
)


def _cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_action", None) == "report":
        return _cmd_bench_report(args)
    from stt_fast.benchmarks.backends import resolve
    from stt_fast.benchmarks.harness import failures, run_suite
    from stt_fast.benchmarks.report import markdown
    from stt_fast.checkpoint import load_checkpoint

    resolve(args.backends)  # an unknown name fails now, not after minutes of building

    labelled, checkpoint, name = None, args.checkpoint, None
    if args.labelled:
        from stt_fast.benchmarks.synthetic_model import labelled_test_set, synthetic_checkpoint

        if args.labelled == "synthetic":
            if checkpoint is None and args.config not in ("tiny", "tiny-joint"):
                raise ValueError("--labelled synthetic trains a tiny model: use --config tiny (or tiny-joint), "
                                 "or pass --checkpoint")
            data, trained = synthetic_checkpoint(args.config, progress=not args.quiet)
            if checkpoint is None:
                checkpoint, name = str(trained), f"{args.config}-trained-on-synthetic"
        else:
            data = args.labelled
        if checkpoint is None:
            raise ValueError("accuracy on a labelled set needs --checkpoint (a model trained for it)")
        labelled = labelled_test_set(data, load_checkpoint(checkpoint).config, args.fold)
    output = None if args.no_save else args.output
    result, path = run_suite(args.config, batch_sizes=args.batch_sizes, backends=args.backends, device=args.device,
                             checkpoint=checkpoint, labelled=labelled, output_dir=output,
                             min_seconds=args.min_seconds, name=name, progress=not args.quiet)
    print(markdown([result]))
    if path:
        print(f"[bench] result written to {path}")
    problems = failures(result)
    for problem in problems:
        print(f"stt-fast bench: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from stt_fast.benchmarks.report import compare, load_results, peak_ratio, write_report

    root = args.results
    if args.baseline:
        current = load_results(args.current or root)
        if not current:
            raise ValueError(f"no benchmark results under {args.current or root}: run `make bench` (or `stt-fast "
                             "bench`), or read the committed ones: `stt-fast bench report benchmarks/results`")
        baseline = load_results(args.baseline)
        if not baseline:
            raise ValueError(f"{args.baseline} holds no benchmark result")
        regressions = compare(current[-1], baseline[-1], args.threshold)
        for line in regressions:
            print(f"REGRESSION {line}")
        print(f"[bench report] {current[-1]['_path']} vs {baseline[-1]['_path']}: "
              f"{len(regressions)} regression(s) at threshold {args.threshold:.0%}, latencies scaled by the measured "
              f"matmul peaks ({peak_ratio(current[-1], baseline[-1]):.2f}x the baseline's)")
        return 1 if regressions else 0
    text = write_report(root, args.markdown, args.plots, overwrite=args.force, include_selftest=args.include_selftest)
    if not args.markdown:
        print(text)
    else:
        print(f"[bench report] wrote {args.markdown}" + (f" and plots in {args.plots}" if args.plots else ""))
    return 0


def _cmd_kernels_plan(args: argparse.Namespace) -> int:
    from stt_fast.bounds import gpu_spec
    from stt_fast.launch_plan import launch_plan, plan_markdown, write_plan

    unknown = [g for g in args.gpus if gpu_spec(g) is None]
    if unknown:
        from stt_fast.bounds import GPUS

        raise ValueError(f"unknown GPU(s) {unknown}; stt_fast.bounds knows: {', '.join(g.name for g in GPUS)}")
    text = []
    for config_name in args.config:
        plan = launch_plan(config_name, backends=args.backend, batches=args.batch, precision=args.precision,
                           gpus=args.gpus)
        text.append(plan_markdown(plan))
        if args.output:
            json_path, md_path = write_plan(plan, args.output)
            print(f"[kernels plan] wrote {json_path} and {md_path.name}", file=sys.stderr)
    print("\n".join(text))
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    import datetime

    import triton

    from stt_fast.config import get_config
    from stt_fast.files import write_text_atomic
    from stt_fast.kernels import aot

    config = get_config(args.config)
    from stt_fast.bounds import bounds_markdown

    facts = aot.run(config, args.targets, args.dtypes, workers=args.workers, progress=not args.quiet)
    text = (f"# Kernels across GPU types ({args.config} config, Triton {triton.__version__})\n\n"
            f"## Ahead-of-time compile facts\n\n"
            f"{aot.markdown(facts, triton_version=triton.__version__, config_name=args.config)}\n\n"
            f"## Physical bounds per GPU type\n\n{bounds_markdown(config)}")
    gate = aot.check(facts)
    if args.output:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        base = Path(args.output) / "kernels-aot" / f"{stamp}-triton{triton.__version__}-{args.config}"
        write_text_atomic(f"{base}.json", json.dumps({
            "schema": 1, "created": stamp, "triton": triton.__version__, "config_name": args.config,
            "config": config.to_dict(), "targets": list(args.targets), "dtypes": list(args.dtypes),
            "gate_problems": gate, "compiles": [f.to_dict() for f in facts]}, indent=1))
        write_text_atomic(f"{base}.md", text + "\n")
        print(f"[kernels aot] wrote {base}.json and .md")
    print(text)
    return 1 if gate and args.check else 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    from stt_fast.selftest import run_selftest

    items, folder = run_selftest(args.output, device=args.device, config_name=args.config, quick=args.quick,
                                 progress=not args.quiet, seed=args.seed,
                                 echo=(lambda line: None) if args.quiet else print)
    print((folder / "SUMMARY.md").read_text())
    skipped = [i for i in items if i.status == "skipped"]
    if skipped:
        print("skipped here:")
        for item in skipped:
            print(f"  {item.name}: {item.detail}")
    print(f"[selftest] results in {folder}; send the folder (SUMMARY.md first) to the maintainers")
    return 1 if any(i.status == "failed" for i in items) else 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "bench", help="latency and accuracy of every backend beside its peers ('bench report': tables, plots)",
        usage="stt-fast bench [options]\n       stt-fast bench report [RESULTS] [options]",
        description="Time every backend this machine has (and the peers a user would run instead) on one "
                    "config and write one JSON result.\n'stt-fast bench report --help' for tables, plots and "
                    "the regression check of stored results.")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="comma-separated (default 1,8 on a CPU; 1,8,64,256 on a GPU)")
    p.add_argument("--backends", type=name_list, default=None,
                   help="comma-separated (default: every backend; unavailable ones are listed with the reason)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--checkpoint", default=None, help="benchmark this model (default: random weights)")
    p.add_argument("--labelled", default=None, help="a DFEW-layout folder, or 'synthetic' (trains a tiny model)")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3, 4, 5], help="DFEW fold of --labelled")
    p.add_argument("--min-seconds", type=positive_float, default=1.0, help="time each case at least this long")
    p.add_argument("--output", default="results", help="results folder; the project's committed results live in "
                                                        "benchmarks/results (pass it explicitly to add to them)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    add_quiet(p)
    p.set_defaults(func=_cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_action", title="subcommand (optional)", metavar="report",
                                 parser_class=Parser)
    r = bench_sub.add_parser("report", prog="stt-fast bench report",
                             help="markdown tables and plots of stored results; regression check",
                             description="Tables (stdout or --markdown) and plots of stored results, newest run "
                                         "per machine and config; with --baseline, the regression check (exit "
                                         "status 1 on a regression).")
    r.add_argument("results", nargs="?", default="results", help="results folder or file")
    r.add_argument("--markdown", default=None, help="write the tables to this file (default: print)")
    r.add_argument("--plots", default=None, help="write PNG plots to this folder")
    r.add_argument("--force", action="store_true", help="replace an existing --markdown file or plots")
    r.add_argument("--include-selftest", action="store_true",
                   help="also report the short runs of 'stt-fast selftest' (left out: they are not full runs)")
    r.add_argument("--baseline", default=None, help="a stored result to compare the newest run against")
    r.add_argument("--current", default=None, help="the run to check (default: the newest under RESULTS)")
    r.add_argument("--threshold", type=non_negative_float, default=0.10, help="allowed slowdown, as a fraction")

    p = sub.add_parser("kernels", help="facts about the Triton kernels on GPU targets, learned without a GPU",
                       description="stt-fast kernels aot: compile every kernel x launch candidate x dtype ahead "
                                   "of time for each GPU target (no GPU needed) and report registers, spills, "
                                   "shared memory and tensor-core instructions; --check fails on a problem.")
    kernel_sub = p.add_subparsers(dest="kernels_action", required=True, metavar="aot|plan", parser_class=Parser)
    k = kernel_sub.add_parser("plan", help="the launches, bytes and modelled time of one forward (a model, no GPU)",
                              description="Trace one steady-state forward on fake CUDA tensors and list its kernel "
                                          "launches with their FLOPs, bytes, grids and chains of dependent reads, and "
                                          "the modelled time per GPU type (the roofline for the share of the SMs "
                                          "a grid occupies, the chains' round trips, a per-launch floor), beside "
                                          "the eager reference model. A model, "
                                          "labelled so: `stt-fast selftest` checks it against torch.profiler on a "
                                          "GPU.")
    k.add_argument("--config", type=name_list, default=["paper"], help="comma-separated presets")
    k.add_argument("--backend", type=name_list, default=["triton", "torch"],
                   help="comma-separated: triton, torch (the eager reference is always beside them)")
    k.add_argument("--batch", type=int_list, default=[1, 8, 64], help="comma-separated batch sizes")
    k.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="compute precision")
    k.add_argument("--gpus", type=name_list, default=["H100 SXM", "A100 SXM4 80GB", "L4", "Jetson AGX Orin 64GB"],
                   help="comma-separated GPU types of stt_fast.bounds")
    k.add_argument("--output", default=None, help="also write JSON and markdown under OUTPUT/launch-plan/ "
                                                   "(the project's: benchmarks/results)")
    k.set_defaults(func=_cmd_kernels_plan)
    k = kernel_sub.add_parser("aot", help="ahead-of-time compile matrix for GPU targets")
    k.add_argument("--targets", type=name_list, default=["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90"],
                   help="comma-separated: sm_75 (T4), sm_80 (A100), sm_86 (A10), sm_87 (Jetson Orin), sm_89 (L4), "
                        "sm_90 (H100)")
    k.add_argument("--dtypes", type=name_list, default=["fp16", "bf16", "fp32"], help="comma-separated")
    k.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="the shapes to specialise for")
    k.add_argument("--output", default=None, help="also write JSON and markdown under OUTPUT/kernels-aot/ "
                                                   "(the project's: benchmarks/results)")
    k.add_argument("--workers", type=positive_int, default=None, help="compile processes (default: one per core)")
    k.add_argument("--check", action="store_true", help="exit 1 when a candidate the launch tables can choose "
                                                        "spills, overflows shared memory or misses its instructions")
    add_quiet(k)
    k.set_defaults(func=_cmd_kernels)

    p = sub.add_parser("selftest", help="verify everything this machine's GPU (or CPU) can verify; one folder out",
                       description="Kernels against references on the device, CUDA graphs, every backend with "
                                   "validation, no host syncs, the kernel microbenchmark, the benchmark suite, a "
                                   "TensorRT engine, and the compile facts of this GPU. On a machine without a GPU "
                                   "it runs the CPU parts and lists what it skipped and why.")
    p.add_argument("--device", default=None, type=device_name,
                   help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--output", default="results/selftest", help="results folder (a subfolder per machine and run)")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="the model to check")
    p.add_argument("--quick", action="store_true", help="fewer shapes and batch sizes")
    p.add_argument("--seed", type=int, default=0, help="seed of the kernel checks' random inputs (a failure "
                                                       "replays with the same seed)")
    add_quiet(p)
    p.set_defaults(func=_cmd_selftest)
