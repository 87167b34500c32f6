"""`codec compile`: the whole CODE pipeline, resumable.

train main and peer -> passes (dna, dne, nda, csne) -> grow N-2 members around the frozen CSN -> fused
ensemble ONNX -> evaluation and report.

The run directory:
    config.json            what was asked (a resumed run must ask the same)
    state.json             what is done, with each finished step's facts (times, epochs, scores)
    members/               main.onnx, peer.onnx (trained conventionally), grown_<i>.onnx
    checkpoints/           one per member in training (deleted when the member is finished)
    opt/                   passes' outputs: rewritten main.onnx, peer.onnx, csn.onnx, csn.json, report.json
    ensemble.onnx          the fused ensemble (dispatch, CSN once, members, collect)
    report.json            per-phase time, quality of every member and of the ensemble as it grows,
                           memory footprint M, redundancy R, options

Every artifact is written atomically and a finished member is never trained again: an interrupted compile
(Ctrl-C, SIGTERM, a crash) resumes with `--resume` where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from codec.errors import ConfigError, check_interrupt
from codec.io import regular_file, write_json_atomic
from codec.pipelines.data import RecipeData, load_recipe_data
from codec.runtime.training.grow import GrowOptions
from codec.version import __version__

log = logging.getLogger("codec.pipelines.compile")


@dataclass
class CompileOptions:
    """Everything that decides a compile's result (saved as config.json)."""

    recipe: str
    members: int = 4
    seed: int = 0
    passes: str = "dna,dne,nda,csne"
    calibration: int | None = 10_000  # training inputs profiled by the passes (None: all)
    grow: GrowOptions = field(default_factory=GrowOptions)
    keep_main: str = "rewritten"  # "rewritten": main shares the CSN; "whole": main as trained
    criterion: str | None = None  # default: prod for classifiers, mean for autoencoders
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields replacing the recipe's
    data_dir: str | None = None

    def validate(self) -> None:
        if self.members < 2:
            raise ConfigError(f"--members must be at least 2 (main and peer), got {self.members}")
        if self.keep_main not in ("rewritten", "whole"):
            raise ConfigError(f"keep_main={self.keep_main!r}; choose rewritten or whole")
        if self.calibration is not None and self.calibration < 1:
            raise ConfigError(f"calibration size must be positive, got {self.calibration}")
        from codec.passes.registry import parse_pipeline

        parse_pipeline(self.passes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grow"] = self.grow.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompileOptions":
        d = dict(d)
        d["grow"] = GrowOptions(**d.get("grow", {}))
        return cls(**d)


class Run:
    """A run directory and its state; every write is atomic."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.members = self.path / "members"
        self.checkpoints = self.path / "checkpoints"
        self.opt = self.path / "opt"
        self.state_path = self.path / "state.json"
        self.state: dict = {"steps": {}}

    def prepare(self, options: CompileOptions, resume: bool) -> None:
        config = self.path / "config.json"
        if config.exists() and not resume:
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it, or choose another -o")
        if resume and config.exists():
            saved = _read_run_json(config, dict)
            if saved != json.loads(json.dumps(options.to_dict())):
                changed = sorted(k for k in set(saved) | set(options.to_dict()) if saved.get(k) != json.loads(json.dumps(options.to_dict())).get(k))
                raise ConfigError(f"cannot resume {self.path}: options differ from the original run ({', '.join(changed)})")
            if self.state_path.exists():
                self.state = _read_run_json(self.state_path, dict)
                if not isinstance(self.state.get("steps"), dict) or not all(isinstance(v, dict) for v in self.state["steps"].values()):
                    raise ConfigError(_damaged(self.state_path, "it has no 'steps' object of step records"))
        for d in (self.path, self.members, self.checkpoints, self.opt):
            d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config, options.to_dict())

    def done(self, step: str) -> dict | None:
        return self.state["steps"].get(step)

    def finish(self, step: str, facts: dict) -> None:
        self.state["steps"][step] = facts
        write_json_atomic(self.state_path, self.state)
        check_interrupt()  # between artifacts: honour a stop that an import turned into another exception


def _train_conventional(run: Run, names: list[str], seeds: dict, recipe, config, data: RecipeData,
                        quiet: bool) -> dict[str, tuple[dict, bytes]]:
    """Train members the ordinary way (random init), together in one engine run (stacked when the
    architecture allows); returns each one's facts and ONNX bytes."""
    from codec.pipelines.train import member_facts
    from codec.runtime.training.engine import train_members
    from codec.runtime.training.train import export_onnx

    config = dataclasses.replace(config, quiet=quiet)
    modules = [recipe.build(data.input_shape, data.num_outputs, seed=seeds[name]) for name in names]
    trained = train_members(modules, data.x_train, data.y_train, data.x_val, data.y_val, config,
                            seeds=[seeds[name] for name in names], checkpoint_path=_group_checkpoint(run, names),
                            resume=True, names=names, desc="+".join(names))
    out = {}
    for name, result in zip(names, trained.members):
        part = export_onnx(result.module, run.checkpoints / f"{name}.onnx.part", data.input_shape, task=recipe.task)
        blob = part.read_bytes()
        part.unlink()
        stacked = names.index(name) in trained.stacked
        facts = {"path": f"members/{name}.onnx", **member_facts(result, seeds[name], parameters=True),
                 **_group_facts(result, names, stacked=stacked, ensemble=trained.ensemble)}
        out[name] = (facts, blob)
    return out


def _group_facts(result, names: list[str], *, stacked: bool = False, ensemble: dict | None = None) -> dict:
    """What training a member together with others adds to its facts."""
    facts = {
        # the member's share of its group's run, so that sums over members stay the total time
        "train_seconds": result.train_seconds / len(names),
        "group_train_seconds": result.train_seconds,
        "stopped_early": result.stopped_early,
        "trained_with": names,
        "stacked": stacked,
    }
    if ensemble is not None:
        # beside the member's own stopping (stopped_early): the ensemble-level record of its group
        facts["ensemble_stopping"] = {key: ensemble[key] for key in ("patience", "monitored", "best_epoch",
                                                                      "stopped_early")}
    return facts


def _group_checkpoint(run: Run, names: list[str]) -> Path:
    """One checkpoint per group of members trained together (the group a rank trains)."""
    return run.checkpoints / f"{'+'.join(names)}.ckpt"


def _store_member(run: Run, name: str, facts: dict, blob: bytes) -> None:
    """Rank 0: write a finished member and record it; its checkpoint is no longer needed."""
    from codec.io import write_bytes_atomic

    write_bytes_atomic(run.path / facts["path"], blob)
    run.finish(f"train:{name}", facts)
    (run.checkpoints / f"{name}.ckpt").unlink(missing_ok=True)


def _train_all(run: Run, world, names: list[str], task) -> None:
    """Train the members not finished yet, split over ranks (each rank trains its part together with
    `task(part)`); rank 0 stores them."""
    from codec.runtime.training import distributed

    todo = [n for n in names if run.done(f"train:{n}") is None]
    results = distributed.run_task_groups(todo, task)
    if world.is_main:
        for name in todo:
            _store_member(run, name, *results[name])
        for part in distributed.partition(todo):
            _group_checkpoint(run, part).unlink(missing_ok=True)
    run.state = distributed.broadcast(run.state)


def _run_passes(run: Run, options: CompileOptions, data: RecipeData) -> dict:
    facts = run.done("passes")
    if facts is not None:
        return facts
    from codec.passes.registry import parse_pipeline
    from codec.pipelines.opt import lift_members, optimize, write_outputs

    members = lift_members({name: run.members / f"{name}.onnx" for name in ("main", "peer")})
    x_cal = data.x_train if options.calibration is None else data.x_train[: options.calibration]
    x_cal = x_cal.reshape((len(x_cal), *members["main"].input_shape))
    module, manager, report = optimize(members, parse_pipeline(options.passes), x_cal)
    report["calibration"] = {"data": data.name, "split": "train", "inputs": len(x_cal)}
    write_outputs(run.opt, module, manager, report)
    csn = module.csn
    facts = {
        "seconds": report["seconds"],
        "pipeline": report["pipeline"],
        "csn_per_layer": csn.sizes if csn is not None else {},
        "csn_total": csn.total if csn is not None else 0,
        "csn_parameters": csn.network.num_parameters if csn is not None and csn.network is not None else 0,
    }
    run.finish("passes", facts)
    return facts


def _damaged(path: Path, why: str) -> str:
    return f"{path} is damaged: {why}; restore the file, or restart the run (without --resume, or in another -o folder)"


def _read_run_json(path: Path, kind: type):
    """A run's own JSON file (config, state, CSN), checked: a damaged one is one line saying which file
    and what to do, never a traceback from deep inside the resume."""
    regular_file(path, "run file", ConfigError)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(_damaged(path, f"not valid JSON ({str(exc).splitlines()[0][:120]})")) from exc
    except OSError as exc:
        raise ConfigError(_damaged(path, f"unreadable ({exc.strerror or exc})")) from exc
    if not isinstance(data, kind):
        raise ConfigError(_damaged(path, f"expected a JSON {kind.__name__}, found {type(data).__name__}"))
    return data


def _load_csn(run: Run, rewritten):
    from codec.ir.csn import CSN, csn_network

    path = run.opt / "csn.json"
    if not path.exists():
        return None
    data = _read_run_json(path, dict)
    try:
        csn = CSN.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ConfigError(_damaged(path, f"not a CSN description ({type(exc).__name__}: {exc})")) from exc
    if csn.depth:
        csn.network = csn_network(rewritten, csn)
    return csn


def _grow(run: Run, names: list[str], seeds: dict, template, options: CompileOptions, config, data: RecipeData,
          quiet: bool) -> dict[str, tuple[dict, bytes]]:
    """Train grown members around the CSN, together in one engine run; returns each one's facts and bytes."""
    from codec.ir import lower, to_bytes
    from codec.pipelines.train import member_facts
    from codec.runtime.training.grow import train_grown_members

    config = dataclasses.replace(config, quiet=quiet, lr=config.lr * options.grow.lr_scale)
    grown = train_grown_members(
        template, data.x_train, data.y_train, data.x_val, data.y_val, config,
        seeds=[seeds[name] for name in names], options=options.grow,
        checkpoint_path=_group_checkpoint(run, names), resume=True, names=names,
    )
    out = {}
    for name, (net, result, extra) in zip(names, grown):
        facts = {"path": f"members/{name}.onnx", **member_facts(result, seeds[name]), **_group_facts(result, names),
                 **extra}  # grown members (IRModule, frozen CSN) are module units: never stacked
        out[name] = (facts, to_bytes(lower(net)))
    return out


def compile_ensemble(options: CompileOptions, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                     ensemble_path: str | Path | None = None, member_outputs: bool = False) -> dict:
    """Run the CODE pipeline end to end; returns the report (also written to run_dir/report.json).

    `member_outputs` also makes each member's own output a graph output (``member_{i}``, named in the
    report's "outputs"); like `ensemble_path` it only shapes the emitted graph, so it is not one of the
    run's options and a resumed run may change it.
    """
    from codec.ir import lift, save_model
    from codec.ir.criteria import default_criterion
    from codec.ir.ensemble import (
        OUTPUT_NAME,
        emit_ensemble,
        ensemble_parameter_count,
        member_output_name,
        members_metadata,
    )
    from codec.models import get_recipe
    from codec.runtime.training import distributed
    from codec.runtime.training.train import TrainConfig

    options.validate()
    world = distributed.init(threads=options.train_overrides.get("num_threads"))
    recipe = get_recipe(options.recipe)
    config = TrainConfig.from_recipe(recipe, **options.train_overrides)
    run = Run(Path(run_dir))
    if world.is_main:
        run.prepare(options, resume)
    run.state = distributed.broadcast(run.state)  # also: no rank trains before rank 0 checked the run dir
    run.checkpoints.mkdir(parents=True, exist_ok=True)  # each rank's own (a node may not share rank 0's disk)
    data = load_recipe_data(recipe, config, options.data_dir)
    started = time.perf_counter()
    quiet = quiet or not world.is_main

    seeds = {"main": options.seed, "peer": options.seed + 1}
    _train_all(run, world, ["main", "peer"], lambda part: _train_conventional(run, part, seeds, recipe, config, data, quiet))
    if world.is_main:
        _run_passes(run, options, data)
    # every rank grows around the same rewritten main: rank 0 sends it (no shared filesystem needed)
    rewritten_bytes = distributed.broadcast((run.opt / "main.onnx").read_bytes() if world.is_main else None)
    run.state = distributed.broadcast(run.state)
    rewritten = lift(rewritten_bytes, name="main")
    grown = [f"grown_{i}" for i in range(1, options.members - 1)]
    grown_seeds = {name: options.seed + 1 + i for i, name in enumerate(grown, start=1)}
    _train_all(run, world, grown, lambda part: _grow(run, part, grown_seeds, rewritten, options, config, data, quiet))
    if not world.is_main:
        distributed.barrier()
        return {}
    main_facts, peer_facts = run.done("train:main"), run.done("train:peer")
    pass_facts = run.done("passes")
    grown_facts = [run.done(f"train:{n}") for n in grown]
    csn = _load_csn(run, rewritten)

    # the files of exactly the members the fused graph computes: export checks parity against them
    files = {"main": run.opt / "main.onnx" if options.keep_main == "rewritten" else run.members / "main.onnx",
             "peer": run.opt / "peer.onnx",
             **{name: run.members / f"{name}.onnx" for name in grown}}
    members = {name: rewritten if path == run.opt / "main.onnx" else lift(path, name=name) for name, path in files.items()}
    criterion = options.criterion or default_criterion(recipe.task)
    csn_net = csn.network if csn is not None else None
    t0 = time.perf_counter()
    out = Path(ensemble_path) if ensemble_path is not None else run.path / "ensemble.onnx"
    model = emit_ensemble(list(members.values()), csn_net, criterion=criterion, names=list(members), task=recipe.task,
                          member_outputs=member_outputs, metadata=members_metadata(list(files.values()), out))
    save_model(model, out)
    emit_seconds = time.perf_counter() - t0
    quality = _evaluate(members, criterion, recipe.task, data)
    counts = ensemble_parameter_count(list(members.values()), csn_net)
    report = _report(options, recipe, run, out, data, main_facts, peer_facts, pass_facts, grown_facts, quality, counts,
                     criterion, emit_seconds, time.perf_counter() - started)
    report["world_size"] = world.size
    report["outputs"] = {"ensemble": OUTPUT_NAME,
                         "members": {n: member_output_name(i) for i, n in enumerate(members)} if member_outputs else {}}
    write_json_atomic(run.path / "report.json", report)
    distributed.barrier()
    return report


def _evaluate(members: dict, criterion: str, task: str, data: RecipeData) -> dict:
    """Every member's and the growing ensemble's quality on the test set (onnxruntime)."""
    from codec.ir import lower, to_bytes
    from codec.runtime.evaluation.scoring import member_outputs, score_members

    outputs = member_outputs([to_bytes(lower(net)) for net in members.values()], data.x_test, names=list(members))
    result = score_members(outputs, task, data.target("test"), criterion)
    per_member = result.pop("member_accuracies" if task == "classification" else "member_mse")
    result["members"] = dict(zip(members, per_member))
    return result


def _report(options, recipe, run, out, data, main_facts, peer_facts, pass_facts, grown_facts, quality, counts,
            criterion, emit_seconds, wall) -> dict:
    from codec.runtime.evaluation.metrics import memory_footprint

    n = options.members
    tp_dnn = main_facts["parameters"]
    tp_codedn = grown_facts[0]["trainable_parameters"] if grown_facts else tp_dnn
    csn_params = pass_facts["csn_parameters"]
    train_seconds = main_facts["train_seconds"] + peer_facts["train_seconds"] + sum(g["train_seconds"] for g in grown_facts)
    return {
        "codec_version": __version__,
        "recipe": recipe.name,
        "dataset": data.name,
        "task": recipe.task,
        "members": n,
        "criterion": criterion,
        "ensemble": str(out),
        "options": options.to_dict(),
        "data": {"train": len(data.x_train), "validation": data.n_val, "test": len(data.x_test)},
        "time": {
            "train_main": main_facts["train_seconds"],
            "train_peer": peer_facts["train_seconds"],
            "passes": pass_facts["seconds"],
            "grow": [g["train_seconds"] for g in grown_facts],
            "emit_ensemble": emit_seconds,
            "training_total": train_seconds,
            "passes_fraction_of_training": pass_facts["seconds"] / train_seconds if train_seconds else None,
            "wall_this_invocation": wall,
        },
        "epochs": {"main": main_facts["epochs"], "peer": peer_facts["epochs"], "grow": [g["epochs"] for g in grown_facts]},
        # how the engine trained each member: its own early stopping beside its group's ensemble-level stopping
        "training": {
            name: {key: facts.get(key) for key in ("best_epoch", "stopped_early", "trained_with", "stacked",
                                                    "group_train_seconds", "ensemble_stopping")}
            for name, facts in [("main", main_facts), ("peer", peer_facts),
                                *[(f"grown_{i}", g) for i, g in enumerate(grown_facts, start=1)]]
        },
        "csn": {"per_layer": pass_facts["csn_per_layer"], "total": pass_facts["csn_total"], "parameters": csn_params},
        "parameters": {
            "conventional_member": tp_dnn,
            "grown_member_trainable": tp_codedn,
            "fused_graph_stored": counts["total_stored"],
            "fused_graph": counts,
        },
        # M measured on what is deployed: parameters stored in the fused graph over N conventional members.
        "memory_footprint_M": counts["total_stored"] / (n * tp_dnn),
        # The paper's formula, with TP_codedn = a grown member's trainable parameters (the peer, trained
        # conventionally, is counted as one of the N-1 non-main members: the formula predates a kept peer).
        "memory_footprint_M_formula": memory_footprint(tp_dnn, n, tp_codedn, csn_params, n),
        "quality": quality,
    }
