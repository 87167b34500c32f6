"""The pass registry: where a pipeline's pass names come from.

- codec's own passes register with `@register_pass` in their modules (`codec.passes.dna`, ...);
- a pass defined anywhere else registers with the same decorator when its module or script runs, e.g. a
  file given to `codec opt --plugin FILE.py` (`load_plugin_file`);
- a pipeline may name a class by reference, `module.path:ClassName{k=v}`: the module is imported then;
- installed packages publish passes under the entry-point group `codec.passes`, loaded only when a
  pipeline names them.

One name, one pass: a pass whose name is a built-in's, or another plugin's, is an error (defining the same
class again, as re-running a script does, replaces it).

Pipeline text: `dna,dne,nda{fire=0.7},csne{corr=0.85,fire=0.8}` — comma-separated pass names, each with
optional `{key=value,...}` options parsed by the type of the pass's dataclass field (see
`codec.passes.options` for the types and how they are written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from importlib import metadata
from pathlib import Path

from codec.errors import ConfigError
from codec.passes.base import Pass
from codec.passes.options import option_types, parse_value, split_top_level, supported, type_name

ENTRY_POINT_GROUP = "codec.passes"
_BUILTIN: dict[str, type[Pass]] = {}
_USER: dict[str, type[Pass]] = {}  # registered by plugin files, user scripts and module:Class references
_BUILTIN_MODULES = (
    "codec.passes.activations",
    "codec.passes.dna",
    "codec.passes.dne",
    "codec.passes.nda",
    "codec.passes.csne",
)
_loaded_builtins = False
_plugin_files: dict[Path, list[str]] = {}  # resolved path -> the pass names it registered


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator that makes a pass nameable in pipelines (`--passes name{k=v}`).

    Raises:
        ConfigError: the name is taken by a built-in pass, an installed plugin, or another registered pass.
    """
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise ConfigError(f"register_pass: {cls!r} is not a codec Pass subclass (Analysis or Transform)")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.__module__ in _BUILTIN_MODULES:
        if cls.name in _BUILTIN and _BUILTIN[cls.name] is not cls:
            raise ConfigError(
                f"two built-in passes are named {cls.name!r}: "
                f"{_BUILTIN[cls.name].__name__} and {cls.__name__}"
            )
        _BUILTIN[cls.name] = cls
        return cls
    return _register_user(cls)


