"""The pass registry: built-in passes register with `@register_pass`; third-party passes are published
under the entry-point group `codec.passes` and loaded only when a pipeline names them.

Pipeline text: `dna,dne,nda{fire=0.7},csne{corr=0.85,fire=0.8}` — comma-separated pass names, each with
optional `{key=value,...}` options parsed by the type of the pass's dataclass field.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from importlib import metadata

from codec.errors import ConfigError
from codec.passes.base import Pass

ENTRY_POINT_GROUP = "codec.passes"
_BUILTIN: dict[str, type[Pass]] = {}
_BUILTIN_MODULES = ("codec.passes.activations", "codec.passes.dna", "codec.passes.dne", "codec.passes.nda", "codec.passes.csne")
_loaded_builtins = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator for codec's own passes; a second pass with the same name is an error."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.name in _BUILTIN and _BUILTIN[cls.name] is not cls:
        raise ConfigError(f"two built-in passes are named {cls.name!r}: {_BUILTIN[cls.name].__name__} and {cls.__name__}")
    _BUILTIN[cls.name] = cls
    return cls


def _builtins() -> dict[str, type[Pass]]:
    global _loaded_builtins
    if not _loaded_builtins:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded_builtins = True
    return _BUILTIN


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"two installed plugins provide a pass named {ep.name!r}: {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


def get_pass(name: str) -> type[Pass]:
    """The pass class called `name`: built-in, else a plugin (imported now, not before)."""
    builtins = _builtins()
    plugins = _entry_points()
    if name in builtins and name in plugins:
        raise ConfigError(f"plugin {plugins[name].value} registers pass {name!r}, which is a built-in pass name")
    if name in builtins:
        return builtins[name]
    if name in plugins:
        try:
            cls = plugins[name].load()
        except Exception as exc:
            raise ConfigError(f"cannot load plugin pass {name!r} from {plugins[name].value}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise ConfigError(f"plugin entry point {name!r} ({plugins[name].value}) is not a codec Pass subclass")
        if cls.name != name:
            raise ConfigError(f"plugin entry point {name!r} loads a pass named {cls.name!r}; the names must agree")
        return cls
    known = ", ".join(sorted(set(builtins) | set(plugins)))
    raise ConfigError(f"unknown pass {name!r}; known passes: {known}")


def available_passes() -> dict[str, str]:
    """Every pass name with where it comes from ("built-in" or the plugin's module), without importing plugins."""
    names = {name: "built-in" for name in _builtins()}
    for name, ep in _entry_points().items():
        names.setdefault(name, ep.value)
    return dict(sorted(names.items()))


def _convert(cls: type[Pass], field: dataclasses.Field, raw: str):
    hints = typing.get_type_hints(cls)
    kind = hints.get(field.name, str)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise ConfigError(f"{cls.name}: option {field.name}={raw!r}; choose one of {', '.join(map(str, choices))}")
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, float, str):
            return kind(raw)
    except ValueError:
        raise ConfigError(f"{cls.name}: option {field.name}={raw!r} is not a valid {kind.__name__}") from None
    return raw


def parse_pipeline(text: str) -> list[Pass]:
    """Parse `a,b{k=v,k2=v2},c` into pass instances, checking names, option names, types and ranges."""
    passes = []
    for name, options in _split(text):
        cls = get_pass(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in options:
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise ConfigError(f"pass {name!r} has no option {key!r}; its options: {known}")
            kwargs[key] = _convert(cls, fields[key], raw)
        instance = cls(**kwargs)
        instance.check_options()
        passes.append(instance)
    if not passes:
        raise ConfigError("the pass pipeline is empty")
    return passes


def _split(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    items, i, text = [], 0, text.strip()
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ",{":
            j += 1
        name = text[i:j].strip()
        if not name:
            raise ConfigError(f"empty pass name at position {i} of pipeline {text!r}")
        options: list[tuple[str, str]] = []
        if j < len(text) and text[j] == "{":
            close = text.find("}", j)
            if close < 0:
                raise ConfigError(f"unclosed '{{' after pass {name!r} in {text!r}")
            for part in filter(None, (p.strip() for p in text[j + 1 : close].split(","))):
                if "=" not in part:
                    raise ConfigError(f"option {part!r} of pass {name!r} must be written key=value")
                key, value = (s.strip() for s in part.split("=", 1))
                options.append((key, value))
            j = close + 1
        items.append((name, options))
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] != ",":
            raise ConfigError(f"expected ',' after pass {name!r} in {text!r}")
        i = j + 1
    return items
