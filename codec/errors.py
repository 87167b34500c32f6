"""codec's error types.

Every error a user can cause (bad model, bad data, bad option) is a `CodecError`: the CLI prints its
message as one line and exits non-zero, without a traceback. Anything else is a bug in codec.
"""

import contextlib
from collections.abc import Iterator


class CodecError(Exception):
    """Base class of the errors a user can cause and fix; the message is one readable line."""

    exit_code = 2


class LiftError(CodecError):
    """An ONNX graph codec cannot lift into its IR; names the node and op type when there is one."""

    def __init__(
        self, reason: str, node: str | None = None, op_type: str | None = None, source: str | None = None
    ):
        self.reason = reason
        self.node = node
        self.op_type = op_type
        self.source = source  # which model, when a command lifts several (e.g. "peer member peer.onnx")
        where = ""
        if node is not None or op_type is not None:
            where = f"node {node!r} (op {op_type}): "
        super().__init__(f"{f'{source}: ' if source else ''}cannot lift: {where}{reason}")


class ModelLoadError(CodecError):
    """A model file that cannot be read: missing, truncated, not ONNX, unsafe external data."""


class DataError(CodecError):
    """Bad data: empty sets, NaN/inf values, wrong shapes, labels out of range, unreadable files."""


class ConfigError(CodecError):
    """A bad option, recipe, pass name or threshold."""


class ShapeError(CodecError):
    """Shapes that do not fit together: data vs model input, or members that differ."""


def positive_int(value: object, name: str, *, error: type[Exception] = ConfigError) -> int:
    """`value` as an int when it is an integer >= 1 (numpy integers accepted; bools and floats refused).

    Raises:
        error: anything else (ConfigError by default; the kernels' input policy raises ValueError).
    """
    if isinstance(value, bool) or not hasattr(value, "__index__") or type(value).__name__ == "bool_":
        raise error(f"{name} must be a positive integer, got {value!r}")
    number = value.__index__()
    if number < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(number)


def first_line(exc: object) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    Third-party errors (onnx, onnxruntime, protobuf, zlib) often carry pages of text; a CodecError's
    message is one readable line, so it quotes only this.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- interruption ---------------------------------------------------------------------------------------
# The CLI turns SIGINT/SIGTERM into KeyboardInterrupt wherever the main thread is. Raised inside a module's
# import (a C extension's initialisation) Python turns it into "ImportError: initialization failed", which
# error handling may then report or swallow as an ordinary failure. So the handler also records that a
# stop was asked for: the CLI then reports an interruption whatever the exception became, and
# long-running pipelines call `check_interrupt()` between artifacts.
_interrupt_requested = False


def request_interrupt() -> None:
    global _interrupt_requested
    _interrupt_requested = True


def clear_interrupt() -> None:
    global _interrupt_requested
    _interrupt_requested = False


def interrupt_requested() -> bool:
    return _interrupt_requested


# A few statements must not be cut in two by a stop: creating a temporary file and taking charge of it
# (codec.io.atomic_path), else an interrupt landing between them leaves the file behind. Inside
# `interrupts_deferred()` the handler only records the stop; it is raised when the block ends.
_deferring = 0
_deferred = False


def on_stop_signal(signum=None, frame=None) -> None:
    """The CLI's SIGINT/SIGTERM handler: record the stop and raise KeyboardInterrupt (held while deferred)."""
    global _deferred
    request_interrupt()
    if _deferring:
        _deferred = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a stop asked for by `on_stop_signal` until the block ends, then raise it."""
    global _deferring, _deferred
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _deferred:
        _deferred = False
        raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a stop was asked for and not yet honoured (a safe point)."""
    if _interrupt_requested:
        raise KeyboardInterrupt
