"""`codec compile`: the whole CODE pipeline, resumable.

train main and peer -> passes (dna, dne, nda, csne) -> grow N-2 members around the frozen CSN -> fused
ensemble ONNX -> evaluation and report.

Where main and peer come from (exactly one):
    --recipe NAME          a zoo architecture and its training settings (torch modules, exported to ONNX)
    --model arch.onnx      the user's architecture: lifted to NetworkIR and trained through the torch
                           backend (runtime.training.torch_ir.IRModule); main starts from the file's
                           weights (or afresh with init="random"), peer always afresh (seed + 1)
    --main a --peer b      two members the user already trained: no training, straight to the passes

The output rule, checked before anything trains: a member whose output layer is a softmax is a
classifier (cross-entropy); one whose output is neither a softmax nor as wide as its input but has one
value per class outputs logits, and gets a softmax appended (printed, and recorded in report.json's
notes) — the rule `codec eval` applies when it softmaxes a logits member's scores itself; one as wide as
its input is an autoencoder (MSE). `loss` ("ce" / "mse") overrides the inference.

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

import numpy as np

from codec.errors import ConfigError, ShapeError, check_interrupt
from codec.io import regular_file, write_json_atomic
from codec.pipelines.data import RecipeData, fit_data_to, split_for_training
from codec.runtime.training.grow import GrowOptions
from codec.version import __version__

log = logging.getLogger("codec.pipelines.compile")

NORMALIZATION_KEY = "codec.normalization"  # fused-model metadata: the input normalisation, JSON


@dataclass
class CompileOptions:
    """Everything that decides a compile's result (saved as config.json)."""

    recipe: str | None = None
    members: int = 4
    seed: int = 0
    passes: str = "dna,dne,nda,csne"
    calibration: int | None = 10_000  # training inputs profiled by the passes (None: all)
    grow: GrowOptions = field(default_factory=GrowOptions)
    keep_main: str = "rewritten"  # "rewritten": main shares the CSN; "whole": main as trained
    criterion: str | None = None  # default: prod for classifiers, mean for autoencoders
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields replacing the recipe's
    data_dir: str | None = None
    data: str | None = None  # dataset spec; default the recipe's
    model: str | None = None  # the user's architecture (ONNX), instead of a recipe
    main: str | None = None  # with peer: two members the user already trained (ONNX)
    peer: str | None = None
    init: str = "onnx"  # --model: main starts from the file's weights ("onnx") or afresh ("random")
    loss: str | None = None  # "ce" / "mse"; default inferred from the output layer (or the recipe's)
    normalize: str | None = None  # None, "mean-std" (fit on the training split) or "MEAN/STD" values

    def validate(self) -> None:
        sources = [
            name
            for name, given in (
                ("--recipe", self.recipe),
                ("--model", self.model),
                ("--main/--peer", self.main or self.peer),
            )
            if given
        ]
        if len(sources) != 1:
            raise ConfigError(
                "give exactly one of --recipe NAME, --model ARCH.onnx, or --main A.onnx --peer B.onnx"
                + (f" (got {' and '.join(sources)})" if sources else "")
            )
        if (self.main is None) != (self.peer is None):
            raise ConfigError("--main and --peer go together: the two members the passes compare")
        if self.recipe is None and self.data is None:
            raise ConfigError(f"{sources[0]} needs --data (a dataset spec, e.g. npz:my_data.npz)")
        if self.init not in ("onnx", "random"):
            raise ConfigError(f"init={self.init!r}; choose onnx (the file's weights) or random")
        if self.loss not in (None, "ce", "mse"):
            raise ConfigError(f"loss={self.loss!r}; choose ce (cross-entropy) or mse")
        from codec.runtime.data import parse_normalize

        parse_normalize(self.normalize)
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
    def from_dict(cls, d: dict) -> CompileOptions:
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
            raise ConfigError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose another -o"
            )
        if resume and config.exists():
            saved = _read_run_json(config, dict)
            if saved != json.loads(json.dumps(options.to_dict())):
                changed = sorted(
                    k
                    for k in set(saved) | set(options.to_dict())
                    if saved.get(k) != json.loads(json.dumps(options.to_dict())).get(k)
                )
                raise ConfigError(
                    f"cannot resume {self.path}: options differ from the original run ({', '.join(changed)})"
                )
            if self.state_path.exists():
                self.state = _read_run_json(self.state_path, dict)
                if not isinstance(self.state.get("steps"), dict) or not all(
                    isinstance(v, dict) for v in self.state["steps"].values()
                ):
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
        facts["ensemble_stopping"] = {
            key: ensemble[key] for key in ("patience", "monitored", "best_epoch", "stopped_early")
        }
    return facts


