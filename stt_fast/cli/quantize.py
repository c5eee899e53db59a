"""`stt-fast quantize`: a checkpoint's program quantised to int8 for CPUs with VNNI or AMX (stt_fast.export.quantize),
with what it costs in accuracy and gives in speed on this machine."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_quiet, positive_int


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stt_fast.checkpoint import load_checkpoint
    from stt_fast.environment import cpu_isa
    from stt_fast.export.quantize import calibration_clips, int8_units, quantization_report, quantize_program
    from stt_fast.files import refuse_to_replace, write_text_atomic

    output = Path(args.output)
    report_path = output.with_suffix(".json")
    refuse_to_replace([output, report_path], args.force)  # before minutes of work
    isa = cpu_isa()
    if not int8_units(isa):
        print("stt-fast quantize: warning: this CPU has no int8 dot-product units (VNNI or AMX-INT8): int8 ran "
              "slower than float32 on such a CPU here; the report below says what it does on this one",
              file=sys.stderr)
    model = load_checkpoint(args.checkpoint, map_location="cpu").eval()
    calibration = calibration_clips(args.calibration, model.config, args.clips)
    print(f"[quantize] calibrating on {sum(len(b) for b in calibration)} clips of {args.calibration}",
          file=sys.stderr)
    quantize_program(model, calibration, output)
    labelled = None
    if args.eval:
        from stt_fast.data.datasets import ClipDataset, class_folder_items, dfew_items

        items = (dfew_items(args.eval, args.fold, "test", skip_missing=True) if args.layout == "dfew"
                 else class_folder_items(args.eval))
        labelled = ClipDataset(items, num_frames=model.config.num_frames, image_size=model.config.image_size,
                               train=False, skip_bad=True)
    report = quantization_report(model, output, probe=calibration, labelled=labelled, isa=isa)
    report |= {"checkpoint": str(args.checkpoint), "calibration": str(args.calibration), "cpu_isa": isa}
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        latency = ", ".join(f"{k} {v:.1f} ms" for k, v in report["latency_ms"].items())
        print(f"[quantize] wrote {output} (and {report_path.name}); one clip: {latency}")
        print(f"[quantize] against float32 on the calibration clips: relative error {report['relative_error']:.2e}, "
              f"label agreement {report['probe_label_agreement']:.3f}")
        if labelled is not None:
            print(f"[quantize] on {report['labelled_clips']} labelled clips: WAR {report['fp32_war']:.4f} -> "
                  f"{report['int8_war']:.4f}, UAR {report['fp32_uar']:.4f} -> {report['int8_uar']:.4f}, label "
                  f"agreement {report['labelled_label_agreement']:.3f}")
        print(f"[quantize] run it: stt-fast predict CLIP --backend onnx --onnx {output}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="int8 graph of a checkpoint for CPUs with VNNI/AMX, with its accuracy cost",
                       description="Quantise the checkpoint's program to int8 (static, calibrated on clips of "
                                   "CALIBRATION) into an ONNX file that `stt-fast predict --backend onnx` runs, and "
                                   "report what int8 costs against float32 (label agreement; WAR/UAR with --eval) "
                                   "and its speed on this CPU beside float32 and bfloat16.")
    p.add_argument("checkpoint", help="an stt_fast checkpoint (.safetensors)")
    p.add_argument("-o", "--output", required=True, help="the int8 graph, e.g. model.int8.onnx (report: .json beside)")
    p.add_argument("--calibration", required=True,
                   help="clips like those the model will see: a folder, a DFEW-layout set or a list file")
    p.add_argument("--clips", type=positive_int, default=32, help="calibration clips, spread over CALIBRATION")
    p.add_argument("--eval", help="a labelled set to measure WAR/UAR on (DFEW layout, or class folders with "
                                  "--layout folders)")
    p.add_argument("--layout", default="dfew", choices=["dfew", "folders"], help="how --eval is laid out")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3, 4, 5], help="DFEW fold of --eval (its test split)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    add_quiet(p)
    p.set_defaults(func=_cmd_quantize)
