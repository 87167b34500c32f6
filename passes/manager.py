"""The AnalysisManager (lazy, cached analyses with transitive invalidation) and the PassManager (runs a
pipeline; checks each pass's preconditions, its in-place/functional contract, the IR it leaves and, for
function-preserving transforms, every member's outputs; records what each pass did).

Instrumentation (timings, --print-ir-after-all) is a hook object, `Instrumentation`, that both managers
call around each pass and each analysis computation; the cache itself only caches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from codec.errors import CodecError, ConfigError
from codec.ir.verify import IRVerificationError, fingerprint, verify_network
from codec.passes.base import Analysis, EnsembleModule, Pass, PassError, PassResult, Transform


class Instrumentation:
    """Hooks around passes and analysis computations (MLIR's PassInstrumentation); every method is a no-op
    here. Give instances to `PassManager(instrumentations=[...])`."""

    def before_pass(self, p: Pass, module: EnsembleModule) -> None:
        """Called before pass `p` runs on `module`."""

    def after_pass(self, p: Pass, module: EnsembleModule, record: dict) -> None:
        """Called after `p`, with the module it produced and its report record."""

    def before_analysis(self, analysis: Analysis, module: EnsembleModule) -> None:
        """Called before `analysis` is computed (not when a cached result is returned)."""

    def after_analysis(self, analysis: Analysis, module: EnsembleModule) -> None:
        """Called after `analysis` was computed."""


class AnalysisTimings(Instrumentation):
    """Records how long each analysis computation took (nested ones included, each on its own)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._started: list[float] = []

    def before_analysis(self, analysis: Analysis, module: EnsembleModule) -> None:
        self._started.append(time.perf_counter())

    def after_analysis(self, analysis: Analysis, module: EnsembleModule) -> None:
        seconds = time.perf_counter() - self._started.pop()
        self.records.append({"analysis": analysis.name, "spec": analysis.spec(), "seconds": seconds})


class _AfterPassCallback(Instrumentation):
    def __init__(self, callback: Callable[[Pass, EnsembleModule, dict], None]) -> None:
        self.callback = callback

    def after_pass(self, p: Pass, module: EnsembleModule, record: dict) -> None:
        self.callback(p, module, record)


class AnalysisManager:
    """Computes analyses on demand and caches one result per analysis class.

    Options given in the pipeline (`nda{fire=0.7}`) become the configuration used when a transform later
    asks for that analysis by class. A transform that modified the module invalidates every cached result
    except those it declares in `preserves` (or refreshes itself with `update`). Invalidation is
    transitive: the manager records which analyses each analysis read through `get` while it was
    computed, and a result is dropped when anything it read is dropped or replaced.
    """

    def __init__(self, instrumentations: list[Instrumentation] | None = None) -> None:
        self._configured: dict[type[Analysis], Analysis] = {}
        self._cache: dict[type[Analysis], tuple[Analysis, Any]] = {}
        self._reads: dict[type[Analysis], set[type[Analysis]]] = {}  # analysis -> analyses it read
        self._computing: list[type[Analysis]] = []
        self._dropped: list[
            str
        ] = []  # dropped since the last `invalidate` (by `update` or a re-configuration)
        self.instrumentations = list(instrumentations or [])

    def configure(self, analysis: Analysis) -> None:
        self._configured[type(analysis)] = analysis

    def instance(self, analysis: type[Analysis] | Analysis) -> Analysis:
        if isinstance(analysis, Analysis):
            return analysis
        return self._configured.get(analysis) or analysis()

    def get(self, analysis: type[Analysis] | Analysis, module: EnsembleModule) -> Any:
        inst = self.instance(analysis)
        cls = type(inst)
        if self._computing:
            self._reads[self._computing[-1]].add(cls)
        cached = self._cache.get(cls)
        if cached is not None and cached[0] == inst:
            return cached[1]
        if cls in self._computing:
            chain = " -> ".join(c.name for c in [*self._computing, cls])
            raise PassError(f"analyses read each other in a cycle: {chain}")
        if cached is not None:  # asked for with other options: what was computed from the old result is stale
            self._drop(self._dependents({cls}) - {cls})
        self._reads[cls] = set()
        self._computing.append(cls)
        for hook in self.instrumentations:
            hook.before_analysis(inst, module)
        try:
            result = inst.compute(module, self)
        finally:
            self._computing.pop()
        for hook in self.instrumentations:
            hook.after_analysis(inst, module)
        self._cache[cls] = (inst, result)
        return result

    def cached(self, analysis: type[Analysis]) -> bool:
        return analysis in self._cache

    def reads(self, analysis: type[Analysis]) -> set[type[Analysis]]:
        """The analyses `analysis` read through `get` when it was last computed."""
        return set(self._reads.get(analysis, ()))

    def update(self, analysis: type[Analysis], result: Any) -> None:
        """Replace a cached result (a transform that keeps an analysis valid by editing it). Results
        computed from the old one are dropped."""
        if analysis in self._cache:
            self._cache[analysis] = (self._cache[analysis][0], result)
            self._drop(self._dependents({analysis}) - {analysis})

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> list[str]:
        """Drop every cached result not in `preserved`, and every result that read a dropped one; return
        the names of all results dropped since the last call (those `update` dropped included)."""
        self._drop(self._dependents({cls for cls in self._cache if cls not in preserved}))
        dropped, self._dropped = self._dropped, []
        return dropped

    def _dependents(self, roots: set[type[Analysis]]) -> set[type[Analysis]]:
        """`roots` and every cached analysis that read one of them, directly or through others."""
        stale = set(roots)
        changed = True
        while changed:
            changed = False
            for cls in self._cache:
                if cls not in stale and self._reads.get(cls, set()) & stale:
                    stale.add(cls)
                    changed = True
        return stale

    def _drop(self, classes: set[type[Analysis]]) -> None:
        for cls in list(self._cache):
            if cls in classes:
                del self._cache[cls]
                self._dropped.append(cls.name)


def verify_outputs(
    before: EnsembleModule, after: EnsembleModule, atol: float, limit: int | None = None
) -> dict[str, float]:
    """Max abs output difference per member between two modules, on the calibration inputs (the first
    `limit` of them; None: all)."""
    from codec.ir.lower import lower, to_bytes
    from codec.runtime.execution.session import create_session, run_batches

    errors = {}
    for name, net in after.members.items():
        if name not in before.members:
            continue
        a = create_session(to_bytes(lower(before.members[name])))
        b = create_session(to_bytes(lower(net)))
        worst = 0.0
        seen = 0
        for batch in before.calibration.batches():
            if limit is not None and seen >= limit:
                break
            batch = batch[: None if limit is None else limit - seen]
            seen += len(batch)
            # fed by the one input rule (codec.runtime.execution.inputs), like every other run
            ya = np.concatenate([out[0] for out in run_batches(a, batch, len(batch), model=name)])
            yb = np.concatenate([out[0] for out in run_batches(b, batch, len(batch), model=name)])
            diff = np.abs(ya.astype(np.float64) - yb)
            diff[np.isnan(ya) & np.isnan(yb)] = 0.0  # NaN where the original was NaN too is unchanged
            d = float(diff.max()) if diff.size else 0.0
            # builtin max drops a NaN (nan > x is False): a NaN difference must stay the worst
            if math.isnan(d) or (not math.isnan(worst) and d > worst):
                worst = d
        errors[name] = worst
    return errors


def member_fingerprints(module: EnsembleModule) -> dict[str, str]:
    """A digest of every member (weights included), by name."""
    return {name: fingerprint(net) for name, net in module.members.items()}


class PassManager:
    """Runs passes in order over an EnsembleModule.

    Before the first pass, every pass's `requires_module` is checked on the input module, so a pipeline
    that cannot run is refused before anything is profiled. Around each transform the manager checks
    its contract: a transform declared functional (`in_place = False`) must leave its input members
    unchanged, and one that reports `modified=False` must return members equal to its input and the same
    CSN. After each transform that modified the module, every member (and the CSN network) must pass
    the IR verifier (`codec.ir.verify`), and a `verify_function` transform's outputs are compared with
    the members as they were before it ran.

    Args:
        passes: pass instances (see `codec.passes.registry.parse_pipeline`).
        verify: check every transform that claims to preserve function (`verify_function`) on the
            calibration data; a failure raises PassError naming the pass and the max error.
        verify_inputs: how many calibration inputs verification runs (None: all). Verification costs two
            forward passes per member; 2,048 inputs by default keep it well below the profiling cost, and
            a removed neuron that is not dead shows on almost every input.
        atol: the largest output difference verification accepts.
        after_pass: called as `after_pass(pass, module, record)` after each pass (--print-ir-after-all).
        verify_ir: run the IR verifier after every transform that modified the module.
        instrumentations: further hooks around passes and analyses (see `Instrumentation`).
    """

    def __init__(
        self,
        passes: list[Pass],
        verify: bool = True,
        verify_inputs: int | None = 2048,
        atol: float = 1e-5,
        after_pass: Callable[[Pass, EnsembleModule, dict], None] | None = None,
        verify_ir: bool = True,
        instrumentations: list[Instrumentation] | None = None,
    ) -> None:
        # a bad tolerance or input count would switch the function-preservation check off silently
        # (atol=nan accepted every difference, verify_inputs=-1 verified nothing)
        if (
            isinstance(atol, bool)
            or not isinstance(atol, (int, float))
            or not math.isfinite(atol)
            or atol < 0
        ):
            raise ConfigError(f"atol must be a finite number >= 0, got {atol!r}")
        if verify_inputs is not None and (
            isinstance(verify_inputs, bool) or not isinstance(verify_inputs, int) or verify_inputs < 1
        ):
            raise ConfigError(
                f"verify_inputs must be a positive number of inputs (or None for all), got {verify_inputs!r}"
            )
        self.passes = passes
        self.verify = verify
        self.verify_inputs = verify_inputs
        self.atol = atol
        self.verify_ir = verify_ir
        self.timings = AnalysisTimings()
        self.instrumentations: list[Instrumentation] = [self.timings, *(instrumentations or [])]
        if after_pass is not None:
            self.instrumentations.append(_AfterPassCallback(after_pass))
        self.analyses = AnalysisManager(self.instrumentations)
        self.results: dict[str, Any] = {}  # each analysis pass's result as it stood when it ran

    def run(self, module: EnsembleModule) -> tuple[EnsembleModule, dict]:
        self.check_preconditions(module)
        records = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            done = len(self.timings.records)
            for hook in self.instrumentations:
                hook.before_pass(p, module)
            try:
                record = self._run_one(p, module)
            except CodecError as exc:
                if isinstance(exc, PassError):
                    raise
                raise PassError(f"pass {p.name!r} ({self._ran(index)}): {exc}") from exc
            except Exception as exc:  # a bug in a pass: still say which one, and what ran before it
                raise PassError(
                    f"pass {p.name!r} failed ({self._ran(index)}): {type(exc).__name__}: {exc}"
                ) from exc
            module = record.pop("module")
            record["seconds"] = time.perf_counter() - start
            record["analyses_computed"] = self.timings.records[done:]
            records.append(record)
            for hook in self.instrumentations:
                hook.after_pass(p, module, record)
        report = {
            "pipeline": ",".join(p.spec() for p in self.passes),
            "passes": records,
            "seconds": sum(r["seconds"] for r in records),
        }
        return module, report

    def check_preconditions(self, module: EnsembleModule) -> None:
        """Raise PassError if some pass of the pipeline (or an analysis a transform requires) cannot run on
        `module`; cheap: nothing is computed."""
        for p in self.passes:
            needed = [p] + [self.analyses.instance(a) for a in getattr(p, "requires", ())]
            for q in needed:
                try:
                    q.requires_module(module)
                except PassError:
                    raise
                except CodecError as exc:
                    raise PassError(f"pass {q.name!r} cannot run on this module: {exc}") from exc

    def _ran(self, index: int) -> str:
        ran = [p.name for p in self.passes[:index]]
        return f"after {', '.join(ran)}" if ran else "first pass"

    def _run_one(self, p: Pass, module: EnsembleModule) -> dict:
        record: dict = {
            "pass": p.name,
            "spec": p.spec(),
            "kind": "analysis" if isinstance(p, Analysis) else "transform",
        }
        p.requires_module(module)
        before = member_fingerprints(module)
        if isinstance(p, Analysis):
            self.analyses.configure(p)
            result = self.analyses.get(p, module)
            self._check_untouched(p, module, before, "an analysis is read-only")
            self.results[p.name] = result
            record.update(modified=False, details=p.summarize(result), module=module)
            return record
        if not isinstance(p, Transform):
            raise PassError(f"{type(p).__name__} is neither an Analysis nor a Transform")
        for required in p.requires:
            self.analyses.instance(required).requires_module(module)
            self.analyses.get(required, module)
        baseline = module
        if p.in_place and self.verify and p.verify_function:
            # the pass will edit these members: keep them as they were, to verify against
            baseline = module.replace(members={name: net.copy() for name, net in module.members.items()})
        result: PassResult = p.run(module, self.analyses)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
        if not p.in_place:
            self._check_untouched(
                p,
                module,
                before,
                "it declares in_place = False (work on net.copy(), or declare in_place = True)",
            )
        if not result.modified:
            self._check_unmodified(p, module, before, result.module)
        record.update(modified=result.modified, details=result.details, module=result.module)
        if result.modified:
            if self.verify_ir:
                self._verify_ir(p, result.module)
            record["invalidated"] = self.analyses.invalidate(p.preserves)
            if self.verify and p.verify_function:
                errors = verify_outputs(baseline, result.module, self.atol, self.verify_inputs)
                record["verified_max_abs_error"] = errors
                # NaN compares false with everything: a NaN error is the worst, never a pass
                worst_member = (
                    max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k])
                    if errors
                    else None
                )
                if worst_member is not None and not errors[worst_member] <= self.atol:
                    raise PassError(
                        f"verification failed after pass {p.name!r}: member {worst_member!r} "
                        "outputs changed by "
                        f"up to {errors[worst_member]:.3g} (> {self.atol:g}) on the calibration inputs"
                    )
        return record

    @staticmethod
    def _check_untouched(p: Pass, module: EnsembleModule, before: dict[str, str], why: str) -> None:
        after = member_fingerprints(module)
        changed = [name for name in before if after.get(name) != before[name]]
        if changed or set(after) != set(before):
            which = ", ".join(repr(n) for n in changed) or "the set of members"
            raise PassError(f"pass {p.name!r} changed its input member(s) {which}, but {why}")

    @staticmethod
    def _check_unmodified(
        p: Pass, module: EnsembleModule, before: dict[str, str], out: EnsembleModule
    ) -> None:
        after = member_fingerprints(out)
        changed = sorted(set(before) ^ set(after)) + [
            n for n in before if n in after and after[n] != before[n]
        ]
        if out.csn is not module.csn:
            changed.append("the CSN")
        if changed:
            raise PassError(
                f"pass {p.name!r} returned modified=False but changed {', '.join(map(str, changed))}; "
                "a result that differs from its input is modified=True"
            )

    @staticmethod
    def _verify_ir(p: Pass, module: EnsembleModule) -> None:
        networks = dict(module.members)
        if module.csn is not None and module.csn.network is not None:
            networks["the CSN"] = module.csn.network
        for net in networks.values():
            try:
                verify_network(net)
            except IRVerificationError as exc:
                raise PassError(f"pass {p.name!r} left invalid IR: {exc}") from exc