def _group_checkpoint(run: Run, names: list[str]) -> Path:
    """One checkpoint per group of members trained together (the group a rank trains)."""
    return run.checkpoints / f"{'+'.join(names)}.ckpt"


@dataclass
class _Source:
    """Where main and peer come from, and how members train (resolved before any training)."""

    kind: str  # "recipe", "model" or "members"
    task: str
    config: object  # TrainConfig
    recipe: object | None = None
    template: object | None = None  # NetworkIR of --model (softmax appended when it outputs logits)
    given: dict = field(default_factory=dict)  # --main/--peer: name -> NetworkIR
    loss_reason: str = ""
    notes: list = field(default_factory=list)


def _output_rule(
    net, options: CompileOptions, spec: str, num_classes: int, what: str
) -> tuple[str, str, list]:
    """(task, why, notes) for a user network, softmax appended in place when it outputs logits.

    See the module docstring for the rule. Raises ShapeError for an output that fits neither task.
    """
    from codec.ir import Activation, Dense

    last = net.compute_layers()[-1] if net.compute_layers() else None
    if last is None:
        raise ShapeError(f"{what} has no Dense or Conv layer to train")
    width = int(np.prod(net.output_shape))
    inputs = int(np.prod(net.input_shape))
    kind = last.activation.kind
    ends_in_last = net.layers[-1] is last
    if options.loss == "mse" or (
        options.loss is None and kind != "softmax" and width == inputs and width != num_classes
    ):
        if width != inputs:
            raise ShapeError(
                f"{what} outputs {width} values per example; MSE reconstruction needs its {inputs} inputs"
            )
        why = (
            "--loss mse"
            if options.loss == "mse"
            else f"the output is not a softmax and as wide as the input ({inputs})"
        )
        return "reconstruction", why, []
    if kind == "softmax":
        return "classification", "--loss ce" if options.loss == "ce" else "the output layer is a softmax", []
    if kind != "identity" or not isinstance(last, Dense) or not ends_in_last:
        raise ShapeError(
            f"{what} ends in {kind} ({type(last).__name__} {last.name!r}"
            f"{'' if ends_in_last else ', followed by other layers'}): a classifier must end in a "
            "Dense layer "
            "with a softmax or no activation (logits)"
        )
    if options.loss is None and width != num_classes:
        raise ShapeError(
            f"{what} outputs {width} values per example: neither one per class ({num_classes} in {spec}) "
            f"nor a reconstruction of its {inputs} inputs"
        )
    last.activation = Activation("softmax")
    note = f"{what} outputs logits (no softmax): appended a softmax, as codec eval does with logits"
    return (
        "classification",
        ("--loss ce" if options.loss == "ce" else "the output is logits, one per class"),
        [note],
    )


def _resolve_source(options: CompileOptions, spec: str, classes: int) -> _Source:
    """Lift and check the user's members (`classes`: how many the data's labels name), or take the recipe."""
    from codec.ir import lift
    from codec.models import get_recipe
    from codec.runtime.training.train import TrainConfig

    overrides = dict(options.train_overrides)
    if options.recipe is not None:
        recipe = get_recipe(options.recipe)
        if options.loss is not None:
            overrides["loss"] = options.loss
        config = TrainConfig.from_recipe(recipe, **overrides)
        task = "reconstruction" if config.loss == "mse" else "classification"
        why = "--loss" if options.loss else f"recipe {recipe.name}"
        return _Source("recipe", task, config, recipe=recipe, loss_reason=why)
    if options.model is not None:
        nets = {"model": lift(_existing(options.model, "--model"), name="main")}
    else:
        nets = {
            "main": lift(_existing(options.main, "--main"), name="main"),
            "peer": lift(_existing(options.peer, "--peer"), name="peer"),
        }
    task, why, notes = None, "", []
    for key, net in nets.items():
        path = getattr(options, key)
        this_task, why, these = _output_rule(net, options, spec, classes, f"{Path(path).name} (--{key})")
        if task is not None and this_task != task:
            raise ShapeError(f"--main is a {task} model but --peer a {this_task} model")
        task = this_task
        notes += these
    if options.main is not None:
        # The passes compare main and peer neuron by neuron: refuse different architectures now.
        shapes = {
            key: [list(net.input_shape), *(list(shape) for shape in net.shapes())]
            for key, net in nets.items()
        }
        if shapes["main"] != shapes["peer"]:
            raise ShapeError(
                "--main and --peer must have the same architecture: layer output shapes "
                f"{shapes['main']} vs {shapes['peer']} (input first)"
            )
    overrides["loss"] = "mse" if task == "reconstruction" else "ce"
    config = TrainConfig.from_recipe(None, **overrides)
    if options.model is not None:
        return _Source("model", task, config, template=nets["model"], loss_reason=why, notes=notes)
    return _Source("members", task, config, given=nets, loss_reason=why, notes=notes)


