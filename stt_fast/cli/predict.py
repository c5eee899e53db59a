"""`stt-fast predict`: video files or frame folders in, one emotion each out."""

from __future__ import annotations

import argparse
import json
import sys

from .common import (
    add_backend_args,
    add_face_args,
    add_limit_args,
    add_quiet,
    device_name,
    limits_from_args,
    positive_int,
    predictor_from_args,
)


def _cmd_predict(args: argparse.Namespace) -> int:
    from stt_fast.predict import predict_paths

    predictor = predictor_from_args(args)
    results = predict_paths(args.paths, predictor, detect_face=args.detect_face, batch_size=args.batch_size,
                            no_face=args.no_face, limits=limits_from_args(args))
    for r in results:
        for warning in r.get("warnings", []):
            print(f"stt-fast predict: warning: {r['path']}: {warning}", file=sys.stderr)
        if "error" in r:
            print(f"stt-fast predict: error: {r['error']}", file=sys.stderr)
        if "skipped" in r:
            print(f"stt-fast predict: skipped: {r['skipped']}", file=sys.stderr)
        if args.json:
            entry = {"path": r["path"]}
            if "error" in r or "skipped" in r:
                entry |= {k: r[k] for k in ("error", "skipped") if k in r}
            else:
                entry |= {"label": r["label"], "probabilities": r["probabilities"], "warnings": r["warnings"]}
            print(json.dumps(entry), flush=True)
        elif "error" not in r and "skipped" not in r:
            top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
            print(f"{r['path']}: {r['label']} ({', '.join(f'{k} {v:.3f}' for k, v in top)})", flush=True)
    failed = sum("error" in r for r in results)
    if failed:
        print(f"stt-fast predict: {failed} of {len(results)} path(s) could not be read", file=sys.stderr)
    return 2 if failed else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="video files or frame folders in, emotions out")
    p.add_argument("paths", nargs="+", help="video files or folders of frames")
    add_backend_args(p)
    add_face_args(p)
    add_limit_args(p)
    p.add_argument("--json", action="store_true",
                   help='one JSON line per path: {"path", "label", "probabilities", "warnings"}, {"path", "error"} '
                        'or {"path", "skipped"}')
    p.add_argument("--batch-size", type=positive_int, default=16, help="clips per batch")
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    add_quiet(p)
    p.set_defaults(func=_cmd_predict)
