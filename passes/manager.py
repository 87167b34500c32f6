"""The AnalysisManager (lazy, cached analyses with invalidation) and the PassManager (runs a pipeline,
verifies function-preserving transforms, records what each pass did and how long it took)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from codec.errors import CodecError, ConfigError
from codec.passes.base import Analysis, EnsembleModule, Pass, PassError, PassResult, Transform


class AnalysisManager:
    """Computes analyses on demand and caches one result per analysis class.

    Options given in the pipeline (`nda{fire=0.7}`) become the configuration used when a transform later
    asks for that analysis by class. A transform that modified the module invalidates every cached result
    except those it declares in `preserves` (or refreshes itself with `update`).
    """

    def __init__(self) -> None:
        self._configured: dict[type[Analysis], Analysis] = {}
        self._cache: dict[type[Analysis], tuple[Analysis, Any]] = {}
        self.timings: list[dict] = []

    def configure(self, analysis: Analysis) -> None:
        self._configured[type(analysis)] = analysis

    def instance(self, analysis: type[Analysis] | Analysis) -> Analysis:
        if isinstance(analysis, Analysis):
            return analysis
        return self._configured.get(analysis) or analysis()

    def get(self, analysis: type[Analysis] | Analysis, module: EnsembleModule) -> Any:
        inst = self.instance(analysis)
        cached = self._cache.get(type(inst))
        if cached is not None and cached[0] == inst:
            return cached[1]
        start = time.perf_counter()
        result = inst.compute(module, self)
        self.timings.append({"analysis": inst.name, "spec": inst.spec(), "seconds": time.perf_counter() - start})
        self._cache[type(inst)] = (inst, result)
        return result

    def cached(self, analysis: type[Analysis]) -> bool:
        return analysis in self._cache

    def update(self, analysis: type[Analysis], result: Any) -> None:
        """Replace a cached result (a transform that keeps an analysis valid by editing it)."""
        if analysis in self._cache:
            self._cache[analysis] = (self._cache[analysis][0], result)

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> list[str]:
        dropped = [cls.name for cls in self._cache if cls not in preserved]
        self._cache = {cls: v for cls, v in self._cache.items() if cls in preserved}
        return dropped


def verify_outputs(before: EnsembleModule, after: EnsembleModule, atol: float, limit: int | None = None) -> dict[str, float]:
    """Max abs output difference per member between two modules, on the calibration inputs (the first
    `limit` of them; None: all)."""
    from codec.ir.lower import lower, to_bytes
    from codec.runtime.execution.session import create_session

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
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            ya = a.run(None, {a.get_inputs()[0].name: batch})[0]
            yb = b.run(None, {b.get_inputs()[0].name: batch})[0]
            diff = np.abs(ya.astype(np.float64) - yb)
            diff[np.isnan(ya) & np.isnan(yb)] = 0.0  # NaN where the original was NaN too is unchanged
            d = float(diff.max()) if diff.size else 0.0
            # builtin max drops a NaN (nan > x is False): a NaN difference must stay the worst
            if math.isnan(d) or (not math.isnan(worst) and d > worst):
                worst = d
        errors[name] = worst
    return errors


class PassManager:
    """Runs passes in order over an EnsembleModule.

    Args:
        passes: pass instances (see `codec.passes.registry.parse_pipeline`).
        verify_inputs: how many calibration inputs verification runs (None: all). Verification costs two
            forward passes per member; 2,048 inputs by default keep it well below the profiling cost, and
            a removed neuron that is not dead shows on almost every input.
        verify: check every transform that claims to preserve function (`verify_function`) on the
            calibration data; a failure raises PassError naming the pass and the max error.
        atol: the largest output difference verification accepts.
        after_pass: called as `after_pass(pass, module, record)` after each pass (--print-ir-after-all).
    """

    def __init__(
        self,
        passes: list[Pass],
        verify: bool = True,
        verify_inputs: int | None = 2048,
        atol: float = 1e-5,
        after_pass: Callable[[Pass, EnsembleModule, dict], None] | None = None,
    ) -> None:
        # a bad tolerance or input count would switch the function-preservation check off silently
        # (atol=nan accepted every difference, verify_inputs=-1 verified nothing)
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
            raise ConfigError(f"atol must be a finite number >= 0, got {atol!r}")
        if verify_inputs is not None and (isinstance(verify_inputs, bool) or not isinstance(verify_inputs, int) or verify_inputs < 1):
            raise ConfigError(f"verify_inputs must be a positive number of inputs (or None for all), got {verify_inputs!r}")
        self.passes = passes
        self.verify = verify
        self.verify_inputs = verify_inputs
        self.atol = atol
        self.after_pass = after_pass
        self.analyses = AnalysisManager()
        self.results: dict[str, Any] = {}  # each analysis pass's result as it stood when it ran

    def run(self, module: EnsembleModule) -> tuple[EnsembleModule, dict]:
        records = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            done = len(self.analyses.timings)
            try:
                record = self._run_one(p, module)
            except CodecError as exc:
                if isinstance(exc, PassError):
                    raise
                raise PassError(f"pass {p.name!r} ({self._ran(index)}): {exc}") from exc
            except Exception as exc:  # a bug in a pass: still say which one, and what ran before it
                raise PassError(f"pass {p.name!r} failed ({self._ran(index)}): {type(exc).__name__}: {exc}") from exc
            module = record.pop("module")
            record["seconds"] = time.perf_counter() - start
            record["analyses_computed"] = self.analyses.timings[done:]
            records.append(record)
            if self.after_pass is not None:
                self.after_pass(p, module, record)
        report = {
            "pipeline": ",".join(p.spec() for p in self.passes),
            "passes": records,
            "seconds": sum(r["seconds"] for r in records),
        }
        return module, report

    def _ran(self, index: int) -> str:
        ran = [p.name for p in self.passes[:index]]
        return f"after {', '.join(ran)}" if ran else "first pass"

    def _run_one(self, p: Pass, module: EnsembleModule) -> dict:
        record: dict = {"pass": p.name, "spec": p.spec(), "kind": "analysis" if isinstance(p, Analysis) else "transform"}
        if isinstance(p, Analysis):
            self.analyses.configure(p)
            result = self.analyses.get(p, module)
            self.results[p.name] = result
            record.update(modified=False, details=p.summarize(result), module=module)
            return record
        if not isinstance(p, Transform):
            raise PassError(f"{type(p).__name__} is neither an Analysis nor a Transform")
        for required in p.requires:
            self.analyses.get(required, module)
        result: PassResult = p.run(module, self.analyses)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
        record.update(modified=result.modified, details=result.details, module=result.module)
        if result.modified:
            record["invalidated"] = self.analyses.invalidate(p.preserves)
            if self.verify and p.verify_function:
                errors = verify_outputs(module, result.module, self.atol, self.verify_inputs)
                record["verified_max_abs_error"] = errors
                # NaN compares false with everything: a NaN error is the worst, never a pass
                worst_member = max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k]) if errors else None
                if worst_member is not None and not errors[worst_member] <= self.atol:
                    raise PassError(
                        f"verification failed after pass {p.name!r}: member {worst_member!r} outputs changed by "
                        f"up to {errors[worst_member]:.3g} (> {self.atol:g}) on the calibration inputs"
                    )
        return record
