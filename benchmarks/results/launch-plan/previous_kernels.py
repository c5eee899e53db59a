"""The occupancy-aware launch plan applied to the kernels before issue 31, for comparison (a record of how
README's "previous kernels" figures were made; run from the repository root).

It traces today's forward and puts back, launch by launch, the grids and chains of the earlier kernels:
cls_attention as one launch of B * H programs each making 1 + 4 + 16 * 4 + 4 dependent reads (the x0 row,
the query chunks, 16 frames of four 16-token tiles, the value chunks); the spatial cls row as a 17th
program per head that visits the 16 frames in turn (no mean launch); the LayerNorm prologue as two 8-step
statistics passes (K = 512, 64-column steps) or two 4-step ones on the 16 x 64 x 128 cls-row tile; the
cls-row products on 16 x 64 tiles (N / 64 programs); PyTorch's max-pool writing int64 indices.
"""

import dataclasses

import torch

from stt_fast.config import get_config
from stt_fast.launch_plan import Launch, forward_launches, modelled_microseconds


def previous(launches: list[Launch], batch: int, heads: int = 8) -> list[Launch]:
    old, cls_done = [], False
    for x in launches:
        cls_row = x.shape.count("x") == 1  # a product of the cls rows: [B, N]
        if x.op == "stt_fast.spatial_cls_mean":
            continue
        if x.op.startswith("stt_fast.cls_"):
            if not cls_done:
                flops = sum(y.flops for y in launches if y.op.startswith("stt_fast.cls_"))
                old.append(Launch("stt_fast.cls_attention", "attention", flops,
                                  batch * 785 * 512 * 2 + 3 * 512 * 512 * 2, batch * 512 * 2, "",
                                  batch * heads, 73, batch * heads * 73))
                cls_done = True
        elif x.op == "stt_fast.st_attention" and x.serial == 2:  # spatial
            per_head = x.programs // (batch * heads) + 1
            old.append(dataclasses.replace(x, programs=per_head * batch * heads, serial=16,
                                           serial_total=(per_head - 1 + 16) * batch * heads))
        elif x.op == "stt_fast.fused_linear" and cls_row and batch <= 16:
            programs = -(-int(x.shape.split("x")[-1]) // 64)
            chain = 1 + 2 * 4 if x.serial > 1 else 1
            old.append(dataclasses.replace(x, programs=programs, serial=chain, serial_total=programs * chain))
        elif x.op == "stt_fast.fused_linear" and x.serial > 1:
            old.append(dataclasses.replace(x, serial=17, serial_total=x.programs * 17))
        elif x.op == "stt_fast.max_pool2d":
            old.append(dataclasses.replace(x, op="aten.max_pool2d_with_indices", programs=None, serial=0,
                                           serial_total=0, bytes_written=x.bytes_written * 5))
        else:
            old.append(x)
    return old


if __name__ == "__main__":
    print("| batch | launches before | H100 SXM µs before | launches now | H100 SXM µs now |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 8, 64):
        now = forward_launches(get_config("paper"), backend="triton", batch=batch, dtype=torch.float16)
        before = previous(now, batch)
        print(f"| {batch} | {len(before)} | {modelled_microseconds(before, 'H100 SXM', 'fp16', 2.0):.0f} | "
              f"{len(now)} | {modelled_microseconds(now, 'H100 SXM', 'fp16', 2.0):.0f} |")
