"""Kernel microbenchmark: st_attention against PyTorch SDPA (each backend) and the plain reference.

    python -m stt_fast.benchmarks.bench_st_attention [--batch-sizes 1,8,64] [--dtype fp16] [--output DIR]

At the model's shapes (T = 16, N = 49, L = 785, H = 8, Dh = 64), q, k and v are views into one packed
[B, L, 3, H, Dh] tensor, as the qkv projection writes them. The SDPA rows include the regrouping SDPA
needs (kernels/st_attention_sdpa.py: views, the cls token copied into every frame's group, the cls mean),
so every row computes the same function from the same inputs. Reported per row: median time, achieved
TFLOP/s (attention FLOPs: 4 * Lq * Lk * Dh per group and head) and GB/s (q, k, v read once, the output
written once), as fractions of the machine's measured matmul peak and copy bandwidth, and the speed-up
of st_attention over the fastest SDPA backend.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
from pathlib import Path

import torch
from stt_fast.kernels import st_attention, st_attention_reference, st_attention_sdpa
from stt_fast.kernels.st_attention import HAS_TRITON

from stt_fast.accuracy import relative_error
from stt_fast.bounds import attention_work, gpu_spec, roofline

from .machine import machine_header, measure_ceilings, store_result
from .timing import measure

MODES = ("joint", "spatial", "temporal")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _sdpa_context(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "math": SDPBackend.MATH}[name]
    if backend is None:
        raise RuntimeError("this torch has no cuDNN attention backend")
    return sdpa_kernel([backend])


def implementations(device: torch.device) -> dict:
    """name -> (callable(q, k, v, frames, mode), context factory or None, reason unavailable or None)."""
    impls = {}
    reason = None if (HAS_TRITON and device.type == "cuda") else \
        "Triton kernels are timed on CUDA only (the CPU interpreter is a correctness tool, not a fast path)"
    impls["st_attention"] = (lambda q, k, v, t, m: st_attention(q, k, v, num_frames=t, mode=m), None, reason)
    for name in SDPA_BACKENDS:
        impls[f"sdpa-{name}"] = (lambda q, k, v, t, m: st_attention_sdpa(q, k, v, num_frames=t, mode=m),
                                 lambda name=name: _sdpa_context(name), None)
    impls["reference"] = (lambda q, k, v, t, m: st_attention_reference(q, k, v, num_frames=t, mode=m), None, None)
    return impls


def run(batch_sizes=(1, 8, 64), dtype: str = "fp16", device: str | None = None, frames: int = 16,
        patches: int = 49, heads: int = 8, head_dim: int = 64, min_seconds: float = 0.5,
        output_dir=None) -> tuple[dict, Path | None]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    ceilings = measure_ceilings(device)
    header = machine_header(device)
    spec = gpu_spec(header["gpu"]["name"], header["gpu"].get("memory_gib")) if device.type == "cuda" else None
    rows = []
    for mode in MODES:
        for batch in batch_sizes:
            qkv = torch.randn(batch, 1 + frames * patches, 3, heads, head_dim, device=device, dtype=torch_dtype)
            q, k, v = qkv.unbind(2)
            expected = st_attention_reference(q.double(), k.double(), v.double(), num_frames=frames, mode=mode)
            flops, moved = attention_work(mode, batch, frames, patches, heads, head_dim, q.element_size())
            bound = roofline(spec, flops, moved, dtype) if spec is not None else None
            for name, (fn, context, reason) in implementations(device).items():
                row = {"mode": mode, "batch": batch, "impl": name}
                if reason:
                    rows.append(row | {"skipped": reason})
                    continue
                try:
                    with context() if context else contextlib.nullcontext():
                        out = fn(q, k, v, frames, mode)
                        timing = measure(lambda fn=fn, q=q, k=k, v=v, mode=mode: fn(q, k, v, frames, mode), device,
                                         warmup=3, min_runs=10, min_seconds=min_seconds)
                except RuntimeError as e:  # an SDPA backend that does not take these inputs
                    rows.append(row | {"skipped": str(e).splitlines()[0][:200]})
                    continue
                seconds = timing.median_ms / 1e3
                if bound is not None:
                    row |= {"bound_us": bound.microseconds, "bound_limited_by": bound.limited_by,
                            "fraction_of_bound": bound.microseconds / 1e6 / seconds}
                rows.append(row | {"timing": timing.to_dict(), "tflops": flops / seconds / 1e12,
                                   "gbps": moved / seconds / 1e9,
                                   "fraction_of_matmul_peak": flops / seconds / 1e12 / ceilings["matmul_tflops"],
                                   "fraction_of_copy_bandwidth": moved / seconds / 1e9 / ceilings["copy_gbps"],
                                   "relative_error": relative_error(out, expected)})
    for row in rows:
        if row["impl"] == "st_attention" and "timing" in row:
            sdpa = [r["timing"]["median_ms"] for r in rows if r["mode"] == row["mode"] and r["batch"] == row["batch"]
                    and r["impl"].startswith("sdpa-") and "timing" in r]
            if sdpa:
                row["speedup_vs_fastest_sdpa"] = min(sdpa) / row["timing"]["median_ms"]
    result = {"schema": 1, "benchmark": "st_attention",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": header, "ceilings": ceilings, "dtype": dtype,
              "shape": {"frames": frames, "patches": patches, "heads": heads, "head_dim": head_dim},
              "rows": rows}
    path = store_result(result, output_dir, "st_attention", name=dtype) if output_dir is not None else None
    return result, path


def format_rows(result: dict) -> str:
    lines = [f"{'mode':9s} {'batch':>5s} {'impl':15s} {'median ms':>10s} {'TFLOP/s':>8s} {'GB/s':>8s} "
             f"{'%peak':>6s} {'%bound':>7s} {'rel err':>8s} {'vs SDPA':>8s}"]
    for r in result["rows"]:
        if "timing" not in r:
            lines.append(f"{r['mode']:9s} {r['batch']:5d} {r['impl']:15s} skipped: {r['skipped']}")
            continue
        speedup = f"{r['speedup_vs_fastest_sdpa']:.2f}x" if "speedup_vs_fastest_sdpa" in r else ""
        bound = f"{100 * r['fraction_of_bound']:6.1f}%" if "fraction_of_bound" in r else ""
        lines.append(f"{r['mode']:9s} {r['batch']:5d} {r['impl']:15s} {r['timing']['median_ms']:10.3f} "
                     f"{r['tflops']:8.2f} {r['gbps']:8.1f} {100 * r['fraction_of_matmul_peak']:5.1f}% {bound:>7s} "
                     f"{r['relative_error']:8.1e} {speedup:>8s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--output", default="results", help="results folder (the project's committed results: "
                                                            "benchmarks/results)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    result, path = run([int(b) for b in args.batch_sizes.split(",")], args.dtype, args.device,
                       min_seconds=args.min_seconds, output_dir=None if args.no_save else args.output)
    print(format_rows(result))
    if path:
        print(f"[bench st_attention] written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
