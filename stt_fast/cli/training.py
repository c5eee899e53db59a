"""`stt-fast train`, `eval` (WAR, UAR on a labelled set) and `synth` (a synthetic data set)."""

from __future__ import annotations

import argparse
import json
import sys

from stt_fast.config import DEFAULT_PRESET, PRESETS

from .common import (
    add_backend_args,
    add_data_args,
    add_quiet,
    crop_scale,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
    predictor_from_args,
)


def _datasets(args, config, *, train_split: bool):
    from stt_fast.data.datasets import ClipDataset, class_folder_items, dfew_items

    problems: list[str] = []
    if args.layout == "dfew":  # a missing or unreadable clip is skipped and reported, never fatal (README)
        eval_items = dfew_items(args.data, args.fold, "test", skip_missing=True, problems=problems)
        train_items = dfew_items(args.data, args.fold, "train", skip_missing=True, problems=problems) \
            if train_split else None
    else:
        eval_items = class_folder_items(f"{args.data}/{args.eval_split}")
        train_items = class_folder_items(f"{args.data}/{args.train_split}") if train_split else None
    for problem in problems:
        print(f"[data] skipped: {problem}", file=sys.stderr)
    common = dict(num_frames=config.num_frames, image_size=config.image_size)
    eval_set = ClipDataset(eval_items, train=False, skip_bad=True, **common)
    eval_set.problems = problems
    if not train_split:
        return eval_set
    return ClipDataset(train_items, train=True, skip_bad=True, crop_scale=tuple(args.crop_scale), **common), eval_set


# Options of `train` that are part of what the run learns: recorded in run.json, restored by --resume.
TRAIN_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "momentum": "momentum",
                 "weight_decay": "weight_decay", "lr_step": "lr_step", "lr_gamma": "lr_gamma",
                 "lambda_compact": "lambda_compact", "optimizer": "optimizer", "clip_grad": "clip_grad_norm",
                 "metric": "metric", "workers": "workers", "seed": "seed"}
