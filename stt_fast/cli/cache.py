"""`stt-fast cache list|clear`: the cache of exported graphs and engines."""

from __future__ import annotations

import argparse
import json

from .common import Parser


def _cmd_cache(args: argparse.Namespace) -> int:
    import datetime

    from stt_fast import cache

    if args.cache_action == "clear":
        kinds = cache.KINDS if args.kind == "all" else (args.kind,)
        removed = cache.clear(kinds)
        print(f"[cache] removed {len(removed)} entries ({sum(e.nbytes for e in removed) / 2**20:.0f} MB)")
        return 0
    found = cache.entries()
    if args.json:
        print(json.dumps({"limit_bytes_per_kind": cache.limit_bytes(), "entries": [
            {"kind": e.kind, "path": str(e.path), "bytes": e.nbytes,
             "last_used": datetime.datetime.fromtimestamp(e.last_used, datetime.timezone.utc).isoformat()}
            for e in found]}, indent=2))
        return 0
    for _, folder in cache.kind_folders():
        print(cache.describe(folder))
    for e in found:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"  {e.kind:8s} {e.key}  {e.nbytes / 2**20:8.1f} MB  last used {used}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("cache", help="the cache of exported graphs and engines: list it, or clear it",
                       description="Exported ONNX programs and TensorRT engines are cached under "
                                   "$XDG_CACHE_HOME/stt_fast (~/.cache/stt_fast), bounded to STT_FAST_CACHE_LIMIT_MB "
                                   "(1024 MB by default; 0: no bound) per kind, least recently used out first.")
    cache_sub = p.add_subparsers(dest="cache_action", required=True, metavar="list|clear", parser_class=Parser)
    c = cache_sub.add_parser("list", help="every cached entry, its size and when it was last used")
    c.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    c = cache_sub.add_parser("clear", help="remove cached entries")
    c.add_argument("--kind", default="all", choices=("all", "onnx", "engines"), help="which kind of entry")
    p.set_defaults(func=_cmd_cache)
