"""Deployment: `stt-fast export` (ONNX), `build` (TensorRT engine), `check` (an engine against its
checkpoint) and `triton-repo` (a Triton Inference Server model repository)."""

from __future__ import annotations

import argparse

from .common import add_quiet, batch_range, non_negative_int, positive_float, positive_int


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


def add_parsers(sub) -> None:
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
    add_quiet(p)
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
    add_quiet(p)
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
