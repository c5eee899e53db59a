"""stt-fast: run, check, export, benchmark and train STT, the Spatio-Temporal Transformer for dynamic
facial expression recognition.

Each command group has a module in this package (info, deploy, quantize, measure, cache, training, predict,
timeline, annotate, serve; common.py holds what they share) that adds its parsers and runs its commands; the
work itself lives in the library. Here the commands are dispatched and their errors reported. Errors a user
can fix (bad paths, bad files, bad options) print one line and exit with status 2; anything else prints
one line and exits with status 1 (STT_FAST_DEBUG=1 shows the traceback). No command prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .common import Parser

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)  # BadClipError, CheckpointError, ValidationError... are ValueErrors

NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "onnxruntime", "openvino", "ray")


def _setup_logging(quiet: bool) -> None:
    """stt_fast's stage messages (INFO) on stderr, unless --quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the messages name their source ("stt_fast.compile: ...")
    logger = logging.getLogger("stt_fast")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # the exporter's libraries log hundreds of INFO lines per export around stt_fast's few
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from stt_fast import __version__

    from . import annotate, cache, deploy, info, measure, predict, quantize, serve, timeline, training

    parser = Parser(prog="stt-fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stt-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in (info, deploy, quantize, measure, cache, training, predict, timeline, annotate, serve):
        group.add_parsers(sub)
    parser.commands = sub.choices  # name -> subparser, for _given()
    return parser


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written on the command line (not left at their defaults)."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(token == option or token.startswith(option + "=") for token in argv):
                given.add(action.dest)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    action = (getattr(args, "bench_action", None) or getattr(args, "kernels_action", None)
              or getattr(args, "cache_action", None))
    if unknown:  # named by the (sub)command they were given to, not by the top-level parser
        command_parser = parser.commands[args.command]
        for sub in command_parser._actions:
            if action and isinstance(sub, argparse._SubParsersAction):
                command_parser = sub.choices[action]
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = f"{args.command} {action}" if action else args.command
    args.given = _given(parser.commands[args.command], argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("STT_FAST_DEBUG"):
            raise
        print(f"stt-fast {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stt-fast {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (| head)
        sys.stderr.close()
        return 0
    except Exception as e:  # anything else: one line, and the way to see more
        if os.environ.get("STT_FAST_DEBUG"):
            raise
        print(f"stt-fast {command}: error: {type(e).__name__}: {e} (STT_FAST_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
