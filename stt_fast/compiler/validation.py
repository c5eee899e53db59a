"""Side-by-side check of a compiled module against the reference model on probe inputs."""

from __future__ import annotations

import copy

import torch

from stt_fast.accuracy import ParityReport, compare_logits, tolerance
from stt_fast.model import STT


class ValidationError(RuntimeError):
    """A compiled module whose logits differ from the reference's beyond its precision's tolerance."""


# The report of a validation is the project's one logits-vs-reference report.
ValidationReport = ParityReport


def probe_clips(model: STT, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Reproducible random clips in [0, 1] for the model's config (on the CPU)."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, c.num_frames, 3, c.image_size, c.image_size, generator=generator)


@torch.no_grad()
def reference_logits(model: STT, clips: torch.Tensor) -> torch.Tensor:
    """The ground truth: the reference model in float32 on the CPU (no TF32, no reduced precision)."""
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()
    return reference(clips.cpu())


def validate(model: STT, compiled, dtype: torch.dtype, *, batch: int = 2, seed: int = 0,
             raise_on_failure: bool = True) -> ValidationReport:
    clips = probe_clips(model, batch, seed)
    expected = reference_logits(model, clips)
    with torch.no_grad():
        got = compiled(clips).cpu()
    report = compare_logits("the float32 reference model", [got], [expected], tolerance(dtype).model, [batch])
    if raise_on_failure and not report.passed:
        raise ValidationError(
            f"compiled logits differ from the reference: relative error {report.relative_error:.3e} > "
            f"tolerance {report.tolerance:.1e} for {dtype} (max abs error {report.max_abs_error:.3e}, "
            f"top-1 agreement {report.top1_agreement:.2f} on {batch} probe clips)")
    return report
