"""The `stt-fast` command line. Each subcommand's work lives in its own module; this file only parses.

Errors a user can fix (bad paths, bad files, bad options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .config import DEFAULT_PRESET, PRESETS


def _cmd_info(args: argparse.Namespace) -> int:
    from .config import get_config
    from .environment import environment_info
    from .flops import model_cost, program_flops

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
    for name in ("triton", "onnx", "onnxruntime", "tensorrt"):
        print(f"  {name}: {env[name] or 'not installed'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import export_checkpoint

    graphs = export_checkpoint(args.checkpoint, args.output, fp16=args.fp16, opset=args.opset, batch=args.batch,
                               input_dtype="uint8" if args.uint8 else "float32", attention_op=args.attention_op,
                               simplify=not args.no_simplify)
    return 0 if all(g.passed for g in graphs) else 1


def _cmd_build(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import build_from_onnx

    sidecar = build_from_onnx(args.onnx, args.output, checkpoint=args.checkpoint, batch=args.batch,
                              workspace_gib=args.workspace_gib, optimization_level=args.opt_level,
                              timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                              hardware_compatibility="ampere_plus" if args.hardware_compatible else "none")
    return 0 if sidecar["accuracy"] is None or sidecar["accuracy"]["passed"] else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from stt_fast.export.pipeline import check_engine

    return 0 if check_engine(args.engine, args.checkpoint).passed else 1


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from stt_fast.export.triton_server import write_triton_repository

    path = write_triton_repository(args.model, args.output, name=args.name, max_batch_size=args.max_batch,
                                   max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                   overwrite=args.overwrite)
    print(f"[triton-repo] wrote {path}")
    return 0


def _datasets(args, config, *, train_split: bool):
    from stt_fast.data.datasets import ClipDataset, class_folder_items, dfew_items

    problems: list[str] = []
    if args.layout == "dfew":
        eval_items = dfew_items(args.data, args.fold, "test", skip_missing=train_split, problems=problems)
        train_items = dfew_items(args.data, args.fold, "train", skip_missing=True, problems=problems) \
            if train_split else None
    else:
        eval_items = class_folder_items(f"{args.data}/{args.eval_split}")
        train_items = class_folder_items(f"{args.data}/{args.train_split}") if train_split else None
    for problem in problems:
        print(f"[data] skipped: {problem}", file=sys.stderr)
    common = dict(num_frames=config.num_frames, image_size=config.image_size)
    eval_set = ClipDataset(eval_items, train=False, skip_bad=train_split, **common)
    if not train_split:
        return eval_set
    crop = tuple(float(x) for x in args.crop_scale.split(":"))
    return ClipDataset(train_items, train=True, skip_bad=True, crop_scale=crop, **common), eval_set


def _cmd_train(args: argparse.Namespace) -> int:
    from stt_fast.checkpoint import load_checkpoint, load_torchvision_resnet18
    from stt_fast.config import get_config
    from stt_fast.model import STT
    from stt_fast.training import TrainOptions, train

    if args.init:
        model = load_checkpoint(args.init).train()
    else:
        model = STT(get_config(args.config))
    if args.backbone_weights:
        load_torchvision_resnet18(model, args.backbone_weights)
    train_set, eval_set = _datasets(args, model.config, train_split=True)
    options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
                           lambda_compact=args.lambda_compact, optimizer=args.optimizer,
                           clip_grad_norm=args.clip_grad, metric=args.metric, workers=args.workers,
                           amp=not args.no_amp, seed=args.seed)
    print(f"[train] {len(train_set)} training clips, {len(eval_set)} evaluation clips, config "
          f"{model.config.to_json()}")
    history = train(model, train_set, eval_set, options, args.output, device=args.device, resume=args.resume)
    best = max(history, key=lambda r: r[args.metric])
    print(f"[train] best epoch {best['epoch']}: WAR {best['war']:.4f}, UAR {best['uar']:.4f}; "
          f"checkpoint {args.output}/best.safetensors")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from stt_fast.metrics import plot_confusion_matrix
    from stt_fast.predictors import load_predictor
    from stt_fast.training import evaluate

    predictor = load_predictor(args.backend, checkpoint=args.checkpoint, onnx=args.onnx, engine=args.engine,
                               device=args.device)
    dataset = _datasets(args, predictor.config, train_split=False)
    result = evaluate(predictor, dataset, batch_size=args.batch_size, workers=args.workers)
    result["backend"] = predictor.name
    if args.confusion_png:
        plot_confusion_matrix(result["confusion_matrix"], args.confusion_png, title=predictor.name)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{predictor.name}: WAR {result['war']:.4f}  UAR {result['uar']:.4f}  ({result['samples']} clips)")
        for name, recall in result["per_class_recall"].items():
            print(f"  {name:9s} recall {recall:.4f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from stt_fast.predict import predict_paths
    from stt_fast.predictors import load_predictor

    predictor = load_predictor(args.backend, checkpoint=args.checkpoint, onnx=args.onnx, engine=args.engine,
                               device=args.device)
    results = predict_paths(args.paths, predictor, detect_face=args.detect_face, batch_size=args.batch_size)
    for r in results:
        if args.json:
            entry = {"label": r["label"], "probabilities": r["probabilities"]}
            if len(results) > 1:
                entry = {"path": r["path"], **entry}
            print(json.dumps(entry))
        else:
            top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
            print(f"{r['path']}: {r['label']} ({', '.join(f'{k} {v:.3f}' for k, v in top)})")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    config = SynthConfig(clips_per_class=args.clips_per_class, image_size=args.size, min_frames=args.min_frames,
                         max_frames=args.max_frames, video_fraction=args.video_fraction, seed=args.seed)
    root = write_synthetic_dfew(args.output, config)
    print(f"[synth] wrote {7 * args.clips_per_class} clips in the DFEW layout under {root}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_action", None) == "report":
        return _cmd_bench_report(args)
    from stt_fast.benchmarks.harness import DEFAULT_RESULTS, run_suite
    from stt_fast.benchmarks.report import markdown
    from stt_fast.checkpoint import load_checkpoint

    labelled, checkpoint, name = None, args.checkpoint, None
    if args.labelled:
        from stt_fast.benchmarks.synthetic_model import labelled_test_set, synthetic_checkpoint

        if args.labelled == "synthetic":
            if checkpoint is None and args.config not in ("tiny", "tiny-joint"):
                raise ValueError("--labelled synthetic trains a tiny model: use --config tiny (or tiny-joint), "
                                 "or pass --checkpoint")
            data, trained = synthetic_checkpoint(args.config)
            if checkpoint is None:
                checkpoint, name = str(trained), f"{args.config}-trained-on-synthetic"
        else:
            data = args.labelled
        if checkpoint is None:
            raise ValueError("accuracy on a labelled set needs --checkpoint (a model trained for it)")
        labelled = labelled_test_set(data, load_checkpoint(checkpoint).config, args.fold)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    backends = args.backends.split(",") if args.backends else None
    output = None if args.no_save else (args.output or DEFAULT_RESULTS)
    result, path = run_suite(args.config, batch_sizes=batch_sizes, backends=backends, device=args.device,
                             checkpoint=checkpoint, labelled=labelled, output_dir=output,
                             min_seconds=args.min_seconds, name=name)
    print(markdown([result]))
    if path:
        print(f"[bench] result written to {path}")
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from stt_fast.benchmarks.harness import DEFAULT_RESULTS
    from stt_fast.benchmarks.report import compare, load_results, write_report

    root = args.results or DEFAULT_RESULTS
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
              f"{len(regressions)} regression(s) at threshold {args.threshold:.0%}")
        return 1 if regressions else 0
    text = write_report(root, args.markdown, args.plots)
    if not args.markdown:
        print(text)
    else:
        print(f"[bench report] wrote {args.markdown}" + (f" and plots in {args.plots}" if args.plots else ""))
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data set root (DFEW layout, or AFEW-style class folders with --layout folders)")
    p.add_argument("--layout", default="dfew", choices=["dfew", "folders"])
    p.add_argument("--fold", type=int, default=1, help="DFEW fold 1-5")
    p.add_argument("--train-split", default="Train", help="folders layout: the training subfolder")
    p.add_argument("--eval-split", default="Val", help="folders layout: the evaluation subfolder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: up to 4)")
    p.add_argument("--device", default=None)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="reference", choices=["reference", "compiled", "onnx", "tensorrt"])
    p.add_argument("--checkpoint", help="an stt_fast checkpoint (reference and compiled backends)")
    p.add_argument("--onnx", help="an exported ONNX file (onnx backend)")
    p.add_argument("--engine", help="a TensorRT engine with its sidecar (tensorrt backend)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config, parameters, FLOPs per clip and the environment")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="checkpoint -> ONNX (simplified; --fp16 adds the FP16 graph), with parity")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="the float32 graph, e.g. model.onnx")
    p.add_argument("--fp16", action="store_true", help="also write MODEL.fp16.onnx for FP16 TensorRT engines")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 23 with --attention-op)")
    p.add_argument("--batch", default="1:8:64", help="MIN:OPT:MAX batch profile recorded for the build")
    p.add_argument("--uint8", action="store_true", help="take uint8 clips (0-255) instead of float32")
    p.add_argument("--attention-op", action="store_true", help="ONNX Attention op (TensorRT >= 10.14)")
    p.add_argument("--no-simplify", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("build", help="ONNX -> TensorRT engine (+ JSON sidecar)")
    p.add_argument("onnx")
    p.add_argument("-o", "--output", required=True, help="engine file, e.g. model.engine")
    p.add_argument("--checkpoint", help="measure the engine against this checkpoint after the build")
    p.add_argument("--batch", default=None, help="MIN:OPT:MAX (default: the range recorded at export)")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5")
    p.add_argument("--timing-cache", default=None, help="timing cache file, loaded and saved")
    p.add_argument("--version-compatible", action="store_true")
    p.add_argument("--hardware-compatible", action="store_true", help="runs on any Ampere or newer GPU")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("check", help="an engine against the reference model of a checkpoint")
    p.add_argument("engine")
    p.add_argument("checkpoint")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    p.add_argument("model", help="a TensorRT engine (with its sidecar) or an ONNX file")
    p.add_argument("-o", "--output", required=True, help="repository folder")
    p.add_argument("--name", default="stt")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_triton_repo)

    p = sub.add_parser("bench", help="latency and accuracy of every backend ('bench report' for tables/plots)")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8 on a CPU; 1,8,64,256 on a GPU)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every backend; unavailable ones "
                                                    "are listed with the reason)")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", default=None, help="benchmark this model (default: random weights)")
    p.add_argument("--labelled", default=None, help="a DFEW-layout folder, or 'synthetic' (trains a tiny model)")
    p.add_argument("--fold", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each case at least this long")
    p.add_argument("--output", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_action", metavar="report")
    r = bench_sub.add_parser("report", help="markdown tables and plots of stored results; regression check")
    r.add_argument("results", nargs="?", default=None, help="results folder or file (default benchmarks/results)")
    r.add_argument("--markdown", default=None, help="write the tables to this file (default: print)")
    r.add_argument("--plots", default=None, help="write PNG plots to this folder")
    r.add_argument("--baseline", default=None, help="a stored result to compare the newest run against")
    r.add_argument("--current", default=None, help="the run to check (default: the newest under RESULTS)")
    r.add_argument("--threshold", type=float, default=0.10, help="allowed slowdown, as a fraction")

    p = sub.add_parser("train", help="train on a DFEW-layout (or class-folder) data set")
    _add_data_args(p)
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoints, log, confusion matrix)")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--init", help="start from this checkpoint (its config wins over --config)")
    p.add_argument("--backbone-weights", help="torchvision-format ResNet-18 weights for the backbone")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-step", type=int, default=40, help="decay the lr every this many epochs")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--lambda-compact", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument("--crop-scale", default="0.08:1", help="MIN:MAX area of the training crop")
    p.add_argument("--metric", default="war", choices=["war", "uar"], help="keeps the best checkpoint by this")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="WAR, UAR, per-class recall of a backend on a labelled set")
    _add_data_args(p)
    _add_backend_args(p)
    p.add_argument("--confusion-png", help="write the confusion matrix as a PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="video files or frame folders in, emotions out")
    p.add_argument("paths", nargs="+")
    _add_backend_args(p)
    p.add_argument("--detect-face", action="store_true", help="detect and crop the face (OpenCV)")
    p.add_argument("--json", action="store_true", help='one {"label": ..., "probabilities": {...}} per path')
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("synth", help="write a synthetic DFER-like data set in the DFEW layout")
    p.add_argument("output")
    p.add_argument("--clips-per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=64, help="frame size in pixels")
    p.add_argument("--min-frames", type=int, default=6)
    p.add_argument("--max-frames", type=int, default=24)
    p.add_argument("--video-fraction", type=float, default=0.15, help="share of clips written as .mp4")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # BadClipError is a ValueError
        print(f"stt-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stt-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (| head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