TRAIN_SETUP = ("config", "init", "backbone_weights", "layout", "fold", "train_split", "eval_split", "crop_scale")


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stt_fast.checkpoint import load_checkpoint, load_torchvision_resnet18
    from stt_fast.config import get_config
    from stt_fast.model import STT
    from stt_fast.training import TrainOptions, read_run, train

    if not args.resume and (Path(args.output) / "log.jsonl").exists():  # before the data is read
        raise ValueError(f"{args.output} already holds a run; pass --resume to continue it or choose another folder")
    if args.resume:  # the run's own options, except those given again on this command line
        saved = read_run(args.output)
        for dest, field in TRAIN_OPTIONS.items():
            if dest not in args.given and field in saved["options"]:
                setattr(args, dest, saved["options"][field])
        args.no_amp = not saved["options"].get("amp", True) if "no_amp" not in args.given else args.no_amp
        for dest in TRAIN_SETUP:
            if dest not in args.given and dest in saved.get("setup", {}):
                setattr(args, dest, saved["setup"][dest])
    if args.init:
        model = load_checkpoint(args.init).train()
    else:
        model = STT(get_config(args.config))
    if args.backbone_weights:
        load_torchvision_resnet18(model, args.backbone_weights)
    train_set, eval_set = _datasets(args, model.config, train_split=True)
    options = TrainOptions(amp=not args.no_amp, **{field: getattr(args, dest) for dest, field in TRAIN_OPTIONS.items()})
    setup = {dest: getattr(args, dest) for dest in TRAIN_SETUP}
    print(f"[train] {len(train_set)} training clips, {len(eval_set)} evaluation clips, config "
          f"{model.config.to_json()}")
    history = train(model, train_set, eval_set, options, args.output, device=args.device, resume=args.resume,
                    setup=setup, progress=not args.quiet)
    best = max(history, key=lambda r: r[options.metric])
    print(f"[train] best epoch {best['epoch']}: WAR {best['war']:.4f}, UAR {best['uar']:.4f}; "
          f"checkpoint {args.output}/best.safetensors")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from stt_fast.files import refuse_to_replace
    from stt_fast.metrics import plot_confusion_matrix
    from stt_fast.training import evaluate

    refuse_to_replace([args.confusion_png] if args.confusion_png else [], args.force)  # before minutes of work
    predictor = predictor_from_args(args)
    dataset = _datasets(args, predictor.config, train_split=False)
    result = evaluate(predictor, dataset, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    result["backend"] = predictor.name
    for item in result["bad_clips"]:  # (missing ones were reported as the set was read)
        print(f"stt-fast eval: skipped: {item['path']}: {item['error']}", file=sys.stderr)
    result["bad_clips"] = [{"path": None, "error": p} for p in dataset.problems] + result["bad_clips"]
    if args.confusion_png:
        plot_confusion_matrix(result["confusion_matrix"], args.confusion_png, title=predictor.name)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        left_out = f", {len(result['bad_clips'])} unreadable left out" if result["bad_clips"] else ""
        print(f"{predictor.name}: WAR {result['war']:.4f}  UAR {result['uar']:.4f}  ({result['samples']} clips"
              f"{left_out})")
        for name, recall in result["per_class_recall"].items():
            print(f"  {name:9s} recall {recall:.4f}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from stt_fast.data.synthetic import SynthConfig, write_synthetic_dfew

    config = SynthConfig(clips_per_class=args.clips_per_class, image_size=args.size, min_frames=args.min_frames,
                         max_frames=args.max_frames, video_fraction=args.video_fraction, seed=args.seed)
    root = write_synthetic_dfew(args.output, config, progress=not args.quiet, overwrite=args.force)
    print(f"[synth] wrote {7 * args.clips_per_class} clips in the DFEW layout under {root}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train on a DFEW-layout (or class-folder) data set")
    add_data_args(p)
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoints, log, confusion matrix)")
    p.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--init", help="start from this checkpoint (its config wins over --config)")
    p.add_argument("--backbone-weights", help="torchvision-format ResNet-18 weights for the backbone")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output with its recorded options (only --epochs, --workers and "
                        "--device may change)")
    p.add_argument("--epochs", type=positive_int, default=100, help="train until this epoch")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="the paper uses SGD")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay")
    p.add_argument("--lr-step", type=positive_int, default=40, help="decay the lr every this many epochs")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="lr decay factor")
    p.add_argument("--lambda-compact", type=non_negative_float, default=0.1, help="weight of the compact loss term")
    p.add_argument("--clip-grad", type=positive_float, default=None, help="clip the gradient norm to this")
    p.add_argument("--crop-scale", type=crop_scale, default=(0.08, 1.0), help="MIN:MAX area of the training crop")
    p.add_argument("--metric", default="war", choices=["war", "uar"], help="keeps the best checkpoint by this")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    add_quiet(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="WAR, UAR, per-class recall of a backend on a labelled set")
    add_data_args(p)
    add_backend_args(p)
    p.add_argument("--confusion-png", help="write the confusion matrix as a PNG")
    p.add_argument("--force", action="store_true", help="replace an existing --confusion-png file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_quiet(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("synth", help="write a synthetic DFER-like data set in the DFEW layout")
    p.add_argument("output", help="folder to write (must be empty or absent)")
    p.add_argument("--clips-per-class", type=positive_int, default=60, help="clips of each of the 7 classes")
    p.add_argument("--size", type=positive_int, default=64, help="frame size in pixels")
    p.add_argument("--min-frames", type=positive_int, default=6, help="fewest frames in a clip")
    p.add_argument("--max-frames", type=positive_int, default=24, help="most frames in a clip")
    p.add_argument("--video-fraction", type=fraction, default=0.15, help="share of clips written as .mp4")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="replace an existing data set in OUTPUT whole")
    add_quiet(p)
    p.set_defaults(func=_cmd_synth)
