"""From a video file to a label: each stage of the clip pipeline (decode, detect, crop and resize) beside the
model alone, and end to end, on videos of a real face the benchmark makes itself (benchmarks/face_videos.py:
4-second H.264 at 30 frames a second): a medium shot (the photograph 90% of the frame's height, the face
about 17% of it) at 480p, 720p and 1080p, and a wide shot at 720p (photograph 50%, face 9%: found by the
cascade's fine pass only).

    python -m stt_fast.benchmarks.bench_pipeline [--config paper] [--shots medium-480p,...] [--clips 6]
                                                  [--output results]

Rows per resolution:
- stages: the median per clip of ClipPipeline's decode (probe, packet index, the sampled frames decoded
  once), detect (the Haar cascade on a downscaled copy of 4 frames) and crop_resize (RGB conversion by the
  decoder, crop, resize to the model's input);
- decode floor: decoding every frame up to the last one sampled, without conversion: what H.264 costs
  before anything else;
- before: the path this project had until 2026-12-04 (every frame decoded twice, RGB at full size, the
  cascade on full-size frames, resizing in float), kept here as the peer;
- model: the compiled module on one clip (stt_fast.compile's default backend and precision);
- end to end: `predict_paths` on the clips with face detection, batch 1, reading ahead while the model
  runs: clips per second against the model alone.
Random weights: this measures speed; labels are the model's business.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .face_videos import RESOLUTIONS, write_face_video
from .machine import machine_header, store_result
from .timing import measure

# name: (resolution, the photograph's side as a fraction of the frame's height)
SHOTS = {"medium-480p": ("480p", 0.9), "medium-720p": ("720p", 0.9), "medium-1080p": ("1080p", 0.9),
         "wide-720p": ("720p", 0.5)}


def legacy_prepare(path: Path, num_frames: int, image_size: int, detector) -> torch.Tensor:
    """The path before the clip pipeline, as the peer: a counting decode, a second decode converting the sampled
    frames at full size, the cascade on full-size frames, the crop, a float resize."""
    import av
    import numpy as np

    from stt_fast.data.face import crop_square, face_box
    from stt_fast.data.sampling import sample_indices, segments_for

    with av.open(str(path)) as container:
        count = sum(1 for _ in container.decode(video=0))
    wanted = sample_indices(count, segments=segments_for(num_frames), frames_per_segment=2)
    kept = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    frames = torch.from_numpy(np.stack([kept[i] for i in wanted])).permute(0, 3, 1, 2).contiguous()
    box = face_box(frames, detector)
    if box is not None:
        frames = crop_square(frames, box)
    x = frames.float() / 255.0
    return torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                           antialias=True).clamp_(0, 1)


def decode_floor(path: Path, last: int) -> float:
    """Seconds to decode frames 0..last (threads on, no conversion)."""
    import av

    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, _ in enumerate(container.decode(stream)):
            if i >= last:
                break
    return time.perf_counter() - started


def run(config_name: str = "paper", shots=tuple(SHOTS), clips: int = 6, legacy_clips: int = 2,
        output_dir=None, progress: bool = True) -> tuple[dict, Path | None]:
    import stt_fast
    from stt_fast.config import get_config
    from stt_fast.data.face import haar_detector
    from stt_fast.data.pipeline import ClipPipeline
    from stt_fast.data.video import probe_video
    from stt_fast.model import STT
    from stt_fast.predict import predict_paths
    from stt_fast.predictors import Predictor

    config = get_config(config_name)
    torch.manual_seed(0)
    compiled = stt_fast.compile(STT(config).eval())
    predictor = Predictor(f"compiled ({compiled.backend}, {compiled.dtype})", config, compiled)
    one = torch.rand(1, config.num_frames, 3, config.image_size, config.image_size)
    with torch.no_grad():
        model = measure(lambda: compiled(one), min_runs=5, min_seconds=2.0)
    if progress:
        print(f"[bench pipeline] model alone ({predictor.name}): {model.median_ms:.1f} ms a clip")
    full_size = haar_detector(detect_side=10**6)  # the cascade on the whole frame, as before
    rows = []
    with tempfile.TemporaryDirectory(prefix="stt_fast-bench-pipeline-") as tmp:
        for name in shots:
            resolution, photo = SHOTS[name]
            width, height = RESOLUTIONS[resolution]
            video = write_face_video(Path(tmp) / f"face-{name}.mp4", width, height, seconds=4.0, fps=30,
                                     face_side=round(photo * height))
            pipeline = ClipPipeline(config.num_frames, config.image_size, detect_face=True)
            pipeline.prepare(video)  # the cascade loaded, caches warm
            items = [pipeline.prepare(video) for _ in range(clips)]
            missing = [i.error or i.skipped for i in items if i.clip is None]
            if missing:
                raise RuntimeError(f"{name}: the pipeline found no clip: {missing[0]}")
            stages = {k: statistics.median(i.seconds[k] for i in items) * 1e3 for k in items[0].seconds}
            info = probe_video(video)
            floor = statistics.median(decode_floor(video, info.frames * 15 // 16) for _ in range(3)) * 1e3
            legacy = []
            for _ in range(legacy_clips):
                started = time.perf_counter()
                legacy_prepare(video, config.num_frames, config.image_size, full_size)
                legacy.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            results = predict_paths([video] * clips, predictor, detect_face=True, batch_size=1)
            end_to_end = (time.perf_counter() - started) * 1e3 / clips
            if any("label" not in r for r in results):
                raise RuntimeError(f"{name}: a clip got no label: {results}")
            outside = sum(stages.values())
            row = {"shot": name, "width": width, "height": height, "photo_fraction": photo, "frames": info.frames,
                   "clips": clips,
                   "stages_ms": {k: round(v, 1) for k, v in stages.items()}, "outside_model_ms": round(outside, 1),
                   "decode_floor_ms": round(floor, 1), "before_ms": round(statistics.median(legacy), 1),
                   "model_ms": round(model.median_ms, 1), "end_to_end_ms": round(end_to_end, 1),
                   "clips_per_second": round(1e3 / end_to_end, 3),
                   "model_alone_clips_per_second": round(1e3 / model.median_ms, 3),
                   "outside_over_model": round(outside / model.median_ms, 2),
                   "before_over_model": round(statistics.median(legacy) / model.median_ms, 2)}
            rows.append(row)
            if progress:
                print(f"[bench pipeline] {name}: outside the model {outside:.0f} ms "
                      f"({', '.join(f'{k} {v:.0f}' for k, v in stages.items())}; decode floor {floor:.0f}), before "
                      f"{row['before_ms']:.0f} ms; model {model.median_ms:.0f} ms; end to end {end_to_end:.0f} ms "
                      f"a clip")
    result = {"schema": 1, "benchmark": "pipeline",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_header(torch.device("cpu")), "config_name": config_name, "backend": predictor.name,
              "rows": rows,
              "note": "4 s H.264 videos of a real face (scikit-image's astronaut photograph, its face 18.5% of the "
                      "photograph's side) at 30 fps; face detection on; "
                      "medians per clip; end to end = predict_paths at batch 1 with read-ahead"}
    path = store_result(result, output_dir, "pipeline", name=f"pipeline-{config_name}") if output_dir else None
    return result, path


def markdown(result: dict) -> str:
    lines = ["| video | decode | detect | crop + resize | outside the model | decode floor | before | model | "
             "end to end | clips/s (model alone) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        s = r["stages_ms"]
        lines.append(f"| {r['shot']} ({r['frames']} frames) | {s['decode']:.0f} ms | {s['detect']:.0f} ms | "
                     f"{s['crop_resize']:.0f} ms | {r['outside_model_ms']:.0f} ms ({r['outside_over_model']:.2f}x "
                     f"the model) | {r['decode_floor_ms']:.0f} ms | {r['before_ms']:.0f} ms "
                     f"({r['before_over_model']:.1f}x) | {r['model_ms']:.0f} ms | {r['end_to_end_ms']:.0f} ms | "
                     f"{r['clips_per_second']:.2f} ({r['model_alone_clips_per_second']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper")
    parser.add_argument("--shots", default=",".join(SHOTS), help=f"any of {', '.join(SHOTS)}")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--output", default="results", help="results folder (the project's: benchmarks/results)")
    args = parser.parse_args(argv)
    unknown = set(args.shots.split(",")) - set(SHOTS)
    if unknown:
        parser.error(f"unknown shots {sorted(unknown)}; known: {', '.join(SHOTS)}")
    result, path = run(args.config, args.shots.split(","), args.clips, output_dir=args.output)
    print(markdown(result))
    if path:
        print(f"[bench pipeline] written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
