"""`codec export ensemble.onnx -o deploy.onnx`: check a fused ensemble and write the deployable model + card.

The deployment step of the pipeline. It loads the model safely (`codec.ir.load_model`: external data must
stay beside it), runs the full ONNX checker and strict shape inference, then checks *parity*: the fused
model on a batch of inputs against its members run one by one with onnxruntime and combined by
`codec.runtime.evaluation.metrics.combine` (the one definition of every criterion). Only when the largest
absolute difference is within --atol does it write the deployable model (atomically; tensors inline, or in
`<name>.data` beside it with --external-data) and a model card (JSON) describing it.

Members come from --members, else from the ensemble's `codec.members` metadata (paths relative to the
ensemble file), else, weaker, from the `member_i` outputs the fused graph exposes (then only the collect
stage is checked). Parity inputs are --data (a dataset split) or seeded uniform [0, 1) noise.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.errors import CodecError, ConfigError, ModelLoadError, ShapeError, first_line
from codec.pipelines.data import fit_to_model, load_split

DEFAULT_ATOL = 1e-5
DEFAULT_SAMPLES = 256
DEPLOY_KEY = "codec.deploy"  # model metadata written into the deployable model: the parity it passed


class ParityError(CodecError):
    """The fused model does not compute its members combined by its criterion (exit status 2)."""


@dataclass(frozen=True)
class ExportOptions:
    """What `export_ensemble` checks and writes (the `codec export` flags).

    Attributes:
        ensemble: the fused ensemble (ONNX).
        output: where the deployable model goes (.onnx).
        members: member files in the ensemble's member order (None: its codec.members metadata).
        criterion: how members combine (None: the ensemble's codec.ensemble metadata).
        data: parity inputs from this dataset (None: `samples` seeded uniform [0, 1) inputs).
        data_dir: where dataset files live.
        split: which split of `data`.
        limit: parity examples taken from `data`.
        samples: random parity inputs when there is no `data`.
        seed: seed of the random parity inputs.
        atol: the largest parity error accepted.
        batch_size: inference batch size.
        external_data: write tensors to <output>.data beside the model.
        card: where the model card goes (None: <output stem>.card.json).
    """

    ensemble: Path
    output: Path
    members: list[Path] | None = None
    criterion: str | None = None
    data: str | None = None
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = 512
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    atol: float = DEFAULT_ATOL
    batch_size: int = 256
    external_data: bool = False
    card: Path | None = None


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------


def check_onnx(path: Path) -> tuple[list[dict], list[dict]]:
    """Full ONNX checker, then strict shape inference; returns the inferred graph's (inputs, outputs).

    Raises:
        ModelLoadError: the checker or shape inference refuses the model (its first line says why).
    """
    import onnx

    try:
        # the path form reads external data itself (and works past protobuf's 2 GB limit)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several checker/inference error types
        raise ModelLoadError(f"{path.name} fails the ONNX checker: {first_line(exc)}") from exc
    try:
        proto = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} fails strict shape inference: {first_line(exc)}") from exc
    return [_value_info(v) for v in inferred.graph.input], [_value_info(v) for v in inferred.graph.output]


def _value_info(value) -> dict:
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {
        "name": value.name,
        "shape": dims,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
    }


# ----------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------


def parity_inputs(options: ExportOptions, input_shape: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """The inputs parity runs on, and how they were chosen (for the card)."""
    if options.data is not None:
        x, _, dataset = load_split(
            options.data, data_dir=options.data_dir, split=options.split, limit=options.limit
        )
        x = fit_to_model(x, input_shape, model=options.ensemble.name)
        return np.ascontiguousarray(x, dtype=np.float32), {
            "source": dataset.name,
            "split": options.split,
            "examples": len(x),
        }
    if options.samples < 1:
        raise ConfigError(f"--samples must be positive, got {options.samples}")
    x = np.random.default_rng(options.seed).random((options.samples, *input_shape), dtype=np.float32)
    return x, {"source": "uniform [0, 1)", "seed": options.seed, "examples": int(options.samples)}


def _static_input_shape(inputs: list[dict], path: Path) -> tuple[int, ...]:
    if len(inputs) != 1:
        raise ShapeError(f"{path.name} has {len(inputs)} inputs; a fused ensemble has one")
    dims = inputs[0]["shape"][1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ShapeError(
            f"{path.name}: input {inputs[0]['name']!r} has shape {inputs[0]['shape']}; only the batch "
            "dimension may be dynamic"
        )
    return tuple(dims)


def member_paths(options: ExportOptions, model) -> tuple[list[Path], str]:
    """The member files to check against (may be empty), and where they came from."""
    from codec.ir.ensemble import MEMBERS_KEY, member_files

    if options.members:
        return list(options.members), "--members"
    listed = member_files(model, options.ensemble)
    if listed is None:
        return [], "none"
    return listed, f"{MEMBERS_KEY} metadata"


def _run(session, x: np.ndarray, outputs: list[str], batch_size: int) -> list[np.ndarray]:
    from codec.runtime.execution.session import run_batches

    parts = list(run_batches(session, x, batch_size, outputs))
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(outputs))]


def _run_member(path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    from codec.ir.lift import load_model
    from codec.runtime.execution.session import create_session

    load_model(path)  # refuses missing files and external data outside the member's folder
    session = create_session(path)
    # the member gets the parity inputs by the rule every command uses (layout, dtype, a fixed batch)
    return _run(session, x, [session.get_outputs()[0].name], batch_size)[0]


def _reference(stack: np.ndarray, criterion: str, task: str) -> np.ndarray:
    from codec.runtime.evaluation.metrics import combine

    if task == "reconstruction":
        return stack.astype(np.float64).mean(axis=0)  # outputs need not be probabilities
    return combine(stack, criterion)


def check_parity(options: ExportOptions, model, description: dict, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """Run the fused model and its members on `x`; the parity record for the card and the fused output.

    Raises:
        ParityError: the largest absolute difference exceeds --atol.
    """
    from codec.ir.ensemble import OUTPUT_NAME
    from codec.runtime.execution.session import create_session

    task = description.get("task", "classification")
    criterion = options.criterion or description.get("criterion")
    if criterion is None:
        raise ConfigError(f"{options.ensemble.name} has no codec.ensemble metadata: give --criterion")
    session = create_session(options.ensemble)
    names = [o.name for o in session.get_outputs()]
    output = OUTPUT_NAME if OUTPUT_NAME in names else names[0]
    in_graph = sorted(
        (n for n in names if n.startswith("member_") and n[7:].isdigit()), key=lambda n: int(n[7:])
    )
    values = _run(session, x, [output, *in_graph], options.batch_size)
    fused, graph_members = values[0], values[1:]
    paths, source = member_paths(options, model)
    expected = len(description["members"]) if description.get("members") else None
    if paths and expected is not None and len(paths) != expected:
        raise ShapeError(
            f"{options.ensemble.name} has {expected} members but {len(paths)} member files were given "
            f"({source})"
        )
    record = {"criterion": criterion, "atol": options.atol, "examples": len(x)}
    if paths:
        outs = [_run_member(p, x, options.batch_size) for p in paths]
        shapes = {o.shape for o in outs}
        if len(shapes) != 1 or next(iter(shapes)) != fused.shape:
            raise ShapeError(
                f"member outputs {sorted(map(list, shapes))} do not match the ensemble's output "
                f"{list(fused.shape)}"
            )
        stack = np.stack(outs)
        record.update(reference="member models", member_files=[str(p) for p in paths], members_from=source)
    elif graph_members:
        stack = np.stack(graph_members)
        record.update(
            reference="member outputs inside the fused graph (collect stage only)",
            member_files=[],
            members_from="graph",
        )
    else:
        raise ConfigError(
            f"no members to check {options.ensemble.name} against: give --members (it has no "
            "codec.members metadata "
            "and no member_i outputs)"
        )
    error = float(np.max(np.abs(fused.astype(np.float64) - _reference(stack, criterion, task))))
    record["max_abs_error"] = error
    if graph_members and paths:
        # which member drifted, when the graph exposes each member's own output
        record["member_max_abs_error"] = [
            float(np.max(np.abs(g.astype(np.float64) - m))) for g, m in zip(graph_members, stack)
        ]
    if not np.isfinite(error) or error > options.atol:
        worst = ""
        if record.get("member_max_abs_error"):
            i = int(np.argmax(record["member_max_abs_error"]))
            worst = (
                f"; member {i} ({Path(record['member_files'][i]).name}) differs by "
                f"{record['member_max_abs_error'][i]:.3g}"
            )
        raise ParityError(
            f"parity failed: {options.ensemble.name} differs from its members combined by {criterion} "
            f"by {error:.3g} "
            f"(> --atol {options.atol:g}){worst}"
        )
    return record, fused


def validate_description(description: dict, path: Path) -> dict:
    """The `codec.ensemble` metadata, checked before anything is written (the card is built from it
    after the model is saved: a wrong type there once crashed with the model written and no card).

    Raises:
        ModelLoadError: one line naming the file and the malformed entry.
    """
    from codec.ir.criteria import CRITERIA, TASKS

    def bad(key: str, expected: str):
        raise ModelLoadError(
            f"{Path(path).name}: its codec.ensemble metadata is malformed: {key!r} must be {expected}, "
            f"got {description[key]!r}"[:400]
        )

    def is_count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if "task" in description and description["task"] not in TASKS:
        bad("task", f"one of {', '.join(TASKS)}")
    if description.get("criterion") is not None and description["criterion"] not in CRITERIA:
        bad("criterion", f"one of {', '.join(CRITERIA)}")
    if description.get("members") is not None:
        members = description["members"]
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            bad("members", "a non-empty list of names")
    if description.get("csn") is not None:
        csn = description["csn"]
        if not isinstance(csn, list) or not all(
            isinstance(c, dict) and isinstance(c.get("layer"), str) and is_count(c.get("neurons"))
            for c in csn
        ):
            bad("csn", "a list of {layer, neurons} records")

    def is_counts(v) -> bool:
        return is_count(v) or (isinstance(v, list) and all(is_count(x) for x in v))

    if description.get("shared_layers") is not None and not (
        isinstance(description["shared_layers"], list) and is_counts(description["shared_layers"])
    ):
        bad("shared_layers", "a list of non-negative integers")
    if description.get("parameters") is not None:
        parameters = description["parameters"]
        if not isinstance(parameters, dict) or not all(
            isinstance(k, str) and is_counts(v) for k, v in parameters.items()
        ):
            bad("parameters", "an object of non-negative integer counts")
    return description


def verify_written(path: Path, x: np.ndarray, fused: np.ndarray, batch_size: int) -> float:
    """The written model's largest difference from the checked one on the parity inputs (0 when the
    tensors survived serialisation intact)."""
    from codec.ir.ensemble import OUTPUT_NAME
    from codec.runtime.execution.session import create_session

    session = create_session(path)
    names = [o.name for o in session.get_outputs()]
    written = _run(session, x, [OUTPUT_NAME if OUTPUT_NAME in names else names[0]], batch_size)[0]
    return float(np.max(np.abs(written.astype(np.float64) - fused)))


# ----------------------------------------------------------------------------------------------------
# the deployable model and its card
# ----------------------------------------------------------------------------------------------------


def _normalization(model) -> dict | None:
    """The input normalisation compile recorded in the ensemble's metadata (codec.normalization), if any."""
    text = (model.metadata_props or {}).get("codec.normalization")
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ModelLoadError("its codec.normalization metadata is not JSON") from None
    if not isinstance(value, dict):
        raise ModelLoadError("its codec.normalization metadata is not a JSON object")
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_ensemble(options: ExportOptions) -> dict:
    """Check `options.ensemble` and write the deployable model and its card.

    Returns:
        The model card (also written, as JSON, to `options.card` or <output stem>.card.json), with "card"
        added: the card's path.

    Raises:
        ModelLoadError: the ensemble or a member cannot be loaded, or fails the ONNX checker.
        ShapeError: inputs, members or outputs that do not fit together.
        ConfigError: bad options, or nothing to check parity against.
        ParityError: the fused model, or the written file, differs from its members by more than atol.
    """
    from codec.io import refuse_alias, write_json_atomic
    from codec.ir.ensemble import ensemble_description
    from codec.ir.lift import load_model
    from codec.ir.lower import external_data_files, save_model
    from codec.version import __version__

    if options.limit is not None and options.limit < 1:
        raise ConfigError(f"--limit must be positive, got {options.limit}")
    if not (isinstance(options.atol, (int, float)) and math.isfinite(options.atol) and options.atol >= 0):
        raise ConfigError(f"--atol must be a finite number >= 0, got {options.atol}")
    output = Path(options.output)
    card_path = Path(options.card) if options.card else output.with_name(output.stem + ".card.json")
    refuse_alias([output, card_path], [options.ensemble, *(options.members or [])], ConfigError)
    model = load_model(options.ensemble)
    refuse_alias(
        [output, card_path], member_paths(options, model)[0], ConfigError
    )  # members from its metadata
    inputs, outputs = check_onnx(options.ensemble)
    description = validate_description(ensemble_description(model) or {}, options.ensemble)
    input_shape = _static_input_shape(inputs, options.ensemble)
    x, data = parity_inputs(options, input_shape)
    parity, fused = check_parity(options, model, description, x)
    parity["data"] = data

    model.metadata_props[DEPLOY_KEY] = json.dumps(
        {
            "parity_max_abs_error": parity["max_abs_error"],
            "atol": options.atol,
            "data": data,
            "codec_version": __version__,
        },
        separators=(",", ":"),
    )
    if not options.external_data:
        import onnx_ir as ir

        # a single file must hold every tensor: without this, tensors the source kept in external data
        # would be written as references to a file the deployable model does not ship with
        ir.external_data.load_to_model(model)
    out = save_model(model, options.output, external_data=options.external_data)
    data_names = external_data_files(out) if options.external_data else []
    data_file = out.parent / data_names[0] if data_names else None
    parity["written_max_abs_error"] = verify_written(out, x, fused, options.batch_size)
    if parity["written_max_abs_error"] > options.atol:
        for written in (out, data_file):
            if written is not None:
                written.unlink(missing_ok=True)
        raise ParityError(
            f"the written {out.name} differs from {options.ensemble.name} by "
            f"{parity['written_max_abs_error']:.3g}; removed it"
        )
    parameters = description.get("parameters", {})
    stored = int(
        sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
    )
    card = {
        "model": out.name,
        "external_data": data_file.name if data_file is not None else None,
        "file_size_bytes": out.stat().st_size + (data_file.stat().st_size if data_file is not None else 0),
        "sha256": _sha256(out),
        "external_data_sha256": _sha256(data_file) if data_file is not None else None,
        "codec_version": __version__,
        "source": str(options.ensemble),
        "opset": {domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
        "ir_version": model.ir_version,
        "task": description.get("task", "classification"),
        "criterion": parity["criterion"],
        "members": description.get("members"),
        "csn": description.get("csn"),
        "shared_layers": description.get("shared_layers"),
        "parameters": {**parameters, "initializer_elements": stored},
        "inputs": inputs,
        # how inputs must be normalised before scoring (codec compile --normalize); None: as loaded, in [0, 1]
        "input_normalization": _normalization(model),
        "outputs": outputs,
        "parity": parity,
    }
    write_json_atomic(card_path, card)
    card["card"] = str(card_path)
    return card
