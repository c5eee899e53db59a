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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="config, parameters, FLOPs per clip and the environment")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"stt-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stt-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
