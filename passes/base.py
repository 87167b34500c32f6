"""The pass API: modules, analyses, transforms and their results.

Shape (after onnx-ir, MLIR and LLVM's new pass manager, xDSL):
- A pass is a frozen dataclass with `name: ClassVar[str]`; its fields are its options, so the pipeline
  text `nda{fire=0.7}` builds `NeuronDependenceAnalysis(fire=0.7)`.
- An `Analysis` is read-only: `compute(module, am)` returns a result the AnalysisManager caches (keyed by
  the analysis and its options) until a transform that does not preserve it modifies the module.
- A `Transform` declares `requires` (analyses it reads) and `preserves` (analyses still valid after it
  changes the module); `run(module, am)` returns `PassResult(module, modified, details)`.
- `verify_function = True` on a transform means it claims to preserve every member's function: the
  manager then checks outputs on calibration data (see `codec.passes.manager`).

Writing a pass: see README "Writing a pass" and `tests/plugin_example/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np

from codec.errors import CodecError, ConfigError, ShapeError
from codec.ir.network import NetworkIR


class PassError(CodecError):
    """A pass failed or refused its input; the message names the pass."""


@dataclass
class Calibration:
    """The calibration inputs (shaped for the members' input), read in batches so sets of any size fit."""

    x: np.ndarray
    batch_size: int = 256

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise ShapeError("the calibration set is empty")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch size must be positive, got {self.batch_size}")

    def __len__(self) -> int:
        return len(self.x)

    def batches(self) -> Iterable[np.ndarray]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start : start + self.batch_size]


@dataclass
class EnsembleModule:
    """What passes operate on: the members being optimised (first is main, second peer), the calibration
    data, and what passes have produced so far (the CSN)."""

    members: dict[str, NetworkIR]
    calibration: Calibration
    csn: Any = None  # codec.ir.csn.CSN once CSNE has run

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("no members to optimise")
        first = next(iter(self.members.values()))
        for name, net in self.members.items():
            if tuple(first.input_shape) != tuple(net.input_shape):
                raise ShapeError(
                    f"members {first.name!r} and {name!r} take different inputs: "
                    f"{list(first.input_shape)} vs {list(net.input_shape)}"
                )
        if tuple(self.calibration.x.shape[1:]) != tuple(first.input_shape):
            raise ShapeError(
                f"calibration examples have shape {list(self.calibration.x.shape[1:])} but the members expect "
                f"{list(first.input_shape)}"
            )

    @property
    def main(self) -> NetworkIR:
        return next(iter(self.members.values()))

    @property
    def main_name(self) -> str:
        return next(iter(self.members))

    @property
    def peer(self) -> NetworkIR:
        if len(self.members) < 2:
            raise ConfigError("this pass needs a peer member (codec opt ... --peer peer.onnx)")
        return list(self.members.values())[1]

    def replace(self, **changes) -> "EnsembleModule":
        return dataclasses.replace(self, **changes)


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and what it did (for the report)."""

    module: EnsembleModule
    modified: bool
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base of analyses and transforms. Subclasses are frozen dataclasses: fields are options."""

    name: ClassVar[str] = ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    def spec(self) -> str:
        """The pipeline text that rebuilds this pass, e.g. `nda{fire=0.7}`."""
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}{{{opts}}}" if opts else self.name

    def check_options(self) -> None:
        """Raise ConfigError for impossible option values (e.g. thresholds outside [0, 1])."""


@dataclass(frozen=True)
class Analysis(Pass):
    """A read-only computation over the module; its result is cached by the AnalysisManager."""

    def compute(self, module: EnsembleModule, am: "AnalysisManagerProtocol") -> Any:
        raise NotImplementedError

    def summarize(self, result: Any) -> dict:
        """A JSON-ready summary of `result` for the report."""
        return {}


@dataclass(frozen=True)
class Transform(Pass):
    """A pass that may change the module."""

    requires: ClassVar[tuple[type[Analysis], ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    verify_function: ClassVar[bool] = False

    def run(self, module: EnsembleModule, am: "AnalysisManagerProtocol") -> PassResult:
        raise NotImplementedError


class AnalysisManagerProtocol:  # documented interface, implemented by codec.passes.manager.AnalysisManager
    def get(self, analysis: type[Analysis] | Analysis, module: EnsembleModule) -> Any: ...


def check_fraction(pass_name: str, option: str, value: float) -> None:
    """Thresholds are fractions: anything outside [0, 1] can never (or always) hold."""
    if not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"{pass_name}: option {option}={value} is impossible; it must lie in [0, 1]")
