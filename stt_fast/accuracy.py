"""How close two results are, and how close they must be: the project's one tolerance table.

Errors are relative in the L2 sense, ||out - ref|| / ||ref||, computed in float64. A result holding
NaN or infinity has error infinity, so it never passes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Largest relative error allowed at one precision.

    kernel: one kernel (st_attention, add_layer_norm) against its float64 reference.
    model:  end-to-end logits of a fast backend against the float32 reference model; errors grow
            through depth x (attention, MLP) and the backbone, hence the larger bound.
    """

    kernel: float
    model: float

    @property
    def row(self) -> float:
        """Bound on the worst single row of a kernel's output (row_relative_errors): one row has few
        elements (H * Dh), so its error scatters more than the whole tensor's; twice the kernel bound."""
        return 2 * self.kernel


# float32: IEEE arithmetic in a different order; float16 has 11 bits of mantissa (2^-11 = 4.9e-4 per
# rounding); bfloat16 has 8 (3.9e-3). The kernel bounds are a few roundings; the model bounds are the
# issue's targets (1e-4 at float32 on the CPU, 5e-3 at float16 on the GPU).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(kernel=1e-5, model=1e-4),
    torch.float16: Tolerance(kernel=2e-3, model=5e-3),
    torch.bfloat16: Tolerance(kernel=1e-2, model=3e-2),
    # int8 (stt-fast quantize: static, per-channel weights, calibrated activations) moves logits by ~2e-2 on
    # the synthetic-trained tiny model; its real measure is label agreement and WAR/UAR, reported beside it.
    # This bound only tells a working quantised graph from a broken one.
    torch.int8: Tolerance(kernel=1e-1, model=1e-1),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}; known: {list(TOLERANCES)}") from None


MARGIN_LOG = "STT_FAST_MARGIN_LOG"  # scripts/kernel_margins.py sets it to a file that collects every check


def assert_within(error: float, bound: float, check: str, *, scope: str | None = None) -> None:
    """assert error < bound, naming the check. Where $STT_FAST_MARGIN_LOG names a file, the check is first
    appended to it as one JSON line ({"check", "error", "bound"}) so that a sweep over seeds
    (scripts/kernel_margins.py) sees how close every check comes to its bound, passing or not.

    scope names where the check runs: the current pytest test by default."""
    if scope is None:
        scope = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    name = f"{scope} {check}".strip()
    log = os.environ.get(MARGIN_LOG)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"check": name, "error": error, "bound": bound}) + "\n")
    assert error < bound, f"{name}: relative error {error:.3e}, bound {bound:.1e}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if out is not finite; absolute error if ref is 0)."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def row_relative_errors(out: torch.Tensor, ref: torch.Tensor, row_dims: int = 1) -> torch.Tensor:
    """Relative error of each row, ||out_r - ref_r|| / ||ref_r|| in float64 (absolute where ref_r is 0,
    inf where out_r is not finite). Rows are the indices of the first row_dims dimensions: for attention
    outputs [B, L, H, Dh] with row_dims=2, one row per token of each clip.

    A norm over the whole tensor hides one wrong row among many (at L = 785 a row off by 5% moves the
    whole-tensor error by ~0.2%), and the cls row is the only one the model's head reads: so kernel
    checks bound the worst row as well as the whole.
    """
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    out64 = out.detach().to("cpu", torch.float64).reshape(*out.shape[:row_dims], -1).flatten(0, row_dims - 1)
    ref64 = ref.detach().to("cpu", torch.float64).reshape(*ref.shape[:row_dims], -1).flatten(0, row_dims - 1)
    diff = (out64 - ref64).norm(dim=1)
    denom = ref64.norm(dim=1)
    errors = torch.where(denom > 0, diff / torch.where(denom > 0, denom, 1.0), diff)
    return torch.where(torch.isfinite(out64).all(dim=1), errors, torch.full_like(errors, math.inf))


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, check: str = "", *,
                        row_dims: int = 1, cls_rows: bool = False, scope: str | None = None) -> dict[str, float]:
    """A kernel's output against its float64 reference at dtype's bounds: the whole within tolerance.kernel,
    its worst row (rows: the indices of the first row_dims dimensions) within tolerance.row and, with
    cls_rows, every clip's cls row (index 0 of dimension 1) within tolerance.row. Each is one assert_within
    check; returns the errors by kind ("whole", "row", "cls")."""
    bound = tolerance(dtype)
    rows = row_relative_errors(out, ref, row_dims)
    errors = {"whole": relative_error(out, ref), "row": rows.max().item()}
    if cls_rows:
        errors["cls"] = rows.view(out.shape[0], -1)[:, 0].max().item()
    for kind, err in errors.items():
        assert_within(err, bound.kernel if kind == "whole" else bound.row, f"{check} {kind}".strip(), scope=scope)
    return errors


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs()
    return diff.max().item() if torch.isfinite(diff).all() else math.inf


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same."""
    return (logits.argmax(-1).cpu() == ref_logits.argmax(-1).cpu()).double().mean().item()


def logits_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    """relative_error, max_abs_error and top1_agreement of logits against reference logits."""
    return {"relative_error": relative_error(logits, ref_logits), "max_abs_error": max_abs_error(logits, ref_logits),
            "top1_agreement": top1_agreement(logits, ref_logits)}


@dataclass(frozen=True)
class ParityReport:
    """How closely some logits follow reference logits on probe clips, and whether that is close enough."""

    against: str
    relative_error: float
    max_abs_error: float
    top1_agreement: float
    tolerance: float
    batch_sizes: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{verdict}: relative error {self.relative_error:.2e} (tolerance {self.tolerance:.0e}), "
                f"max abs {self.max_abs_error:.2e}, top-1 agreement {self.top1_agreement:.3f} vs {self.against}, "
                f"batches {list(self.batch_sizes)}")


def compare_logits(against: str, outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], tol: float,
                   batch_sizes: Sequence[int]) -> ParityReport:
    """One report over several probe batches (outs[i] against refs[i])."""
    return ParityReport(against, tolerance=tol, batch_sizes=tuple(batch_sizes),
                        **logits_agreement(torch.cat(list(outs)), torch.cat(list(refs))))
