"""`stt-fast info`: the config, its parameters and FLOPs, and this machine's environment."""

from __future__ import annotations

import argparse
import json

from stt_fast.config import DEFAULT_PRESET, PRESETS


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
    print(f"  cpu: {env['cpu']} ({env['cpu_count']} cores; {', '.join(env['cpu_isa']) or 'no AVX2'})")
    for i, gpu in enumerate(env["gpus"]):
        print(f"  gpu {i}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
              f"{gpu['memory_gib']} GiB, driver {env['driver']}")
    if not env["gpus"]:
        print("  gpu: none")
    for name in ("triton", "onnx", "onnxruntime", "openvino", "tensorrt"):
        print(f"  {name}: {env.get(name) or 'not installed'}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="config, parameters, FLOPs per clip and the environment")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)
