"""codec's error types.

Every error a user can cause (bad model, bad data, bad option) is a `CodecError`: the CLI prints its
message as one line and exits non-zero, without a traceback. Anything else is a bug in codec.
"""


class CodecError(Exception):
    """Base class of the errors a user can cause and fix; the message is one readable line."""

    exit_code = 2


class LiftError(CodecError):
    """An ONNX graph codec cannot lift into its IR; names the node and op type when there is one."""

    def __init__(self, reason: str, node: str | None = None, op_type: str | None = None):
        self.reason = reason
        self.node = node
        self.op_type = op_type
        where = ""
        if node is not None or op_type is not None:
            where = f"node {node!r} (op {op_type}): "
        super().__init__(f"cannot lift: {where}{reason}")


class ModelLoadError(CodecError):
    """A model file that cannot be read: missing, truncated, not ONNX, unsafe external data."""


class DataError(CodecError):
    """Bad data: empty sets, NaN/inf values, wrong shapes, labels out of range, unreadable files."""


class ConfigError(CodecError):
    """A bad option, recipe, pass name or threshold."""


class ShapeError(CodecError):
    """Shapes that do not fit together: data vs model input, or members that differ."""
