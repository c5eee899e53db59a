"""stt-fast: run, check, export, benchmark and train STT, the Spatio-Temporal Transformer for dynamic
facial expression recognition.

Each subcommand's work lives in its own module; here the options are parsed and checked. Errors a user
can fix (bad paths, bad files, bad options) print one line and exit with status 2; anything else prints
one line and exits with status 1 (STT_FAST_DEBUG=1 shows the traceback). No command prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stt_fast.config import DEFAULT_PRESET, PRESETS

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)  # BadClipError, CheckpointError, ValidationError... are ValueErrors


# --- option types: checked at parse time, so that a bad value fails before any work ---------------------

def _number(convert, accept, expected: str):
    """An argparse type: convert the text, and refuse it (naming what was expected) unless accept(value)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def int_list(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; every value a positive integer."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return values


def crop_scale(text: str) -> tuple[float, float]:
    """'MIN:MAX' with 0 < MIN <= MAX <= 1."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 0 < low <= high <= 1:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 < MIN <= MAX <= 1, got {text!r}")
    return low, high


def device_name(text: str) -> str:
    """A device this machine has (cpu, cuda, cuda:N), checked at parse time so that nothing starts (and
    nothing is written) for a device that is not there."""
    from stt_fast.devices import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def batch_range(text: str) -> str:
    from stt_fast.export.onnx_export import BatchRange

    try:
        return str(BatchRange.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- commands ------------------------------------------------------------------------------------------

NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime", "openvino", "ray")


def _setup_logging(quiet: bool) -> None:
    """stt_fast's stage messages (INFO) on stderr, unless --quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the messages name their source ("stt_fast.compile: ...")
    logger = logging.getLogger("stt_fast")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # the exporter's libraries log hundreds of INFO lines per export around stt_fast's few
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_info(args: argparse.Namespace) -> int:
    from stt_fast.config import get_config
    from stt_fast.environment import environment_info
    from stt_fast.flops import model_cost, program_flops

    config = get_config(args.config)
    cost = model_cost(config)
    compiled_flops = program_flops(config)
    report = {
        "config_name": args.config,
        "config": config.to_dict(),
        "tokens": {"frames": config.num_frames, "patches_per_frame": config.num_patches,
                   "sequence_length": config.num_tokens, "head_dim": config.head_dim},
        "parameters": cost.parameters,
        "gflops_per_clip": round(cost.flops_per_clip / 1e9, 3),
        "gflops_per_clip_backbone": round(cost.backbone_flops_per_clip / 1e9, 3),
        "gflops_per_clip_transformer": round(cost.transformer_flops_per_clip / 1e9, 3),
        "gflops_per_clip_compiled_program": round(compiled_flops / 1e9, 3),
        "environment": environment_info(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"config {args.config}:")
    for key, value in report["config"].items():
        print(f"  {key:16s} {value}")
    t = report["tokens"]
    print(f"tokens: T={t['frames']} x N={t['patches_per_frame']} + cls = L={t['sequence_length']}, "
          f"head dim {t['head_dim']}")
    print(f"parameters: {cost.parameters:,} ({cost.parameters / 1e6:.2f} M)")
    print(f"FLOPs per clip: {cost.flops_per_clip / 1e9:.2f} G (backbone {cost.backbone_flops_per_clip / 1e9:.2f} G, "
          f"transformer {cost.transformer_flops_per_clip / 1e9:.2f} G; 2 FLOPs per multiply-add)")
    print(f"FLOPs per clip executed by stt_fast.compile's program (last block pruned, layers folded): "
          f"{compiled_flops / 1e9:.2f} G")
    env = report["environment"]
    print("environment:")
    print(f"  python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), {env['platform']}")
    print(f"  cpu: {env['cpu']} ({env['cpu_count']} cores)")
    for i, gpu in enumerate(env["gpus"]):
        print(f"  gpu {i}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
              f"{gpu['memory_gib']} GiB, driver {env['driver']}")
    if not env["gpus"]:
        print("  gpu: none")
    for name in ("triton", "onnx", "onnxruntime", "openvino", "tensorrt"):
        print(f"  {name}: {env.get(name) or 'not installed'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import export_checkpoint

    graphs = export_checkpoint(args.checkpoint, args.output, fp16=args.fp16, opset=args.opset, batch=args.batch,
                               input_dtype="uint8" if args.uint8 else "float32", attention_op=args.attention_op,
                               simplify=not args.no_simplify, overwrite=args.force, progress=not args.quiet)
    return 0 if all(g.passed for g in graphs) else 1


def _cmd_build(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import build_from_onnx

    sidecar = build_from_onnx(args.onnx, args.output, checkpoint=args.checkpoint, batch=args.batch,
                              workspace_gib=args.workspace_gib, optimization_level=args.opt_level,
                              timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                              hardware_compatibility=args.hardware_compatibility,
                              overwrite=args.force, progress=not args.quiet)
    return 0 if sidecar["accuracy"] is None or sidecar["accuracy"]["passed"] else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import check_engine

    return 0 if check_engine(args.engine, args.checkpoint).passed else 1


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from stt_fast.export.triton_server import write_triton_repository

    path = write_triton_repository(args.model, args.output, name=args.name, max_batch_size=args.max_batch,
                                   max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                   instance_kind=args.instance_kind, overwrite=args.force)
    print(f"[triton-repo] wrote {path} (version {path.name} of model {path.parent.name})")
    if (path.parent / "config.pbtxt").read_text().startswith("# A version-compatible"):
        print("[triton-repo] a version-compatible plan: start tritonserver with "
              "--backend-config=tensorrt,version-compatible=true")
    return 0


def _datasets(args, config, *, train_split: bool):
    from stt_fast.data.datasets import ClipDataset, class_folder_items, dfew_items

    problems: list[str] = []
    if args.layout == "dfew":  # a missing or unreadable clip is skipped and reported, never fatal (README)
        eval_items = dfew_items(args.data, args.fold, "test", skip_missing=True, problems=problems)
        train_items = dfew_items(args.data, args.fold, "train", skip_missing=True, problems=problems) \
            if train_split else None
    else:
        eval_items = class_folder_items(f"{args.data}/{args.eval_split}")
        train_items = class_folder_items(f"{args.data}/{args.train_split}") if train_split else None
    for problem in problems:
        print(f"[data] skipped: {problem}", file=sys.stderr)
    common = dict(num_frames=config.num_frames, image_size=config.image_size)
    eval_set = ClipDataset(eval_items, train=False, skip_bad=True, **common)
    eval_set.problems = problems
    if not train_split:
        return eval_set
    return ClipDataset(train_items, train=True, skip_bad=True, crop_scale=tuple(args.crop_scale), **common), eval_set


# Options of `train` that are part of what the run learns: recorded in run.json, restored by --resume.
TRAIN_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "momentum": "momentum",
                 "weight_decay": "weight_decay", "lr_step": "lr_step", "lr_gamma": "lr_gamma",
                 "lambda_compact": "lambda_compact", "optimizer": "optimizer", "clip_grad": "clip_grad_norm",
                 "metric": "metric", "workers": "workers", "seed": "seed"}
TRAIN_SETUP = ("config", "init", "backbone_weights", "layout", "fold", "train_split", "eval_split", "crop_scale")


def _cmd_train(args: argparse.Namespace) -> int:
    from stt_fast.checkpoint import load_checkpoint, load_torchvision_resnet18
    from stt_fast.config import get_config
    from stt_fast.model import STT
    from stt_fast.training import TrainOptions, read_run, train

    if args.resume:  # the run's own options, except those given again on this command line
        saved = read_run(args.output)
        for dest, field in TRAIN_OPTIONS.items():
            if dest not in args.given and field in saved["options"]:
                setattr(args, dest, saved["options"][field])
        args.no_amp = not saved["options"].get("amp", True) if "no_amp" not in args.given else args.no_amp
        for dest in TRAIN_SETUP:
            if dest not in args.given and dest in saved.get("setup", {}):
                setattr(args, dest, saved["setup"][dest])
    if args.init:
        model = load_checkpoint(args.init).train()
    else:
        model = STT(get_config(args.config))
    if args.backbone_weights:
        load_torchvision_resnet18(model, args.backbone_weights)
    train_set, eval_set = _datasets(args, model.config, train_split=True)
    options = TrainOptions(amp=not args.no_amp, **{field: getattr(args, dest) for dest, field in TRAIN_OPTIONS.items()})
    setup = {dest: getattr(args, dest) for dest in TRAIN_SETUP}
    print(f"[train] {len(train_set)} training clips, {len(eval_set)} evaluation clips, config "
          f"{model.config.to_json()}")
    history = train(model, train_set, eval_set, options, args.output, device=args.device, resume=args.resume,
                    setup=setup, progress=not args.quiet)
    best = max(history, key=lambda r: r[options.metric])
    print(f"[train] best epoch {best['epoch']}: WAR {best['war']:.4f}, UAR {best['uar']:.4f}; "
          f"checkpoint {args.output}/best.safetensors")
    return 0


def _load_predictor(args):
    from stt_fast.predictors import load_predictor

    return load_predictor(args.backend, checkpoint=args.checkpoint, onnx=args.onnx, engine=args.engine,
                          device=args.device)


def _cmd_eval(args: argparse.Namespace) -> int:
    from stt_fast.files import refuse_to_replace
    from stt_fast.metrics import plot_confusion_matrix
    from stt_fast.training import evaluate

    refuse_to_replace([args.confusion_png] if args.confusion_png else [], args.force)  # before minutes of work
    predictor = _load_predictor(args)
    dataset = _datasets(args, predictor.config, train_split=False)
    result = evaluate(predictor, dataset, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    result["backend"] = predictor.name
    for item in result["bad_clips"]:  # (missing ones were reported as the set was read)
        print(f"stt-fast eval: skipped: {item['path']}: {item['error']}", file=sys.stderr)
    result["bad_clips"] = [{"path": None, "error": p} for p in dataset.problems] + result["bad_clips"]
    if args.confusion_png:
        plot_confusion_matrix(result["confusion_matrix"], args.confusion_png, title=predictor.name)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        left_out = f", {len(result['bad_clips'])} unreadable left out" if result["bad_clips"] else ""
        print(f"{predictor.name}: WAR {result['war']:.4f}  UAR {result['uar']:.4f}  ({result['samples']} clips"
              f"{left_out})")
        for name, recall in result["per_class_recall"].items():
            print(f"  {name:9s} recall {recall:.4f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from stt_fast.predict import predict_paths

    predictor = _load_predictor(args)
    results = predict_paths(args.paths, predictor, detect_face=args.detect_face, batch_size=args.batch_size,
                            no_face=args.no_face)
    for r in results:
        for warning in r.get("warnings", []):
            print(f"stt-fast predict: warning: {r['path']}: {warning}", file=sys.stderr)
        if "error" in r:
            print(f"stt-fast predict: error: {r['error']}", file=sys.stderr)
        if "skipped" in r:
            print(f"stt-fast predict: skipped: {r['skipped']}", file=sys.stderr)
        if args.json:
            entry = {"path": r["path"]}
            if "error" in r or "skipped" in r:
                entry |= {k: r[k] for k in ("error", "skipped") if k in r}
            else:
                entry |= {"label": r["label"], "probabilities": r["probabilities"], "warnings": r["warnings"]}
            print(json.dumps(entry), flush=True)
        elif "error" not in r and "skipped" not in r:
            top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
            print(f"{r['path']}: {r['label']} ({', '.join(f'{k} {v:.3f}' for k, v in top)})", flush=True)
    failed = sum("error" in r for r in results)
    if failed:
        print(f"stt-fast predict: {failed} of {len(results)} path(s) could not be read", file=sys.stderr)
    return 2 if failed else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    config = SynthConfig(clips_per_class=args.clips_per_class, image_size=args.size, min_frames=args.min_frames,
                         max_frames=args.max_frames, video_fraction=args.video_fraction, seed=args.seed)
    root = write_synthetic_dfew(args.output, config, progress=not args.quiet, overwrite=args.force)
    print(f"[synth] wrote {7 * args.clips_per_class} clips in the DFEW layout under {root}")
    return 0


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
            raise ValueError(f"no benchmark results under {args.current or root}")
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


def _cmd_cache(args: argparse.Namespace) -> int:
    import datetime

    from stt_fast import cache

    if args.cache_action == "clear":
        kinds = cache.KINDS if args.kind == "all" else (args.kind,)
        removed = cache.clear(kinds)
        print(f"[cache] removed {len(removed)} entries ({sum(e.nbytes for e in removed) / 2**20:.0f} MB)")
        return 0
    found = cache.entries()
    if args.json:
        print(json.dumps({"limit_bytes_per_kind": cache.limit_bytes(), "entries": [
            {"kind": e.kind, "path": str(e.path), "bytes": e.nbytes,
             "last_used": datetime.datetime.fromtimestamp(e.last_used, datetime.timezone.utc).isoformat()}
            for e in found]}, indent=2))
        return 0
    for _, folder in cache.kind_folders():
        print(cache.describe(folder))
    for e in found:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"  {e.kind:8s} {e.key}  {e.nbytes / 2**20:8.1f} MB  last used {used}")
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
                                 progress=not args.quiet, echo=(lambda line: None) if args.quiet else print)
    print((folder / "SUMMARY.md").read_text())
    skipped = [i for i in items if i.status == "skipped"]
    if skipped:
        print("skipped here:")
        for item in skipped:
            print(f"  {item.name}: {item.detail}")
    print(f"[selftest] results in {folder}; send the folder (SUMMARY.md first) to the maintainers")
    return 1 if any(i.status == "failed" for i in items) else 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    import time

    from stt_fast.annotate import annotate
    from stt_fast.progress import progress_bar

    bar = progress_bar(desc="[annotate]", total=1, enabled=not args.quiet, unit="clip")
    first: list[tuple[float, int]] = []

    def on_batch(done: int, total: int, errors: int) -> None:
        first[:] = first or [(time.perf_counter(), done)]
        rate = (done - first[0][1]) / max(time.perf_counter() - first[0][0], 1e-9)
        bar.total, bar.n = total, done
        bar.set_postfix_str(f"{rate:.1f} clips/s, {errors} unreadable")
        bar.refresh()

    result = annotate(args.source, args.output, backend=args.backend, checkpoint=args.checkpoint, onnx=args.onnx,
                      engine=args.engine, device=args.device, batch_size=args.batch_size, detect_face=args.detect_face,
                      fmt=args.format, ray_address=args.ray, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, on_batch=on_batch,
                      retry_failed=args.retry_failed)
    bar.close()
    print(f"[annotate] {result.total} clips in {args.source}: {result.skipped_done} already in {result.output}, "
          f"{result.written} annotated now ({result.errors} could not be read) in {result.seconds:.1f} s, "
          f"{result.clips_per_second:.2f} clips/s")
    if result.failed:
        print(f"stt-fast annotate: {len(result.failed)} of {result.total} clips could not be read (their rows hold "
              f"the error, e.g. {result.failed[0]}); --retry-failed tries them again", file=sys.stderr)
        return 2
    return 0


# --- the parser ----------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown once, in words, beside its help (lists as they are typed: 1,8,64 and
    MIN:MAX); none for flags, for options without a default, or where the help already says it;
    descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or (not action.option_strings
                and action.nargs not in ("?", "*"))):
            return text
        if isinstance(default, (list, tuple)):
            shown = (":" if isinstance(default, tuple) else ",").join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line on stderr and status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage messages on stderr")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data set root (DFEW layout, or AFEW-style class folders with --layout folders)")
    p.add_argument("--layout", default="dfew", choices=["dfew", "folders"], help="how the data set is laid out")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3, 4, 5], help="DFEW fold")
    p.add_argument("--train-split", default="Train", help="folders layout: the training subfolder")
    p.add_argument("--eval-split", default="Val", help="folders layout: the evaluation subfolder")
    p.add_argument("--batch-size", type=positive_int, default=32, help="clips per batch")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="data loader processes (default: up to 4)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="reference", choices=["reference", "compiled", "onnx", "tensorrt"],
                   help="reference (the PyTorch model), compiled (stt_fast.compile), onnx (ONNX Runtime on an "
                        "exported graph) or tensorrt (an engine)")
    p.add_argument("--checkpoint", help="an stt_fast checkpoint (reference and compiled backends)")
    p.add_argument("--onnx", help="an exported ONNX file (onnx backend)")
    p.add_argument("--engine", help="a TensorRT engine with its sidecar (tensorrt backend)")


