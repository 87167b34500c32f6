"""codec's command-line interface: `codec <command> ...` or `python -m codec <command> ...`.

Each subcommand lives in its own module under `codec/commands/`, exposing
`register(subparsers)` which adds a parser whose default `func(args) -> int` runs it.
Command modules import heavy libraries (torch, onnxruntime) inside `func`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from codec.commands._common import data_options_epilog
from codec.errors import CodecError, clear_interrupt, interrupt_requested, on_stop_signal
from codec.version import __version__

# Order is the order `codec --help` lists them in. A module missing here is a command not built yet.
COMMAND_MODULES = [
    "inspect",
    "profile",
    "train",
    "eval",
    "opt",
    "compile",
    "export",
    "train_ensemble",
    "bench",
    "report",
]


class _Parser(argparse.ArgumentParser):
    """argparse with codec's error form: one line `codec <command>: error: ...` (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="codec",
        description=(
            "codec, the Compiler Of Deep Ensembles: lifts trained networks (ONNX) into a neuron-granular IR, "
            "profiles their activations, and removes the redundancy between ensemble members."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=data_options_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"codec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"codec.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"codec.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def _raise_interrupt(signum, frame):
    on_stop_signal(signum, frame)  # raises KeyboardInterrupt, or holds it inside interrupts_deferred()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad option (one line already printed) is exit 2 like every bad input
        if exc.code == 2:
            return 2
        raise
    args.argv = list(argv if argv is not None else sys.argv[1:])  # for commands that relaunch themselves
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="codec: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C: checkpoints stay resumable. Both record
    # the request too (codec.errors: an interrupt inside an import can surface as another exception).
    clear_interrupt()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        return int(args.func(args) or 0)
    except CodecError as exc:
        if interrupt_requested():
            return _interrupted(args)
        print(f"codec {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted(args)
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # the file system said no (missing file, no permission, full disk) outside codec's own checks:
        # one line naming the file, like every other user-facing error; --verbose keeps the traceback
        if interrupt_requested():
            return _interrupted(args)
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"codec {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception:
        # a stop that landed inside an import surfaces as "ImportError: initialization failed" (or as
        # whatever a library made of it): still an interruption, resumable, not a crash
        if interrupt_requested():
            return _interrupted(args)
        raise


def _interrupted(args) -> int:
    hint = "; run the same command with --resume to continue" if args.command in ("compile", "train") else ""
    print(f"codec {args.command}: interrupted{hint}", file=sys.stderr)
    return 130


def run() -> None:
    """The `codec` console script and `python -m codec`: `main`, then exit with its status. A torchrun
    worker (`--nproc`) exits through `codec.runtime.training.distributed.exit_process`, whatever happened (see
    there)."""
    from codec.runtime.training.distributed import current, exit_process

    if not current().distributed:
        sys.exit(main())
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - a bug: show it, then still leave the process group cleanly
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
