"""What the commands share: option types checked at parse time, the parser class (one-line errors,
defaults shown), the option groups of several commands, and loading the backend they name."""

from __future__ import annotations

import argparse

# --- option types: checked at parse time, so that a bad value fails before any work ---------------------

def _number(convert, accept, expected: str):
    """An argparse type: convert the text, and refuse it (naming what was expected) unless accept(value)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def int_list(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; every value a positive integer."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return values


def crop_scale(text: str) -> tuple[float, float]:
    """'MIN:MAX' with 0 < MIN <= MAX <= 1."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 0 < low <= high <= 1:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 < MIN <= MAX <= 1, got {text!r}")
    return low, high


def device_name(text: str) -> str:
    """A device this machine has (cpu, cuda, cuda:N), checked at parse time so that nothing starts (and
    nothing is written) for a device that is not there."""
    from stt_fast.devices import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def batch_range(text: str) -> str:
    from stt_fast.export.onnx_export import BatchRange

    try:
        return str(BatchRange.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown once, in words, beside its help (lists as they are typed: 1,8,64 and
    MIN:MAX); none for flags, for options without a default, or where the help already says it;
    descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or (not action.option_strings
                and action.nargs not in ("?", "*"))):
            return text
        if isinstance(default, (list, tuple)):
            shown = (":" if isinstance(default, tuple) else ",").join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line on stderr and status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage messages on stderr")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data set root (DFEW layout, or AFEW-style class folders with --layout folders)")
    p.add_argument("--layout", default="dfew", choices=["dfew", "folders"], help="how the data set is laid out")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3, 4, 5], help="DFEW fold")
    p.add_argument("--train-split", default="Train", help="folders layout: the training subfolder")
    p.add_argument("--eval-split", default="Val", help="folders layout: the evaluation subfolder")
    p.add_argument("--batch-size", type=positive_int, default=32, help="clips per batch")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="data loader processes (default: up to 4)")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="compiled", choices=["compiled", "reference", "onnx", "tensorrt"],
                   help="compiled (stt_fast.compile: the fastest backend this machine has, checked against the "
                        "reference, which it falls back to), reference (the PyTorch model as written), onnx (ONNX "
                        "Runtime on an exported graph) or tensorrt (an engine)")
    p.add_argument("--checkpoint", help="an stt_fast checkpoint (reference and compiled backends)")
    p.add_argument("--onnx", help="an exported ONNX file (onnx backend)")
    p.add_argument("--engine", help="a TensorRT engine with its sidecar (tensorrt backend)")


def frame_size(text: str) -> int:
    """'WIDTHxHEIGHT' (or a pixel count) -> pixels per frame."""
    try:
        if "x" in text.lower():
            width, height = (int(v) for v in text.lower().split("x"))
            value = width * height if width > 0 and height > 0 else 0
        else:
            value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 3840x2160) or a pixel count, got {text!r}")
    return value


def add_face_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detect-face", action="store_true", help="detect and crop the face (OpenCV)")
    p.add_argument("--no-face", default="skip", choices=("skip", "full", "error"),
                   help="with --detect-face, a clip without a face: skipped and not labelled, labelled from its full "
                        "frames (with a warning), or an error")


def add_limit_args(p: argparse.ArgumentParser, limits=None) -> None:
    """--max-frame-size, --max-seconds, --max-frames: a video beyond them is refused before it is decoded.
    Their defaults are limits' (a stt_fast.data.video.ReadLimits; its DEFAULT_LIMITS when None)."""
    from stt_fast.data.video import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    p.add_argument("--max-frame-size", type=frame_size, default=str(limits.max_frame_pixels), metavar="WxH",
                   help=f"largest frame to decode, as WIDTHxHEIGHT or a pixel count (default: "
                        f"{limits.max_frame_pixels:,} pixels)")
    p.add_argument("--max-seconds", type=positive_float, default=limits.max_seconds, help="longest video to read")
    p.add_argument("--max-frames", type=positive_int, default=limits.max_frames, help="most frames a video may hold")


def limits_from_args(args):
    from stt_fast.data.video import ReadLimits

    return ReadLimits(max_frame_pixels=args.max_frame_size, max_seconds=args.max_seconds, max_frames=args.max_frames)


def predictor_from_args(args):
    """The backend the options of add_backend_args name, loaded."""
    from stt_fast.predictors import load_predictor

    return load_predictor(args.backend, checkpoint=args.checkpoint, onnx=args.onnx, engine=args.engine,
                          device=args.device)