def _where(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _register_user(cls: type[Pass]) -> type[Pass]:
    if cls.name in _builtins():
        raise ConfigError(
            f"pass {_where(cls)} is named {cls.name!r}, which is a built-in pass name; rename it"
        )
    plugins = _entry_points()
    if cls.name in plugins and plugins[cls.name].value != _where(cls):
        raise ConfigError(
            f"pass {_where(cls)} is named {cls.name!r}, "
            f"which installed plugin {plugins[cls.name].value} provides"
        )
    known = _USER.get(cls.name)
    if known is not None and known is not cls and _where(known) != _where(cls):
        raise ConfigError(f"two passes are named {cls.name!r}: {_where(known)} and {_where(cls)}")
    _USER[cls.name] = cls
    return cls


def _builtins() -> dict[str, type[Pass]]:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    return _BUILTIN


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"two installed plugins provide a pass named {ep.name!r}: "
                f"{found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


def _check_pass_class(cls: object, where: str) -> type[Pass]:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise ConfigError(f"{where} is not a codec Pass subclass (it is {type(cls).__name__} {cls!r})")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError(f"{where} is abstract: it does not define {missing}")
    if not cls.name:
        raise ConfigError(f'{where} has no `name` (set `name = "mypass"` in the class)')
    return cls


def load_reference(reference: str) -> type[Pass]:
    """The pass class `module.path:ClassName` names (importing the module now), registered under its name."""
    module_name, _, attr = reference.partition(":")
    if (
        not module_name
        or not attr
        or not re.fullmatch(r"[\w.]+", module_name)
        or not re.fullmatch(r"[\w.]+", attr)
    ):
        raise ConfigError(f"pass reference {reference!r} must be written module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"pass {reference!r}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # the user's module failed while importing: say where
        raise ConfigError(
            f"pass {reference!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            passes = sorted(
                n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Pass) and v.name
            )
            hint = f"; its passes: {', '.join(passes)}" if passes else ""
            raise ConfigError(f"pass {reference!r}: module {module_name!r} has no {attr!r}{hint}")
        target = getattr(target, part)
    cls = _check_pass_class(target, f"pass {reference!r}")
    if _USER.get(cls.name) is not cls:
        _register_user(cls)
    return cls


def load_plugin_file(path: str | Path) -> list[str]:
    """Run a Python file that defines passes with `@register_pass`; return the names it registered.

    Loading the same file again does nothing. The file runs as a module of its own (named after its
    path), so its classes can be pickled and their type annotations resolved.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plugin file {str(path)!r} does not exist")
    if path.suffix != ".py":
        raise ConfigError(f"plugin file {str(path)!r} is not a Python file (.py)")
    resolved = path.resolve()
    if resolved in _plugin_files:
        return list(_plugin_files[resolved])
    _builtins()  # a plugin's names are checked against the built-ins as it registers them
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"codec_plugin_{stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    before = dict(_USER)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"plugin file {str(path)!r}: {exc}") from exc
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == resolved
        ]
        line = f", line {frames[-1].lineno}" if frames else ""
        raise ConfigError(f"plugin file {str(path)!r}{line}: {type(exc).__name__}: {exc}") from exc
    names = [name for name, cls in _USER.items() if before.get(name) is not cls]
    if not names:
        unregistered = sorted(
            v.__name__
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Pass) and v.__module__ == module_name
        )
        hint = f" ({', '.join(unregistered)} not decorated)" if unregistered else ""
        raise ConfigError(
            f"plugin file {str(path)!r} registers no pass{hint}: decorate each pass class with "
            "@register_pass (from codec.passes.registry import register_pass)"
        )
    _plugin_files[resolved] = names
    return names


def _plugin_file_of(name: str) -> str | None:
    for path, names in _plugin_files.items():
        if name in names:
            return str(path)
    return None


def get_pass(name: str) -> type[Pass]:
    """The pass class called `name`: built-in, registered, a `module:Class` reference, else an installed
    plugin (imported now, not before)."""
    if ":" in name:
        return load_reference(name)
    builtins = _builtins()
    plugins = _entry_points()
    if name in builtins and name in plugins:
        raise ConfigError(
            f"plugin {plugins[name].value} registers pass {name!r}, which is a built-in pass name"
        )
    if name in builtins:
        return builtins[name]
    if name in _USER:
        return _USER[name]
    if name in plugins:
        try:
            cls = plugins[name].load()
        except Exception as exc:
            raise ConfigError(f"cannot load plugin pass {name!r} from {plugins[name].value}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise ConfigError(
                f"plugin entry point {name!r} ({plugins[name].value}) is not a codec Pass subclass"
            )
        if cls.name != name:
            raise ConfigError(
                f"plugin entry point {name!r} loads a pass named {cls.name!r}; the names must agree"
            )
        return cls
    known = ", ".join(sorted(set(builtins) | set(_USER) | set(plugins)))
    raise ConfigError(f"unknown pass {name!r}; known passes: {known}")


def available_passes() -> dict[str, str]:
    """Every pass name with where it comes from ("built-in", the plugin file, the registered class, or the
    plugin's entry point), without importing plugins."""
    names = {name: "built-in" for name in _builtins()}
    for name, cls in _USER.items():
        names.setdefault(name, _plugin_file_of(name) or _where(cls))
    for name, ep in _entry_points().items():
        names.setdefault(name, ep.value)
    return dict(sorted(names.items()))


def _convert(cls: type[Pass], field: dataclasses.Field, raw: str):
    kind = option_types(cls)[field.name]
    if not supported(kind):
        raise ConfigError(
            f"{cls.name}: option {field.name} has type {type_name(kind)}, which pipeline text cannot spell"
        )
    try:
        return parse_value(kind, raw)
    except ValueError as exc:
        reason = str(exc)
        raise ConfigError(
            f"{cls.name}: option {field.name}={raw!r}{'' if reason.startswith(';') else ' '}{reason}"
        ) from None


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
                raise ConfigError(f"pass {cls.name!r} has no option {key!r}; its options: {known}")
            kwargs[key] = _convert(cls, fields[key], raw)
        missing = [
            f.name
            for f in fields.values()
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"pass {cls.name!r} needs option(s) {', '.join(missing)}: {cls.name}{{{missing[0]}=...}}"
            )
        passes.append(cls(**kwargs))  # __post_init__ checks the values (Pass.check_options)
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
            close = _closing_brace(text, j)
            if close < 0:
                raise ConfigError(f"unclosed '{{' after pass {name!r} in {text!r}")
            for part in filter(None, (p.strip() for p in split_top_level(text[j + 1 : close], ","))):
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


def _closing_brace(text: str, start: int) -> int:
    """The index of the `}` that closes the `{` at `start` (brackets in tuple values nest), or -1."""
    depth = 0
    for k in range(start, len(text)):
        if text[k] in "([{":
            depth += 1
        elif text[k] in ")]}":
            depth -= 1
            if depth == 0:
                return k if text[k] == "}" else -1
    return -1
