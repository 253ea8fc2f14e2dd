"""The `vlmkit` command line.

    vlmkit run [--model M] --image a.png [--image b.png] [--max-new-tokens N] [--temperature T] "question"
    vlmkit chat [--model M] [--image PATH] [--system TEXT]      (stdin lines; /image PATH, /reset, /help, /exit)
    vlmkit info M [--json]
    vlmkit train / eval / serve / bench / quantize / plot ...    (vlmkit COMMAND --help)

Answers stream to stdout; status lines and errors go to stderr. Bad input (missing model folder, unreadable image, an
image URL, placeholder/image count mismatch, prompt over the context, bad flag values) ends with one line
`vlmkit: error: ...` and exit code 2; an unexpected failure with exit code 1 (set VLMKIT_DEBUG=1 for the traceback).

Adding a subcommand: one function decorated with `@command(name, help, *arguments)` (common.py) in a module imported
below; nothing else to register.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import (bench_command, chat_command, eval_command, export_command, info_command, plot_command,
               quantize_command, serve_command, train_command)
from .common import COMMANDS, FAILURE, LOG_LEVEL, PROG, USAGE_ERROR, CLIError, configure_logging, one_line

# The modules whose `@command` functions are the subcommands, in the order of `vlmkit --help`.
COMMAND_MODULES = (chat_command, info_command, train_command, eval_command, serve_command, bench_command,
                   quantize_command, export_command, plot_command)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one line (and exit code 2), not the whole usage block."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Open vision-language models on your machine.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [m.__name__ for m in COMMAND_MODULES]  # a stable sort: a module's commands keep their own order
    for name, (help_text, arguments, func, description) in sorted(
            COMMANDS.items(), key=lambda item: modules.index(item[1][2].__module__)):
        p = sub.add_parser(name, help=help_text, description=description)
        for flags, kwargs in (*arguments, LOG_LEVEL):
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=func)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (argparse has printed its usage line)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        return _fail(str(e), e.code)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # `vlmkit run ... | head`
        _quiet_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 -- one line, not a traceback; VLMKIT_DEBUG shows it
        if os.environ.get("VLMKIT_DEBUG"):
            raise
        code, message = _classify_error(e)
        return _fail(message, code)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {one_line(message)}\n")
    return code


def _classify_error(e: Exception) -> tuple[int, str]:
    """Map the library's exceptions to (exit code, message)."""
    from ..processing.images import ImageError

    if isinstance(e, FileNotFoundError):
        return USAGE_ERROR, str(e.args[0] if len(e.args) == 1 else e)
    if isinstance(e, ImageError):
        return USAGE_ERROR, f"bad image: {e}"
    if isinstance(e, NotImplementedError):
        return USAGE_ERROR, str(e)
    if isinstance(e, ValueError):  # PromptError, CheckpointError, generation settings, prompt too long
        return USAGE_ERROR, str(e)
    return FAILURE, f"{type(e).__name__}: {e}"


def _quiet_stdout() -> None:
    try:  # stdout's reader is gone: silence the flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


__all__ = ["main", "build_parser", "COMMANDS", "CLIError"]
