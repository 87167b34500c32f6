"""codec, the Compiler Of Deep Ensembles, as a Python library.

    import codec

    main = codec.lift("main.onnx")                        # ONNX -> NetworkIR
    module, report = codec.optimize("main.onnx", "peer.onnx", passes="dna,dne,nda,csne", data="mnist_small")
    codec.save_model(codec.lower(module.main), "main_opt.onnx")
    fused = codec.emit_ensemble([module.main, module.peer], module.csn.network)

The names below load their module on first use (module `__getattr__`), so `import codec`, `codec --help`
and `import codec.errors` stay free of numpy, onnx and torch. README "Python API" documents them.
"""

from __future__ import annotations

import importlib

from codec.version import __version__

# name -> "module:attribute". Kept a plain table: adding an entry point is one line.
_API = {
    # the IR: ONNX in and out
    "lift": "codec.ir.lift:lift",
    "lower": "codec.ir.lower:lower",
    "save_model": "codec.ir.lower:save_model",
    "NetworkIR": "codec.ir.network:NetworkIR",
    "verify_network": "codec.ir.verify:verify_network",
    "emit_ensemble": "codec.ir.ensemble:emit_ensemble",
    # passes
    "Analysis": "codec.passes.base:Analysis",
    "Transform": "codec.passes.base:Transform",
    "PassResult": "codec.passes.base:PassResult",
    "EnsembleModule": "codec.passes.base:EnsembleModule",
    "Calibration": "codec.passes.base:Calibration",
    "register_pass": "codec.passes.registry:register_pass",
    "load_plugin_file": "codec.passes.registry:load_plugin_file",
    "parse_pipeline": "codec.passes.registry:parse_pipeline",
    "PassManager": "codec.passes.manager:PassManager",
    # pipelines
    "optimize": "codec.pipelines.optimize:optimize",
    "compile": "codec.pipelines.api:compile",
    "CompileResult": "codec.pipelines.api:CompileResult",
    "load_dataset": "codec.runtime.data:load_dataset",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 - the table's keys are the names


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'codec' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
