"""`stt-fast timeline`: emotion over time on a recording or a live source (stt_fast.timeline)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_backend_args, add_quiet, device_name, positive_int


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "timeline", help="emotion over time on a video, a folder of frames, a camera or a stream",
        description="Classify windows of SOURCE as they complete: one row per window (start, end, face, label, "
                    "the probabilities), smoothed segments, and a plot. Windows sit on a fixed frame grid (the "
                    "model's T frames per window), so overlapping windows share frames and each frame goes "
                    "through the backbone once (the torch and triton backends; the others run each window "
                    "whole). SOURCE: a video file, a folder of frames (--fps apart), a camera index (0) or a "
                    "stream URL.")
    p.add_argument("source", help="video file, folder of frames, camera index or stream URL")
    add_backend_args(p)
    p.add_argument("--window", type=positive_seconds, default=2.0, help="seconds per window")
    p.add_argument("--stride", type=positive_seconds, default=0.5,
                   help="seconds between window starts (rounded to whole grid steps of window / T)")
    p.add_argument("--fps", type=positive_seconds, default=25.0, help="frame rate of a folder of frames")
    p.add_argument("--detect-face", action="store_true",
                   help="detect the face every few frames and track it between (OpenCV); windows without a face "
                        "are reported, never labelled")
    p.add_argument("--face-every", type=positive_int, default=5, help="grid frames between face detections")
    p.add_argument("--csv", help="write one row per window to this CSV file")
    p.add_argument("--plot", help="write the probabilities over time with the segments to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object: windows, segments, summary")
    p.add_argument("--realtime", action="store_true",
                   help="treat the source as live: frames are read on their own thread and dropped when inference "
                        "falls behind (a file is played at its frame rate); windows/s and latency on stderr")
    p.add_argument("--no-cache", action="store_true",
                   help="run every window from scratch (its frames through the whole model): the peer of the cache")
    p.add_argument("--force", action="store_true", help="replace existing --csv / --plot files")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    add_quiet(p)
    p.set_defaults(func=run)


def _frame_model(args):
    """The model as the timeline runs it: with its two halves where the backend has them."""
    from stt_fast.predictors import default_device, load_predictor

    if args.backend in ("reference", "compiled"):
        if not args.checkpoint:
            raise ValueError(f"backend {args.backend!r} needs --checkpoint")
        import torch

        from stt_fast.checkpoint import load_checkpoint

        device = torch.device(args.device) if args.device else default_device()
        model = load_checkpoint(args.checkpoint, map_location=device).eval()
        if args.backend == "reference":
            return model, "reference"
        from stt_fast.compiler import compile as stt_compile

        fast = stt_compile(model, device=device)
        return fast, f"compiled ({fast.backend}, {fast.dtype})"
    predictor = load_predictor(args.backend, onnx=args.onnx, engine=args.engine, device=args.device)
    return predictor, predictor.name


def _too_short(grid, frames_per_window: int, window: float) -> str:
    """Why a source gave no window, and a window that fits it: a window completes at the frame at or after
    first + (T - 1) / T * window."""
    span = grid.span
    fits = int(span * frames_per_window / (frames_per_window - 1) * 10) / 10 if frames_per_window > 1 else 0.0
    text = f"{grid.seen} frame(s) over {span:.2f} s, shorter than one window ({window:g} s)"
    if fits >= 0.1:
        text += f": try --window {fits:g} --stride {round(fits / 4, 3):g}"
    return text


def run(args: argparse.Namespace) -> int:
    from stt_fast.data.face import haar_detector
    from stt_fast.data.stream import BadSourceError, FrameGrid, LiveReader, open_source
    from stt_fast.files import refuse_to_replace, write_text_atomic
    from stt_fast.timeline import Timeline, plot_timeline, segments, windows_csv

    refuse_to_replace([p for p in (args.csv, args.plot) if p], args.force)
    grid = FrameGrid()  # only the frames on the timeline's grid are converted (its step is known once the model is)
    frames, info = open_source(args.source, fps=args.fps, keep=grid)  # a bad source: one line, before the model
    model, name = _frame_model(args)
    timeline = Timeline(model, window=args.window, stride=args.stride, cache=not args.no_cache,
                        detector=haar_detector() if args.detect_face else None, face_every=args.face_every,
                        clock=time.monotonic)
    if not timeline.cache and not args.no_cache:
        print(f"stt-fast timeline: the {name} backend runs whole windows only: each window from scratch",
              file=sys.stderr)
    grid.step = timeline.step
    live = args.realtime or info["live"]
    # live: a bounded buffer that drops the oldest frames when inference falls behind; a recording: read ahead
    # on the reader's thread while the model runs, waiting for room rather than dropping
    reader = LiveReader(frames, capacity=2 * timeline.stride_steps, pace=args.realtime and not info["live"],
                        drop=live)
    started, last_report = time.monotonic(), time.monotonic()
    interrupted, failure = False, None

    def report(final: bool = False) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        done = timeline.results
        latency = sorted(r.latency for r in done[-20:])
        parts = [f"{len(done)} windows", f"{len(done) / elapsed:.2f} windows/s"]
        if latency:
            parts.append(f"latency {latency[len(latency) // 2] * 1000:.0f} ms")
        parts.append(f"{reader.dropped} of {reader.read} frames dropped")
        print(f"[timeline] {', '.join(parts)}{' (done)' if final else ''}", file=sys.stderr, flush=True)

    try:
        for frame, stamp in reader:
            for result in timeline.push(frame, stamp):
                if not args.json and not args.quiet:
                    label = result.label or "no face"
                    conf = f" {result.confidence:.2f}" if result.confidence is not None else ""
                    print(f"{result.start:8.2f} - {result.end:8.2f}  {label}{conf}", flush=True)
            if live and not args.quiet and time.monotonic() - last_report > 2.0:
                report()
                last_report = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
    except BadSourceError as e:  # a stream that breaks off: keep what was done
        failure = str(e)
    finally:
        reader.stop()
    if not timeline.results and not failure and not interrupted:  # nothing printed before this line
        reason = _too_short(grid, timeline.frames_per_window, args.window)
        print(f"stt-fast timeline: error: {args.source}: {reason}", file=sys.stderr)
        return 2
    found = segments(timeline.results)
    if args.csv:
        write_text_atomic(args.csv, windows_csv(timeline.results, timeline.labels))
    if args.plot and timeline.results:
        plot_timeline(timeline.results, found, timeline.labels, args.plot,
                      title=f"{args.source} · {name} · window {args.window:g} s, stride {timeline.stride:g} s")
    summary = {"source": str(args.source), "backend": name, "window": args.window, "stride": timeline.stride,
               "frames": timeline.frames_seen, "windows": len(timeline.results),
               "backbone_frames": timeline.backbone_frames, "frame_cache": timeline.cache,
               "dropped_frames": reader.dropped, "interrupted": interrupted,
               "error": failure}
    if args.json:
        print(json.dumps({"windows": [r.to_dict() for r in timeline.results],
                          "segments": [vars(s) for s in found], "summary": summary}, indent=1))
    elif not args.quiet:
        print("segments:")
        for s in found:
            conf = f" (mean confidence {s.confidence:.2f})" if s.confidence is not None else ""
            print(f"  {s.start:8.2f} - {s.end:8.2f}  {s.label or 'no face'}{conf}")
    if live and not args.quiet:
        report(final=True)
    if failure:
        print(f"stt-fast timeline: error: {failure} (the {len(timeline.results)} windows before it were kept)",
              file=sys.stderr)
        return 2
    if interrupted:
        print("stt-fast timeline: interrupted; what was done is written", file=sys.stderr)
        return 130
    return 0
