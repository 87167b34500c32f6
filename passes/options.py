"""Pass options: parsing them from pipeline text, checking them when a pass is built, writing them back.

A pass's options are its dataclass fields, and a field's annotation is its type. The types a pipeline can
spell, and how (`nda{fire=0.7}`, `mypass{sizes=(64,32),limit=none}`):

| annotation | text |
| --- | --- |
| `bool` | `true false yes no on off 1 0` |
| `int`, `float`, `str` | the value |
| `Literal["a", "b"]` | one of the choices |
| an `enum.Enum` subclass | a member's name or value |
| `X \\| None` (`Optional[X]`) | `none`, or an X |
| `tuple[X, ...]`, `tuple[X, Y]` | `(x1,x2)` or `[x1,x2]`; `()` is empty |

`parse_value` turns text into a value of the annotated type, `check_value` checks a value built in Python
(the same rule, so `CommonSubNetworkExtraction(mode="typo")` fails like `csne{mode=typo}`), and
`format_value` writes a value so that `parse_value` reads it back (`Pass.spec()` round-trips).
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from codec.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


def _union_args(kind: Any) -> tuple | None:
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(kind)
    return None


def type_name(kind: Any) -> str:
    """How an option type reads in messages and in `codec opt --list-passes`."""
    if kind is type(None):
        return "none"
    if typing.get_origin(kind) is typing.Literal:
        return "|".join(map(str, typing.get_args(kind)))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "|".join(member.name for member in kind)
    union = _union_args(kind)
    if union is not None:
        return " or ".join(type_name(arg) for arg in union)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {type_name(args[0])}"
        return "(" + ",".join(type_name(arg) for arg in args) + ")"
    return getattr(kind, "__name__", str(kind))


def supported(kind: Any) -> bool:
    """Whether the pipeline text can spell values of `kind`."""
    if kind in (bool, int, float, str, type(None)):
        return True
    if typing.get_origin(kind) is typing.Literal:
        return True
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return True
    union = _union_args(kind)
    if union is not None:
        return all(supported(arg) for arg in union)
    if typing.get_origin(kind) is tuple:
        return all(arg is Ellipsis or supported(arg) for arg in typing.get_args(kind))
    return False


def parse_value(kind: Any, raw: str) -> Any:
    """`raw` (pipeline text) as a value of type `kind`; ValueError with the reason when it is not one."""
    raw = raw.strip()
    union = _union_args(kind)
    if union is not None:
        if type(None) in union and raw.lower() in _NONE:
            return None
        for arg in union:
            if arg is type(None):
                continue
            try:
                return parse_value(arg, raw)
            except ValueError:
                continue
        raise ValueError(f"is not a valid {type_name(kind)}")
    if typing.get_origin(kind) is typing.Literal:
        for choice in typing.get_args(kind):
            if str(choice) == raw:
                return choice
        raise ValueError(f"; choose one of {', '.join(map(str, typing.get_args(kind)))}")
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        for member in kind:
            if raw in (member.name, str(member.value)) or raw.lower() == member.name.lower():
                return member
        raise ValueError(f"; choose one of {', '.join(member.name for member in kind)}")
    if typing.get_origin(kind) is tuple:
        return _parse_tuple(kind, raw)
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("is not a valid bool (true or false)")
    if kind is type(None):
        if raw.lower() in _NONE:
            return None
        raise ValueError("is not none")
    if kind in (int, float, str):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"is not a valid {kind.__name__}") from None
    raise ValueError(f"has type {type_name(kind)}, which pipeline text cannot spell")


def _parse_tuple(kind: Any, raw: str) -> tuple:
    if len(raw) < 2 or (raw[0], raw[-1]) not in (("(", ")"), ("[", "]")):
        raise ValueError(f"is not a valid {type_name(kind)}; write a tuple in parentheses, e.g. (1,2)")
    inner = raw[1:-1].strip()
    parts = [p.strip() for p in split_top_level(inner, ",")] if inner else []
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        element_types = [args[0]] * len(parts)
    else:
        if len(parts) != len(args):
            raise ValueError(f"has {len(parts)} elements; a {type_name(kind)} has {len(args)}")
        element_types = list(args)
    values = []
    for element_type, part in zip(element_types, parts):
        try:
            values.append(parse_value(element_type, part))
        except ValueError as exc:
            raise ValueError(f"element {part!r} {exc}") from None
    return tuple(values)


def split_top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator` where it is not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def check_value(kind: Any, value: Any) -> bool:
    """Whether `value` (built in Python) is a value of type `kind`; unknown types are not checked."""
    if not supported(kind):
        return True
    union = _union_args(kind)
    if union is not None:
        return any(check_value(arg, value) for arg in union)
    if kind is type(None):
        return value is None
    if typing.get_origin(kind) is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(kind))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return isinstance(value, kind)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(check_value(args[0], v) for v in value)
        return len(value) == len(args) and all(check_value(a, v) for a, v in zip(args, value))
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        # an int is a fine float (`fire=1`); numpy scalars come from code that computed a threshold
        return isinstance(value, (int, float)) and not isinstance(value, bool) or _is_numpy_real(value)
    return isinstance(value, kind)


def _is_numpy_real(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (np.floating, np.integer))


def format_value(value: Any) -> str:
    """`value` as pipeline text that `parse_value` reads back."""
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple):
        return "(" + ",".join(format_value(v) for v in value) + ")"
    return str(value)


def option_types(cls: type) -> dict[str, Any]:
    """The annotated type of every option (dataclass field) of pass class `cls`."""
    import dataclasses

    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # an annotation naming something its module does not define
        raise ConfigError(
            f"pass {getattr(cls, 'name', cls.__name__)!r}: cannot read its option types: {exc}"
        ) from exc
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
