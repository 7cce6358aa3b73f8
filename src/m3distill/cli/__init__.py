"""The ``m3distill`` command: a thin shell over the Python API, one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tqdm.contrib.logging import logging_redirect_tqdm

from m3distill._version import __version__
from m3distill.errors import M3DistillError

# Subcommand modules in pipeline order; each defines register(subparsers) and sets `handler` on its parser.
_SUBCOMMANDS = ("synth", "teacher", "train", "export", "evaluate", "pipeline")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line and exit code 2. The full usage of a command with every config
    flag is a screenful that would bury the error; --help shows it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="m3distill",
        description="Distil a large embedding teacher (BAAI/bge-m3 by default) into small, fast students for your "
        "own documents, and measure how close they stay.",
    )
    parser.add_argument("--version", action="version", version=f"m3distill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only, no progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in _SUBCOMMANDS:
        importlib.import_module(f"m3distill.cli.{name}").register(subparsers)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    # Our own progress lines at INFO; other libraries only speak up for warnings unless -v asks for everything.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # m3distill logs everything (a run's log file keeps it all); the terminal's handler shows INFO and up.
    logging.getLogger("m3distill").setLevel(logging.DEBUG)
    for handler in logging.root.handlers:
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub", "datasets", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # transformers' per-model "Loading weights" bar takes a second; it only buries the stage progress.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


@contextmanager
def _logs_above_progress_bars() -> Iterator[None]:
    """Route the terminal's log handler through tqdm, so a log line is printed above the bars, not through one."""
    console = [handler for handler in logging.root.handlers
               if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)]
    if not console:  # logging is someone else's (a test, an embedding application): leave it alone
        yield
        return
    before = set(logging.root.handlers)
    with logging_redirect_tqdm():
        for handler in set(logging.root.handlers) - before:
            handler.setLevel(console[0].level)
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the subcommand, turn user errors into one line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        # Log lines go above the progress bars instead of breaking them.
        with _logs_above_progress_bars():
            return int(args.handler(args) or 0)
    except M3DistillError as error:
        print(f"m3distill {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # A backstop for paths the stages did not check first: an output on a read-only or full disk, a folder
        # without permission, a file where a folder should be. Any other error is a bug and keeps its traceback.
        from m3distill.atomic import USER_PATH_ERRNOS, describe_os_error, is_disk_full

        if isinstance(error, OSError) and error.errno in USER_PATH_ERRNOS and error.filename is not None:
            line = describe_os_error(error)
        elif is_disk_full(error):  # a library's own words for it (pyarrow, safetensors, sqlite), no path given
            line = "no space left on the device; free some space or choose another location"
        else:
            raise
        logging.getLogger("m3distill").debug("the error in full:", exc_info=True)
        print(f"m3distill {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m3distill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
