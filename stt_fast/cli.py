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
    from .flops import model_cost

    config = get_config(args.config)
    cost = model_cost(config)
    report = {
        "config_name": args.config,
        "config": config.to_dict(),
        "tokens": {"frames": config.num_frames, "patches_per_frame": config.num_patches,
                   "sequence_length": config.num_tokens, "head_dim": config.head_dim},
        "parameters": cost.parameters,
        "gflops_per_clip": round(cost.flops_per_clip / 1e9, 3),
        "gflops_per_clip_backbone": round(cost.backbone_flops_per_clip / 1e9, 3),
        "gflops_per_clip_transformer": round(cost.transformer_flops_per_clip / 1e9, 3),
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
    print(f"FLOPs per clip: {report['gflops_per_clip']:.2f} G (backbone "
          f"{report['gflops_per_clip_backbone']:.2f} G, transformer "
          f"{report['gflops_per_clip_transformer']:.2f} G; 2 FLOPs per multiply-add)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"stt-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stt-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
