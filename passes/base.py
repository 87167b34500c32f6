"""The pass API: modules, analyses, transforms and their results.

Shape (after onnx-ir, MLIR and LLVM's new pass manager, xDSL):
- A pass is a frozen dataclass with `name: ClassVar[str]`; its fields are its options, so the pipeline
  text `nda{fire=0.7}` builds `NeuronDependenceAnalysis(fire=0.7)`. Options are checked when the pass is
  built, from Python or from text alike (`__post_init__`: their types, then `check_options`).
- An `Analysis` is read-only: `compute(module, am)` returns a result the AnalysisManager caches (keyed by
  the analysis and its options) until a transform that does not preserve it modifies the module, or
  until an analysis it read (through `am.get`) is invalidated.
- A `Transform` declares `requires` (analyses it reads) and `preserves` (analyses still valid after it
  changes the module); `run(module, am)` returns `PassResult(module, modified, details)`.
- `requires_module(module)` states what a pass needs of the module itself (csne: a peer); the manager
  checks it for every pass of a pipeline before the first pass runs, so nothing is profiled in vain.
- `in_place` declares whether a transform edits the members it is given (False, the default: it works
  on copies, and the manager checks that the input members are unchanged afterwards).
- `verify_function = True` on a transform means it claims to preserve every member's function: the
  manager then checks outputs on calibration data against the members as they were before the pass.

Writing a pass: see README "Writing a pass" and `tests/plugin_example/`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from codec.errors import CodecError, ConfigError, ShapeError
from codec.ir.csn import CSN
from codec.ir.network import NetworkIR
from codec.passes.options import check_value, format_value, option_types, type_name


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


DEFAULT_ROLE = "<default>"  # EnsembleModule's main_name / peer_name when the caller names none


@dataclass
class EnsembleModule:
    """What passes operate on: the members being optimised, which of them is main and which is peer, the
    calibration data, and what passes have produced so far (the CSN).

    Attributes:
        members: every member by name.
        calibration: the calibration inputs.
        csn: the common sub-network once CSNE has run, else None.
        main_name: the member CSNE rewrites (its neurons are matched to peer's). Default: the member
            called "main", else the first.
        peer_name: the member main is compared with, or None for none. Default: the member called
            "peer", else the second member if there are two or more (what callers relied on before the
            roles were named).

    `EnsembleModule.of(main, calibration, peer=...)` builds one from the networks themselves.
    """

    members: dict[str, NetworkIR]
    calibration: Calibration
    csn: CSN | None = None
    main_name: str = DEFAULT_ROLE
    peer_name: str | None = DEFAULT_ROLE

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("no members to optimise")
        names = list(self.members)
        if self.main_name == DEFAULT_ROLE:
            self.main_name = "main" if "main" in self.members else names[0]
        if self.peer_name == DEFAULT_ROLE:
            others = [n for n in names if n != self.main_name]
            self.peer_name = "peer" if "peer" in others else (others[0] if others else None)
        for role, name in (("main", self.main_name), ("peer", self.peer_name)):
            if name is not None and name not in self.members:
                raise ConfigError(f"the {role} member {name!r} is not among the members ({', '.join(names)})")
        if self.main_name == self.peer_name:
            raise ConfigError(f"member {self.main_name!r} cannot be both main and peer")
        first = self.members[self.main_name]
        for name, net in self.members.items():
            if tuple(first.input_shape) != tuple(net.input_shape):
                raise ShapeError(
                    f"members {self.main_name!r} and {name!r} take different inputs: "
                    f"{list(first.input_shape)} vs {list(net.input_shape)}"
                )
        if tuple(self.calibration.x.shape[1:]) != tuple(first.input_shape):
            raise ShapeError(
                f"calibration examples have shape {list(self.calibration.x.shape[1:])} "
                "but the members expect "
                f"{list(first.input_shape)}"
            )

    @classmethod
    def of(
        cls,
        main: NetworkIR,
        calibration: Calibration | np.ndarray,
        peer: NetworkIR | None = None,
        others: dict[str, NetworkIR] | None = None,
    ) -> EnsembleModule:
        """A module whose members are `main` (named "main"), `peer` ("peer") and `others` by name."""
        members = {"main": main}
        if peer is not None:
            members["peer"] = peer
        for name, net in (others or {}).items():
            if name in members:
                raise ConfigError(f"member name {name!r} is taken by main or peer")
            members[name] = net
        if not isinstance(calibration, Calibration):
            calibration = Calibration(np.asarray(calibration))
        return cls(members, calibration, main_name="main", peer_name="peer" if peer is not None else None)

    @property
    def main(self) -> NetworkIR:
        return self.members[self.main_name]

    @property
    def has_peer(self) -> bool:
        return self.peer_name is not None

    @property
    def peer(self) -> NetworkIR:
        if self.peer_name is None:
            raise ConfigError("this pass needs a peer member (codec opt ... --peer peer.onnx)")
        return self.members[self.peer_name]

    def replace(self, **changes) -> EnsembleModule:
        """A new module with some fields changed; main and peer keep their names."""
        return dataclasses.replace(self, **changes)


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and what it did (for the report).

    `modified` is True exactly when the returned module differs from the input one in something a later
    pass or the output can see: a member's IR (weights, neurons, roles, layers), the set of members, or
    the CSN. A result that says False must hand back the module it was given, or one equal to it (the
    manager checks, by fingerprinting the members and comparing the CSN). A modified module drops every
    cached analysis the transform does not preserve.
    """

    module: EnsembleModule
    modified: bool
    details: dict = field(default_factory=dict)


# noqa B024 below: Pass's subclasses Analysis and Transform declare the abstract methods
@dataclass(frozen=True)
class Pass(abc.ABC):  # noqa: B024
    """Base of analyses and transforms. Subclasses are frozen dataclasses: fields are options.

    A subclass that needs its own `__post_init__` calls `super().__post_init__()` from it.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_option_types()
        self.check_options()

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    def spec(self) -> str:
        """The pipeline text that rebuilds this pass, e.g. `nda{fire=0.7}`."""
        opts = ",".join(f"{f.name}={format_value(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.name}{{{opts}}}" if opts else self.name

    def _check_option_types(self) -> None:
        for option, kind in option_types(type(self)).items():
            value = getattr(self, option)
            if not check_value(kind, value):
                raise ConfigError(
                    f"{self.name or type(self).__name__}: option {option}={value!r} "
                    f"is not a valid {type_name(kind)}"
                )

    def check_options(self) -> None:  # noqa: B027 (an optional hook: no checks by default)
        """Raise ConfigError for impossible option values (e.g. thresholds outside [0, 1])."""

    def requires_module(self, module: EnsembleModule) -> None:  # noqa: B027 (an optional hook)
        """Raise PassError (naming the pass) when this pass cannot run on `module` at all (e.g. csne
        without a peer). Checked before any analysis is computed."""


@dataclass(frozen=True)
class Analysis(Pass):
    """A read-only computation over the module; its result is cached by the AnalysisManager.

    An analysis reads other analyses through `am.get`; the manager records that, and drops this result
    when one of them is invalidated.
    """

    @abc.abstractmethod
    def compute(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> Any:
        """The analysis result for `module` (never modify the module or another analysis's result)."""

    def summarize(self, result: Any) -> dict:
        """A JSON-ready summary of `result` for the report."""
        return {}


@dataclass(frozen=True)
class Transform(Pass):
    """A pass that may change the module.

    Class attributes (declarations the manager acts on):
        requires: analyses computed before `run` (and available through `am.get`).
        preserves: analyses still valid after a run that modified the module (kept, or refreshed with
            `am.update`); every other cached analysis is dropped.
        in_place: False (the default) promises that `run` leaves the members it was given untouched and
            returns new ones (`net.copy()` first); the manager checks it. True says `run` edits them; the
            manager then keeps a copy of the members beforehand, to verify against.
        verify_function: the transform claims every member computes the same outputs afterwards; the
            manager checks that on the calibration inputs.
    """

    requires: ClassVar[tuple[type[Analysis], ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    in_place: ClassVar[bool] = False
    verify_function: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> PassResult:
        """Transform `module`; return the result module, whether it changed, and details for the report."""


@runtime_checkable
class AnalysisManagerProtocol(Protocol):
    """What a pass may ask of the analysis manager (implemented by `codec.passes.manager.AnalysisManager`)."""

    def get(self, analysis: type[Analysis] | Analysis, module: EnsembleModule) -> Any:
        """The (cached) result of `analysis` on `module`."""
        ...

    def update(self, analysis: type[Analysis], result: Any) -> None:
        """Replace a cached result: a transform that keeps an analysis valid by editing it."""
        ...


def check_fraction(pass_name: str, option: str, value: float) -> None:
    """Thresholds are fractions: anything outside [0, 1] can never (or always) hold."""
    if not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"{pass_name}: option {option}={value} is impossible; it must lie in [0, 1]")