def build_parser() -> argparse.ArgumentParser:
    from stt_fast import __version__

    parser = _Parser(prog="stt-fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stt-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", help="config, parameters, FLOPs per clip and the environment")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="checkpoint -> ONNX (simplified; --fp16 adds the FP16 graph), with parity")
    p.add_argument("checkpoint", help="an stt_fast checkpoint (.safetensors)")
    p.add_argument("-o", "--output", required=True, help="the float32 graph, e.g. model.onnx")
    p.add_argument("--fp16", action="store_true", help="also write MODEL.fp16.onnx for FP16 TensorRT engines")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset (default 18; 23 with --attention-op)")
    p.add_argument("--batch", type=batch_range, default="1:8:64", help="MIN:OPT:MAX batch profile recorded for "
                                                                     "the engine build")
    p.add_argument("--uint8", action="store_true", help="take uint8 clips (0-255) instead of float32")
    p.add_argument("--attention-op", action="store_true", help="ONNX Attention op (TensorRT >= 10.14)")
    p.add_argument("--no-simplify", action="store_true", help="keep the graph as exported")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    _add_quiet(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build", help="ONNX -> TensorRT engine (+ JSON sidecar)")
    p.add_argument("onnx", help="a graph written by 'stt-fast export' (usually MODEL.fp16.onnx)")
    p.add_argument("-o", "--output", required=True, help="engine file, e.g. model.engine")
    p.add_argument("--checkpoint", help="measure the engine against this checkpoint after the build")
    p.add_argument("--batch", type=batch_range, default=None,
                   help="MIN:OPT:MAX (default: the range recorded at export)")
    p.add_argument("--workspace-gib", type=positive_float, default=4.0, help="builder workspace limit")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                   help="builder optimization level")
    p.add_argument("--timing-cache", default=None, metavar="DIR",
                   help="folder of timing caches (one per TensorRT version, GPU and flags), loaded and saved")
    p.add_argument("--version-compatible", action="store_true",
                   help="runs on this TensorRT and later ones, up to the next major version")
    p.add_argument("--hardware-compatibility", default="none",
                   choices=("none", "ampere_plus", "same_compute_capability"),
                   help="none: this GPU's compute capability only; ampere_plus: any Ampere or newer discrete GPU; "
                        "same_compute_capability: any GPU of this compute capability (neither on Jetson)")
    p.add_argument("--force", action="store_true", help="replace an existing engine")
    _add_quiet(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("check", help="an engine against the reference model of a checkpoint")
    p.add_argument("engine", help="a TensorRT engine with its sidecar")
    p.add_argument("checkpoint", help="the checkpoint the engine was built from")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    p.add_argument("model", help="a TensorRT engine (with its sidecar) or an ONNX file")
    p.add_argument("-o", "--output", required=True, help="repository folder")
    p.add_argument("--name", default="stt", help="model name in the repository")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="largest batch the server forms (default: the engine's profile maximum)")
    p.add_argument("--max-queue-delay-us", type=non_negative_int, default=2000, help="dynamic batching delay")
    p.add_argument("--instances", type=positive_int, default=1, help="model instances per device")
    p.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu"),
                   help="where the server runs the model (cpu: ONNX models only)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="add the model as the next version of an existing model folder (earlier versions kept)")
    p.set_defaults(func=_cmd_triton_repo)

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
    _add_quiet(p)
    p.set_defaults(func=_cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_action", title="subcommand (optional)", metavar="report",
                                 parser_class=_Parser)
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
    kernel_sub = p.add_subparsers(dest="kernels_action", required=True, metavar="aot|plan", parser_class=_Parser)
    k = kernel_sub.add_parser("plan", help="the launches, bytes and modelled time of one forward (a model, no GPU)",
                              description="Trace one steady-state forward on fake CUDA tensors and list its kernel "
                                          "launches with their FLOPs and bytes, and the roofline time per GPU type "
                                          "plus a per-launch floor, beside the eager reference model. A model, "
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
    _add_quiet(k)
    k.set_defaults(func=_cmd_kernels)

    p = sub.add_parser("cache", help="the cache of exported graphs and engines: list it, or clear it",
                       description="Exported ONNX programs and TensorRT engines are cached under "
                                   "$XDG_CACHE_HOME/stt_fast (~/.cache/stt_fast), bounded to STT_FAST_CACHE_LIMIT_MB "
                                   "(1024 MB by default; 0: no bound) per kind, least recently used out first.")
    cache_sub = p.add_subparsers(dest="cache_action", required=True, metavar="list|clear", parser_class=_Parser)
    c = cache_sub.add_parser("list", help="every cached entry, its size and when it was last used")
    c.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    c = cache_sub.add_parser("clear", help="remove cached entries")
    c.add_argument("--kind", default="all", choices=("all", "onnx", "engines"), help="which kind of entry")
    p.set_defaults(func=_cmd_cache)

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
    _add_quiet(p)
    p.set_defaults(func=_cmd_selftest)

    p = sub.add_parser("train", help="train on a DFEW-layout (or class-folder) data set")
    _add_data_args(p)
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoints, log, confusion matrix)")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--init", help="start from this checkpoint (its config wins over --config)")
    p.add_argument("--backbone-weights", help="torchvision-format ResNet-18 weights for the backbone")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output with its recorded options (only --epochs, --workers and "
                        "--device may change)")
    p.add_argument("--epochs", type=positive_int, default=100, help="train until this epoch")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="the paper uses SGD")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay")
    p.add_argument("--lr-step", type=positive_int, default=40, help="decay the lr every this many epochs")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="lr decay factor")
    p.add_argument("--lambda-compact", type=non_negative_float, default=0.1, help="weight of the compact loss term")
    p.add_argument("--clip-grad", type=positive_float, default=None, help="clip the gradient norm to this")
    p.add_argument("--crop-scale", type=crop_scale, default=(0.08, 1.0), help="MIN:MAX area of the training crop")
    p.add_argument("--metric", default="war", choices=["war", "uar"], help="keeps the best checkpoint by this")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _add_quiet(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="WAR, UAR, per-class recall of a backend on a labelled set")
    _add_data_args(p)
    _add_backend_args(p)
    p.add_argument("--confusion-png", help="write the confusion matrix as a PNG")
    p.add_argument("--force", action="store_true", help="replace an existing --confusion-png file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quiet(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="video files or frame folders in, emotions out")
    p.add_argument("paths", nargs="+", help="video files or folders of frames")
    _add_backend_args(p)
    p.add_argument("--detect-face", action="store_true", help="detect and crop the face (OpenCV)")
    p.add_argument("--no-face", default="full", choices=("full", "skip", "error"),
                   help="with --detect-face, a clip without a face: predicted on its full frames with a warning, "
                        "skipped, or an error")
    p.add_argument("--json", action="store_true",
                   help='one JSON line per path: {"path", "label", "probabilities", "warnings"}, {"path", "error"} '
                        'or {"path", "skipped"}')
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per batch")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    _add_quiet(p)
    p.set_defaults(func=_cmd_predict)

    from . import timeline

    timeline.add_parser(sub, backend_args=_add_backend_args, device_type=device_name, positive_int=positive_int,
                        quiet_args=_add_quiet)

    p = sub.add_parser("annotate", help="label every clip of a video collection, resumably, optionally on Ray",
                       description="Label every clip of SOURCE (a folder searched recursively, a DFEW-layout data "
                                   "set, or a text file of paths) into OUTPUT (Parquet or JSON lines part files). "
                                   "Resumable: a second run skips what is written. --ray runs decoding as Ray tasks "
                                   "and inference in an actor pool (pip install 'stt-fast[ray]').")
    p.add_argument("source", help="folder, DFEW-layout data set, or text file of paths")
    _add_backend_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--format", default=None, choices=["parquet", "jsonl"],
                   help="part file format (default: parquet where pyarrow is installed, else jsonl)")
    p.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="run on Ray: 'local' starts a local cluster, 'auto' joins the running one, or a cluster "
                        "address (default: in this process, no Ray)")
    p.add_argument("--workers", type=positive_int, default=1, help="inference actors (with --ray)")
    p.add_argument("--gpus-per-worker", type=non_negative_float, default=0.0,
                   help="GPUs per actor (with --ray; 1 = one model or engine per GPU)")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs per actor (with --ray)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per batch (and per part file)")
    p.add_argument("--detect-face", action="store_true", help="detect and crop the face (OpenCV)")
    p.add_argument("--retry-failed", action="store_true",
                   help="annotate again the clips whose rows in OUT hold an error (unreadable before)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N for each worker (default: cuda when available)")
    _add_quiet(p)
    p.set_defaults(func=_cmd_annotate)

    p = sub.add_parser("synth", help="write a synthetic DFER-like data set in the DFEW layout")
    p.add_argument("output", help="folder to write (must be empty or absent)")
    p.add_argument("--clips-per-class", type=positive_int, default=60, help="clips of each of the 7 classes")
    p.add_argument("--size", type=positive_int, default=64, help="frame size in pixels")
    p.add_argument("--min-frames", type=positive_int, default=6, help="fewest frames in a clip")
    p.add_argument("--max-frames", type=positive_int, default=24, help="most frames in a clip")
    p.add_argument("--video-fraction", type=fraction, default=0.15, help="share of clips written as .mp4")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="replace an existing data set in OUTPUT whole")
    _add_quiet(p)
    p.set_defaults(func=_cmd_synth)
    parser.commands = sub.choices  # name -> subparser, for _given()
    return parser


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written on the command line (not left at their defaults)."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(token == option or token.startswith(option + "=") for token in argv):
                given.add(action.dest)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    action = (getattr(args, "bench_action", None) or getattr(args, "kernels_action", None)
              or getattr(args, "cache_action", None))
    if unknown:  # named by the (sub)command they were given to, not by the top-level parser
        command_parser = parser.commands[args.command]
        for sub in command_parser._actions:
            if action and isinstance(sub, argparse._SubParsersAction):
                command_parser = sub.choices[action]
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = f"{args.command} {action}" if action else args.command
    args.given = _given(parser.commands[args.command], argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("STT_FAST_DEBUG"):
            raise
        print(f"stt-fast {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stt-fast {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (| head)
        sys.stderr.close()
        return 0
    except Exception as e:  # anything else: one line, and the way to see more
        if os.environ.get("STT_FAST_DEBUG"):
            raise
        print(f"stt-fast {command}: error: {type(e).__name__}: {e} (STT_FAST_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