def _existing(path: str, option: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such file")
    return path


def _check_before_training(source: _Source, data: RecipeData) -> RecipeData:
    """What can be checked before anything trains: inputs against the model, labels against its outputs.

    Returns the data shaped for the model (images reshaped for a flat MLP).
    """
    nets = [source.template] if source.template is not None else list(source.given.values())
    for net in nets:
        data = fit_data_to(data, tuple(net.input_shape), f"the model ({net.name})")
        if source.task == "classification":
            width = int(np.prod(net.output_shape))
            top = int(max(data.y_train.max(), data.y_test.max()))
            if top >= width:
                raise ShapeError(
                    f"{data.name} has labels up to {top} ({len(data.class_names)} classes) but the model "
                    f"({net.name}) has only {width} outputs"
                )
    if nets:
        data = dataclasses.replace(data, num_outputs=int(np.prod(nets[0].output_shape)))
    return data


def _train_conventional(
    run: Run,
    names: list[str],
    seeds: dict,
    source: _Source,
    options: CompileOptions,
    data: RecipeData,
    quiet: bool,
) -> dict[str, tuple[dict, bytes]]:
    """Train members the ordinary way, together in one engine run (stacked when the architecture allows);
    returns each one's facts and ONNX bytes.

    A recipe's member is a zoo module (random init) exported with torch.onnx; a --model member is the
    lifted architecture as an IRModule: main from the file's weights unless init="random", peer afresh.
    """
    from codec.pipelines.train import member_facts
    from codec.runtime.training.engine import train_members

    config = dataclasses.replace(source.config, quiet=quiet)
    modules = [_initial_module(name, seeds[name], source, options, data) for name in names]
    trained = train_members(
        modules,
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        config,
        seeds=[seeds[name] for name in names],
        checkpoint_path=_group_checkpoint(run, names),
        resume=True,
        names=names,
        desc="+".join(names),
    )
    out = {}
    for name, result in zip(names, trained.members):
        if source.kind == "recipe":
            from codec.runtime.training.train import export_onnx

            part = export_onnx(
                result.module, run.checkpoints / f"{name}.onnx.part", data.input_shape, task=source.task
            )
            blob = part.read_bytes()
            part.unlink()
        else:
            from codec.ir import lower, to_bytes

            blob = to_bytes(lower(result.module.to_network(name)))
        init = "random" if source.kind == "recipe" or name != "main" else options.init
        stacked = names.index(name) in trained.stacked
        facts = {
            "path": f"members/{name}.onnx",
            "init": init,
            **member_facts(result, seeds[name], parameters=True),
            **_group_facts(result, names, stacked=stacked, ensemble=trained.ensemble),
        }
        out[name] = (facts, blob)
    return out


def _initial_module(name: str, seed: int, source: _Source, options: CompileOptions, data: RecipeData):
    """The module member `name` starts training from."""
    if source.kind == "recipe":
        return source.recipe.build(data.input_shape, data.num_outputs, seed=seed)
    from codec.runtime.training.torch_ir import IRModule, reinitialise_trainable

    module = IRModule(source.template)
    if name != "main" or options.init == "random":
        reinitialise_trainable(module, seed)
    return module


def _given_member(name: str, net, path: str) -> tuple[dict, bytes]:
    """A member the user trained (--main/--peer): stored as lifted (softmax appended if it gave logits)."""
    from codec.ir import lower, to_bytes

    facts = {
        "path": f"members/{name}.onnx",
        "source": str(path),
        "seed": None,
        "init": "given",
        "epochs": 0,
        "best_epoch": None,
        "train_seconds": 0.0,
        "parameters": net.num_parameters,
        "trainable_parameters": net.num_parameters,
    }
    return facts, to_bytes(lower(net))


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
    return (
        f"{path} is damaged: {why}; restore the file, or restart the run (without --resume, or in another "
        "-o folder)"
    )


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


def _grow(
    run: Run,
    names: list[str],
    seeds: dict,
    template,
    options: CompileOptions,
    config,
    data: RecipeData,
    quiet: bool,
) -> dict[str, tuple[dict, bytes]]:
    """Train grown members around the CSN, together in one engine run; returns each one's facts and bytes."""
    from codec.ir import lower, to_bytes
    from codec.pipelines.train import member_facts
    from codec.runtime.training.grow import train_grown_members

    config = dataclasses.replace(config, quiet=quiet, lr=config.lr * options.grow.lr_scale)
    grown = train_grown_members(
        template,
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        config,
        seeds=[seeds[name] for name in names],
        options=options.grow,
        checkpoint_path=_group_checkpoint(run, names),
        resume=True,
        names=names,
    )
    out = {}
    for name, (net, result, extra) in zip(names, grown):
        facts = {
            "path": f"members/{name}.onnx",
            **member_facts(result, seeds[name]),
            **_group_facts(result, names, stacked=extra["stacked"]),
            **extra,  # the CSN cache, and why a member was not stacked ("unstacked_reason")
        }
        out[name] = (facts, to_bytes(lower(net)))
    return out


def compile_ensemble(
    options: CompileOptions,
    run_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    ensemble_path: str | Path | None = None,
    member_outputs: bool = False,
) -> dict:
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
    from codec.runtime.data import load_training_set, parse_normalize
    from codec.runtime.training import distributed

    options.validate()
    world = distributed.init(threads=options.train_overrides.get("num_threads"))
    spec = options.data or get_recipe(options.recipe).dataset
    dataset = load_training_set(spec, data_dir=options.data_dir)
    # Everything checkable is checked here, before the run directory is touched or anything trains.
    source = _resolve_source(options, spec, dataset.num_classes)
    config = source.config
    data = split_for_training(dataset, source.task, config, normalize=parse_normalize(options.normalize))
    data = _check_before_training(source, data)
    if source.task == "reconstruction" and options.criterion not in (None, "mean"):
        raise ConfigError(
            f"an autoencoder ensemble averages its members: --criterion must be mean, not {options.criterion}"
        )
    run = Run(Path(run_dir))
    if world.is_main:
        run.prepare(options, resume)
        for note in (*data.notes, *source.notes):
            log.warning("%s", note)
        if source.kind != "recipe":
            log.warning(
                "loss: %s (%s)", "cross-entropy" if config.loss == "ce" else "MSE", source.loss_reason
            )
    run.state = distributed.broadcast(run.state)  # also: no rank trains before rank 0 checked the run dir
    run.checkpoints.mkdir(parents=True, exist_ok=True)  # each rank's own (a node may not share rank 0's disk)
    started = time.perf_counter()
    quiet = quiet or not world.is_main

    seeds = {"main": options.seed, "peer": options.seed + 1}
    if source.kind == "members":
        if world.is_main:
            for name in ("main", "peer"):
                if run.done(f"train:{name}") is None:
                    _store_member(run, name, *_given_member(name, source.given[name], getattr(options, name)))
        run.state = distributed.broadcast(run.state)
    else:
        _train_all(
            run,
            world,
            ["main", "peer"],
            lambda part: _train_conventional(run, part, seeds, source, options, data, quiet),
        )
    if world.is_main:
        _run_passes(run, options, data)
    # every rank grows around the same rewritten main: rank 0 sends it (no shared filesystem needed)
    rewritten_bytes = distributed.broadcast((run.opt / "main.onnx").read_bytes() if world.is_main else None)
    run.state = distributed.broadcast(run.state)
    rewritten = lift(rewritten_bytes, name="main")
    grown = [f"grown_{i}" for i in range(1, options.members - 1)]
    grown_seeds = {name: options.seed + 1 + i for i, name in enumerate(grown, start=1)}
    _train_all(
        run, world, grown, lambda part: _grow(run, part, grown_seeds, rewritten, options, config, data, quiet)
    )
    if not world.is_main:
        distributed.barrier()
        return {}
    main_facts, peer_facts = run.done("train:main"), run.done("train:peer")
    pass_facts = run.done("passes")
    grown_facts = [run.done(f"train:{n}") for n in grown]
    csn = _load_csn(run, rewritten)

    # the files of exactly the members the fused graph computes: export checks parity against them
    files = {
        "main": run.opt / "main.onnx" if options.keep_main == "rewritten" else run.members / "main.onnx",
        "peer": run.opt / "peer.onnx",
        **{name: run.members / f"{name}.onnx" for name in grown},
    }
    members = {
        name: rewritten if path == run.opt / "main.onnx" else lift(path, name=name)
        for name, path in files.items()
    }
    criterion = options.criterion or default_criterion(source.task)
    csn_net = csn.network if csn is not None else None
    t0 = time.perf_counter()
    out = Path(ensemble_path) if ensemble_path is not None else run.path / "ensemble.onnx"
    metadata = dict(members_metadata(list(files.values()), out))
    if data.normalization is not None:
        # Inputs must be normalised like this before the model sees them (export puts it in the card).
        metadata[NORMALIZATION_KEY] = json.dumps(data.normalization)
    model = emit_ensemble(
        list(members.values()),
        csn_net,
        criterion=criterion,
        names=list(members),
        task=source.task,
        member_outputs=member_outputs,
        metadata=metadata,
    )
    save_model(model, out)
    emit_seconds = time.perf_counter() - t0
    quality = _evaluate(members, criterion, source.task, data)
    counts = ensemble_parameter_count(list(members.values()), csn_net)
    report = _report(
        options,
        source,
        run,
        out,
        data,
        main_facts,
        peer_facts,
        pass_facts,
        grown_facts,
        quality,
        counts,
        criterion,
        emit_seconds,
        time.perf_counter() - started,
    )
    report["world_size"] = world.size
    report["outputs"] = {
        "ensemble": OUTPUT_NAME,
        "members": {n: member_output_name(i) for i, n in enumerate(members)} if member_outputs else {},
    }
    write_json_atomic(run.path / "report.json", report)
    distributed.barrier()
    return report


def _evaluate(members: dict, criterion: str, task: str, data: RecipeData) -> dict:
    """Every member's and the growing ensemble's quality on the test set (onnxruntime)."""
    from codec.ir import lower, to_bytes
    from codec.runtime.evaluation.scoring import member_outputs, score_members

    outputs = member_outputs(
        [to_bytes(lower(net)) for net in members.values()], data.x_test, names=list(members)
    )
    result = score_members(outputs, task, data.target("test"), criterion)
    per_member = result.pop("member_accuracies" if task == "classification" else "member_mse")
    result["members"] = dict(zip(members, per_member))
    return result


def _report(
    options,
    source,
    run,
    out,
    data,
    main_facts,
    peer_facts,
    pass_facts,
    grown_facts,
    quality,
    counts,
    criterion,
    emit_seconds,
    wall,
) -> dict:
    from codec.runtime.evaluation.metrics import memory_footprint

    n = options.members
    tp_dnn = main_facts["parameters"]
    tp_codedn = grown_facts[0]["trainable_parameters"] if grown_facts else tp_dnn
    csn_params = pass_facts["csn_parameters"]
    train_seconds = (
        main_facts["train_seconds"]
        + peer_facts["train_seconds"]
        + sum(g["train_seconds"] for g in grown_facts)
    )
    return {
        "codec_version": __version__,
        "recipe": source.recipe.name if source.recipe is not None else None,
        "model": options.model,
        "given_members": {"main": options.main, "peer": options.peer} if source.kind == "members" else None,
        "dataset": data.name,
        "task": source.task,
        "loss": {"name": source.config.loss, "why": source.loss_reason},
        "normalization": data.normalization,
        "notes": [*data.notes, *source.notes],
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
        "epochs": {
            "main": main_facts["epochs"],
            "peer": peer_facts["epochs"],
            "grow": [g["epochs"] for g in grown_facts],
        },
        # how the engine trained each member: its own early stopping beside its group's ensemble-level
        # stopping
        "training": {
            name: {
                key: facts.get(key)
                for key in (
                    "best_epoch",
                    "stopped_early",
                    "trained_with",
                    "stacked",
                    "unstacked_reason",
                    "group_train_seconds",
                    "ensemble_stopping",
                )
            }
            for name, facts in [
                ("main", main_facts),
                ("peer", peer_facts),
                *[(f"grown_{i}", g) for i, g in enumerate(grown_facts, start=1)],
            ]
        },
        "csn": {
            "per_layer": pass_facts["csn_per_layer"],
            "total": pass_facts["csn_total"],
            "parameters": csn_params,
        },
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
