"""codec, the Compiler Of Deep Ensembles."""

from codec.version import __version__

# Public API names, imported on first use so that `import codec` stays light (no torch, no onnx).
_LAZY = {
    "compile": ("codec.pipelines.api", "compile"),
    "CompileResult": ("codec.pipelines.api", "CompileResult"),
}

__all__ = ["CompileResult", "__version__", "compile"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'codec' has no attribute {name!r}")
