"""Bring your own network and data: `codec compile --model/--main/--peer/--data`, `codec.compile`, the user
data formats (npz splits or x/y, npy folders, ImageFolder), normalisation, and every refusal before
training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import export_torch, run_onnx
from torch import nn

import codec
from codec.cli import main
from codec.errors import ConfigError, DataError
from codec.runtime.data import Normalization, load_dataset, load_training_set, parse_normalize
from codec.runtime.evaluation.metrics import combine

REPO = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "2", "--batch-size", "32", "--threads", "1", "--quiet", "--calibration", "300"]


def _blobs(n=500, d=20, k=3, seed=0):
    """Separable Gaussian blobs: a tabular classification task that an MLP learns in an epoch or two."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2.0
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int64)


def _mlp(d=20, k=3, softmax=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, k)]
    return nn.Sequential(*layers, *([nn.Softmax(dim=1)] if softmax else [])).eval()


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    x, y = _blobs()
    np.savez(root / "tab.npz", x_train=x[:400], y_train=y[:400], x_test=x[400:], y_test=y[400:])
    export_torch(_mlp(), torch.zeros(2, 20), root / "mlp.onnx", dynamo=True)
    return root


def _members(run_dir: Path, n: int) -> list[Path]:
    return [
        run_dir / "opt/main.onnx",
        run_dir / "opt/peer.onnx",
        *(run_dir / f"members/grown_{i}.onnx" for i in range(1, n - 1)),
    ]


def _assert_fused_is_members_combined(run_dir: Path, x: np.ndarray, n: int) -> np.ndarray:
    probs = np.stack([run_onnx(m, x) for m in _members(run_dir, n)])
    fused = run_onnx(run_dir / "ensemble.onnx", x)
    np.testing.assert_allclose(fused, combine(probs, "prod"), atol=1e-5)
    return probs


# --- --model through the CLI --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_mlp(tabular):
    run_dir = tabular / "run"
    code = main(
        [
            "compile",
            "--model",
            str(tabular / "mlp.onnx"),
            "--data",
            f"npz:{tabular / 'tab.npz'}",
            "--members",
            "4",
            "-o",
            str(run_dir),
            *FAST,
        ]
    )
    assert code == 0
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_model_mlp_from_dynamo_export_compiles_to_a_fused_ensemble(compiled_mlp, tabular):
    # The user's MLP (ReLU + Dropout, exported by torch's dynamo exporter) through lift -> IRModule -> train.
    run_dir, report = compiled_mlp
    x = np.load(tabular / "tab.npz")["x_test"]
    probs = _assert_fused_is_members_combined(run_dir, x, 4)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-5)  # the appended softmax is in every member
    assert report["recipe"] is None and report["model"] == str(tabular / "mlp.onnx")
    assert report["task"] == "classification" and report["loss"] == {
        "name": "ce",
        "why": "the output is logits, one per class",
    }
    assert any("appended a softmax" in note for note in report["notes"])
    assert report["quality"]["accuracy"] > 0.8
    assert report["epochs"]["main"] == 2 and len(report["epochs"]["grow"]) == 2


def test_model_main_starts_from_the_files_weights_unless_init_random(tabular, compiled_mlp):
    run_dir, _ = compiled_mlp
    state = json.loads((run_dir / "state.json").read_text())["steps"]
    assert state["train:main"]["init"] == "onnx" and state["train:peer"]["init"] == "random"
    # A file whose weights are not what init random draws (torch seed 7): with init onnx main trains from
    # them, with init random from fresh ones, so after the same training their weights differ.
    export_torch(_mlp(seed=7), torch.zeros(2, 20), tabular / "mlp7.onnx", dynamo=True)
    weights = {}
    for init in ("onnx", "random"):
        out = tabular / f"init_{init}"
        assert (
            main(
                [
                    "compile",
                    "--model",
                    str(tabular / "mlp7.onnx"),
                    "--data",
                    f"npz:{tabular / 'tab.npz'}",
                    "--members",
                    "2",
                    "-o",
                    str(out),
                    "--init",
                    init,
                    "--passes",
                    "dna",
                    *FAST,
                ]
            )
            == 0
        )
        weights[init] = onnx.numpy_helper.to_array(
            onnx.load(str(out / "members/main.onnx")).graph.initializer[0]
        )
    start = onnx.numpy_helper.to_array(onnx.load(str(tabular / "mlp7.onnx")).graph.initializer[0])
    assert np.abs(weights["onnx"] - start).max() < 0.1 < np.abs(weights["random"] - start).max()


def test_model_run_resumes_without_retraining(compiled_mlp, tabular):
    run_dir, report = compiled_mlp
    before = {m: (run_dir / m).stat().st_mtime_ns for m in ("members/main.onnx", "members/grown_2.onnx")}
    assert (
        main(
            [
                "compile",
                "--model",
                str(tabular / "mlp.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                "4",
                "-o",
                str(run_dir),
                "--resume",
                *FAST,
            ]
        )
        == 0
    )
    assert {m: (run_dir / m).stat().st_mtime_ns for m in before} == before
    assert json.loads((run_dir / "report.json").read_text())["quality"] == report["quality"]


def test_report_page_names_the_users_model(compiled_mlp, tmp_path):
    run_dir, _ = compiled_mlp
    assert main(["report", str(run_dir), "-o", str(tmp_path / "r.html")]) == 0
    assert "mlp.onnx on npz:" in (tmp_path / "r.html").read_text()


def test_compile_help_lists_the_sources_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--main",
        "--peer",
        "--init",
        "--loss",
        "--optimizer",
        "--normalize",
        "folder:DIR",
        "npy:DIR",
    ):
        assert option in text


def test_model_as_wide_as_its_input_trains_as_an_autoencoder(tmp_path, tabular):
    torch.manual_seed(0)
    export_torch(
        nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 20)).eval(),
        torch.zeros(2, 20),
        tmp_path / "ae.onnx",
        dynamo=True,
    )
    run_dir = tmp_path / "ae"
    assert (
        main(
            [
                "compile",
                "--model",
                str(tmp_path / "ae.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                "3",
                "-o",
                str(run_dir),
                *FAST,
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "reconstruction" and report["criterion"] == "mean"
    assert report["loss"] == {
        "name": "mse",
        "why": "the output is not a softmax and as wide as the input (20)",
    }
    x = np.load(tabular / "tab.npz")["x_test"]
    outputs = np.stack([run_onnx(m, x) for m in _members(run_dir, 3)])
    np.testing.assert_allclose(run_onnx(run_dir / "ensemble.onnx", x), outputs.mean(axis=0), atol=1e-5)


def test_recipe_on_the_users_data(tmp_path, tabular):
    run_dir = tmp_path / "recipe"
    assert (
        main(
            [
                "compile",
                "--recipe",
                "classifier_s",
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                "2",
                "--passes",
                "dna",
                "-o",
                str(run_dir),
                *FAST,
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"] == "classifier_s" and report["dataset"] == f"npz:{tabular / 'tab.npz'}"
    assert report["loss"] == {"name": "ce", "why": "recipe classifier_s"} and report["data"]["test"] == 100


# --- codec.compile (Python API) -----------------------------------------------------------------------


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_api_compiles_a_small_cnn_module_on_numpy_images(tmp_path):
    from codec.runtime.data import load_dataset as load

    data = load("mnist_small").subset(600, 200, seed=0)

    # uint8 NHWC images as a user holds them; codec scales them to [0, 1] and makes them NCHW.
    def to_user(x):
        return np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)

    result = codec.compile(
        _SmallCNN(),
        (to_user(data.x_train), data.y_train, None, None, to_user(data.x_test), data.y_test),
        members=3,
        out=tmp_path / "cnn",
        epochs=3,
        batch_size=32,
        lr=5e-3,
        threads=1,
        calibration=300,
    )
    assert isinstance(result, codec.CompileResult) and result.ensemble == tmp_path / "cnn" / "ensemble.onnx"
    assert result.report["model"] == str(tmp_path / "cnn" / "model.onnx")
    _assert_fused_is_members_combined(result.run_dir, data.x_test[:100], 3)
    assert result.accuracy == result.report["quality"]["accuracy"] > 0.5
    with pytest.raises(ConfigError, match="already holds a run; pass resume=True"):
        codec.compile(_SmallCNN(), "mnist_small", out=tmp_path / "cnn")


def test_api_takes_an_onnx_path_and_torch_datasets(tmp_path, tabular):
    from torch.utils.data import TensorDataset

    x, y = _blobs(seed=1)
    train = TensorDataset(torch.from_numpy(x[:400]), torch.from_numpy(y[:400]))
    test = TensorDataset(torch.from_numpy(x[400:]), torch.from_numpy(y[400:]))
    result = codec.compile(
        tabular / "mlp.onnx",
        (train, None, test),
        members=2,
        out=tmp_path / "ds",
        epochs=1,
        threads=1,
        passes="dna",
        calibration=200,
    )
    saved = np.load(tmp_path / "ds" / "data.npz")
    assert sorted(saved.files) == ["x_test", "x_train", "y_test", "y_train"]
    np.testing.assert_array_equal(saved["y_test"], y[400:])
    assert result.report["data"] == {"train": 360, "validation": 40, "test": 100}


def test_api_exports_a_flat_mlp_for_image_data(tmp_path):
    # An MLP taking (784,) inputs while the data are (1, 28, 28) images: exported flat, data reshaped.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=1))
    result = codec.compile(
        model,
        "mnist_small",
        members=2,
        out=tmp_path / "flat",
        epochs=1,
        threads=1,
        n_train=300,
        n_test=100,
        passes="dna",
        calibration=200,
    )
    assert result.report["loss"]["why"] == "the output layer is a softmax" and result.report["notes"] == []


# --- --main / --peer ---------------------------------------------------------------------------------


def test_given_main_and_peer_are_not_trained_again(tmp_path, tabular):
    # Two members "the user trained": the MLP exported twice with different weights, one ending in softmax.
    export_torch(_mlp(seed=1), torch.zeros(2, 20), tmp_path / "a.onnx", dynamo=True)
    export_torch(_mlp(seed=2, softmax=True), torch.zeros(2, 20), tmp_path / "b.onnx", dynamo=True)
    run_dir = tmp_path / "given"
    assert (
        main(
            [
                "compile",
                "--main",
                str(tmp_path / "a.onnx"),
                "--peer",
                str(tmp_path / "b.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                "3",
                "-o",
                str(run_dir),
                *FAST,
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert (
        report["epochs"]["main"] == 0 and report["epochs"]["peer"] == 0 and report["time"]["train_main"] == 0
    )
    assert report["given_members"] == {"main": str(tmp_path / "a.onnx"), "peer": str(tmp_path / "b.onnx")}
    x = np.load(tabular / "tab.npz")["x_test"]
    # members/main.onnx is the user's main with a softmax appended: same argmax, probabilities out.
    logits = run_onnx(tmp_path / "a.onnx", x)
    stored = run_onnx(run_dir / "members/main.onnx", x)
    np.testing.assert_allclose(stored, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        run_onnx(run_dir / "members/peer.onnx", x), run_onnx(tmp_path / "b.onnx", x), atol=1e-5
    )
    _assert_fused_is_members_combined(run_dir, x, 3)


def test_api_given_main_and_peer_modules(tmp_path, tabular):
    x, y = _blobs()
    result = codec.compile(
        _mlp(seed=1),
        (x[:400], y[:400], None, None, x[400:], y[400:]),
        members=3,
        out=tmp_path / "pair",
        peer=_mlp(seed=2),
        epochs=1,
        threads=1,
        calibration=200,
    )
    assert result.report["given_members"] == {
        "main": str(tmp_path / "pair/main.onnx"),
        "peer": str(tmp_path / "pair/peer.onnx"),
    }
    assert result.report["epochs"]["main"] == 0 and result.report["epochs"]["grow"] == [1]
    _assert_fused_is_members_combined(result.run_dir, x[400:], 3)


# --- refusals, all before training -------------------------------------------------------------------


def _refused(capsys, argv, run_dir: Path, pattern: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (run_dir / "config.json").exists(), "refused before the run directory was even set up"


@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        (
            nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 3)),
            r"examples have shape \[20\] but the model .* expects \[30\]",
        ),
        (
            nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)),
            r"outputs 2 values per example: neither one per class \(3 in",
        ),
        (
            nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU()),
            r"ends in relu .*a classifier must end in a Dense layer with a softmax or no activation",
        ),
    ],
    ids=["input-shape", "classes-vs-outputs", "not-logits-nor-probabilities"],
)
def test_model_refusals_before_training(tmp_path, tabular, capsys, module, pattern):
    export_torch(module.eval(), torch.zeros(2, module[0].in_features), tmp_path / "m.onnx", dynamo=True)
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tmp_path / "m.onnx"),
            "--data",
            f"npz:{tabular / 'tab.npz'}",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        pattern,
    )


def test_labels_beyond_the_outputs_refused_with_loss_ce(tmp_path, tabular, capsys):
    export_torch(
        nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
        torch.zeros(2, 20),
        tmp_path / "m.onnx",
        dynamo=True,
    )
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tmp_path / "m.onnx"),
            "--data",
            f"npz:{tabular / 'tab.npz'}",
            "--loss",
            "ce",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        r"labels up to 2 \(3 classes\) but .* only 2 outputs",
    )


def test_missing_split_named_with_what_was_found(tmp_path, tabular, capsys):
    x, y = _blobs(n=50)
    np.savez(tmp_path / "cal.npz", x=x, y=y)
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tabular / "mlp.onnx"),
            "--data",
            f"npz:{tmp_path / 'cal.npz'}",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        r"cal.npz: has x, y; compile needs x_train, y_train \(optional x_val, y_val, x_test, y_test\)",
    )


def test_source_options_refused_one_line(tmp_path, tabular, capsys):
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        ["compile", "--model", str(tabular / "mlp.onnx"), "-o", str(run_dir)],
        run_dir,
        "--model needs --data",
    )
    _refused(
        capsys,
        ["compile", "--recipe", "classifier_s", "--model", str(tabular / "mlp.onnx"), "-o", str(run_dir)],
        run_dir,
        "give exactly one of .*got --recipe and --model",
    )
    _refused(
        capsys,
        ["compile", "--main", str(tabular / "mlp.onnx"), "--data", "mnist_small", "-o", str(run_dir)],
        run_dir,
        "give exactly one|--main and --peer go together",
    )
    _refused(
        capsys,
        ["compile", "--model", str(tmp_path / "nope.onnx"), "--data", "mnist_small", "-o", str(run_dir)],
        run_dir,
        "--model .*nope.onnx: no such file",
    )
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tabular / "mlp.onnx"),
            "--data",
            f"npz:{tabular / 'tab.npz'}",
            "--normalize",
            "0.5,0.5/0.2",
            "-o",
            str(run_dir),
        ],
        run_dir,
        "as many means as stds",
    )


def test_given_members_of_different_architectures_refused(tmp_path, tabular, capsys):
    export_torch(
        nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)).eval(),
        torch.zeros(2, 20),
        tmp_path / "small.onnx",
        dynamo=True,
    )
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        [
            "compile",
            "--main",
            str(tabular / "mlp.onnx"),
            "--peer",
            str(tmp_path / "small.onnx"),
            "--data",
            f"npz:{tabular / 'tab.npz'}",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        r"--main and --peer must have the same architecture: layer output shapes \[\[20\], \[32\]",
    )


def test_nan_and_empty_user_data_refused_before_training(tmp_path, tabular, capsys):
    x, y = _blobs(n=60)
    x[7, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=y)
    np.savez(tmp_path / "empty.npz", x_train=np.zeros((0, 20), np.float32), y_train=np.zeros(0, np.int64))
    run_dir = tmp_path / "run"
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tabular / "mlp.onnx"),
            "--data",
            f"npz:{tmp_path / 'nan.npz'}",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        r"non-finite values \(1 NaN\)",
    )
    _refused(
        capsys,
        [
            "compile",
            "--model",
            str(tabular / "mlp.onnx"),
            "--data",
            f"npz:{tmp_path / 'empty.npz'}",
            "-o",
            str(run_dir),
            *FAST,
        ],
        run_dir,
        r"x is empty",
    )


class _ResidualBN(nn.Module):
    """A user network with BatchNorm and a residual block (lifted since engineer irnet's branch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.b, self.out = (
            nn.Linear(20, 32),
            nn.BatchNorm1d(32),
            nn.Linear(32, 32),
            nn.Linear(32, 3),
        )

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        return self.out(torch.relu(h + self.b(h)))


@pytest.mark.parametrize(
    "module",
    [nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 3)), _ResidualBN()],
    ids=["gelu-dropout-mlp", "batchnorm-residual"],
)
def test_model_gelu_and_residual_batchnorm_networks_compile(tmp_path, tabular, module):
    export_torch(module.eval(), torch.zeros(2, 20), tmp_path / "m.onnx", dynamo=True)
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "compile",
                "--model",
                str(tmp_path / "m.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                "3",
                "-o",
                str(run_dir),
                *FAST,
            ]
        )
        == 0
    )
    _assert_fused_is_members_combined(run_dir, np.load(tabular / "tab.npz")["x_test"], 3)


# --- data formats ------------------------------------------------------------------------------------


def test_npz_x_y_alone_serves_calibration_commands(tmp_path, tabular, capsys):
    x, y = _blobs(n=80)
    np.savez(tmp_path / "cal.npz", x=x, y=y)
    dataset = load_dataset(f"npz:{tmp_path / 'cal.npz'}")
    np.testing.assert_array_equal(dataset.x_train, dataset.x_test)
    assert "one split (x, y)" in dataset.notes[0]
    assert (
        main(["profile", str(tabular / "mlp.onnx"), "--data", f"npz:{tmp_path / 'cal.npz'}", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)


def test_npz_neither_layout_names_found_and_needed(tmp_path):
    np.savez(tmp_path / "odd.npz", inputs=np.zeros((4, 3)), x_train=np.zeros((4, 3)))
    with pytest.raises(
        DataError, match=r"odd.npz: missing array y_train; it has inputs, x_train \(x_train needs y_train\)"
    ):
        load_dataset(f"npz:{tmp_path / 'odd.npz'}")
    np.savez(tmp_path / "odd2.npz", inputs=np.zeros((4, 3)))
    with pytest.raises(
        DataError,
        match=r"has inputs; needs x, y \(one split, for calibration\) or x_train, y_train, x_test, y_test",
    ):
        load_dataset(f"npz:{tmp_path / 'odd2.npz'}")


def test_training_set_uses_x_val_and_holds_out_a_test_split(tmp_path):
    x, y = _blobs(n=200)
    np.savez(tmp_path / "trval.npz", x_train=x[:150], y_train=y[:150], x_val=x[150:], y_val=y[150:])
    dataset = load_training_set(f"npz:{tmp_path / 'trval.npz'}")
    assert len(dataset.x_val) == 50 and len(dataset.x_test) == 15 and len(dataset.x_train) == 135
    assert "held out 15 of the 150 training examples" in dataset.notes[0]
    # the held-out examples are not also trained on
    train_rows = {r.tobytes() for r in dataset.x_train}
    assert not any(r.tobytes() in train_rows for r in dataset.x_test)
    np.savez(tmp_path / "half.npz", x_train=x, y_train=y, x_val=x[:5])
    with pytest.raises(DataError, match="missing array y_val"):
        load_training_set(f"npz:{tmp_path / 'half.npz'}")


def test_npy_folder(tmp_path):
    x, y = _blobs(n=40)
    folder = tmp_path / "arrays"
    folder.mkdir()
    for name, value in {"x_train": x[:30], "y_train": y[:30], "x_test": x[30:], "y_test": y[30:]}.items():
        np.save(folder / f"{name}.npy", value)
    dataset = load_dataset(f"npy:{folder}")
    np.testing.assert_array_equal(dataset.x_test, x[30:])
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(f"npy:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="has no arrays; needs x, y"):
        load_dataset(f"npy:{tmp_path}")


def _write_images(root: Path, classes: dict[str, int], size=(6, 5), mode="L", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_layouts(tmp_path):
    _write_images(tmp_path / "flat", {"cat": 3, "dog": 2})
    single = load_dataset(f"folder:{tmp_path / 'flat'}")
    assert single.class_names == ("cat", "dog") and single.input_shape == (1, 5, 6)
    assert (
        single.y_train.tolist() == [0, 0, 0, 1, 1]
        and 0.0 <= single.x_train.min()
        and single.x_train.max() <= 1.0
    )
    _write_images(tmp_path / "split" / "train", {"a": 4, "b": 4}, mode="RGB")
    _write_images(tmp_path / "split" / "test", {"a": 1, "b": 2}, mode="RGB", seed=1)
    dataset = load_training_set(f"folder:{tmp_path / 'split'}")
    assert dataset.input_shape == (3, 5, 6) and dataset.y_test.tolist() == [0, 1, 1] and dataset.notes == ()
    _write_images(tmp_path / "odd", {"a": 1}, size=(6, 5))
    _write_images(tmp_path / "odd", {"b": 1}, size=(7, 5))
    with pytest.raises(DataError, match=r"b/0.jpg: is 7x5 but 0.jpg is 6x5; all images must have one size"):
        load_dataset(f"folder:{tmp_path / 'odd'}")


def test_compile_on_an_image_folder(tmp_path):
    # ImageFolder data end to end: RGB 8x8 images whose class is their brightness, a tiny CNN.
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("test", 20)):
        for label, name in enumerate(("dark", "light")):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (8, 8, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(
                    tmp_path / "imgs" / split / name / f"{i}.png"
                )
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 2),
    ).eval()
    export_torch(cnn, torch.zeros(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=True)
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "compile",
                "--model",
                str(tmp_path / "cnn.onnx"),
                "--data",
                f"folder:{tmp_path / 'imgs'}",
                "--members",
                "3",
                "--normalize",
                "mean-std",
                "-o",
                str(run_dir),
                *FAST,
                "--epochs",
                "10",
                "--lr",
                "0.01",
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert (
        report["data"] == {"train": 108, "validation": 12, "test": 40}
        and len(report["normalization"]["mean"]) == 3
    )
    x = Normalization(
        **{k: tuple(v) for k, v in report["normalization"].items() if k in ("mean", "std")}
    ).apply(load_dataset(f"folder:{tmp_path / 'imgs'}").x_test)
    _assert_fused_is_members_combined(run_dir, x, 3)
    assert report["quality"]["accuracy"] > 0.9


# --- normalisation -----------------------------------------------------------------------------------


def test_normalization_fit_apply_and_parse():
    x = np.random.default_rng(0).normal(
        loc=[[[[3.0]], [[-1.0]]]], scale=[[[[2.0]], [[0.5]]]], size=(500, 2, 4, 4)
    )
    norm = Normalization.fit(x)
    z = norm.apply(x)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    assert parse_normalize("0.1307/0.3081") == Normalization((0.1307,), (0.3081,))
    assert parse_normalize("none") is None and parse_normalize("mean-std") == "mean-std"
    with pytest.raises(ConfigError, match="MEAN/STD"):
        parse_normalize("0.5")
    with pytest.raises(ConfigError, match="3 mean/std value\\(s\\) but data has 2 channels"):
        Normalization((0.0,) * 3, (1.0,) * 3).apply(x)


def test_normalize_mean_std_recorded_in_report_and_ensemble(tmp_path, tabular):
    run_dir = tmp_path / "norm"
    assert (
        main(
            [
                "compile",
                "--model",
                str(tabular / "mlp.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--normalize",
                "mean-std",
                "--members",
                "2",
                "--passes",
                "dna",
                "-o",
                str(run_dir),
                *FAST,
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    # fit on the examples training sees: the training split without compile's 10 % validation split (seed 0)
    rest, _ = load_dataset(f"npz:{tabular / 'tab.npz'}").split_validation(0.1, seed=0)
    expected = Normalization.fit(rest.x_train)
    assert report["normalization"]["source"] == "train"
    np.testing.assert_allclose(report["normalization"]["mean"], expected.mean, rtol=1e-6)
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "ensemble.onnx")).metadata_props}
    assert json.loads(meta["codec.normalization"]) == report["normalization"]
    assert json.loads((run_dir / "config.json").read_text())["normalize"] == "mean-std"
    # codec export carries it into the model card, so the deployed model is scored on normalised inputs
    members = [str(run_dir / "opt/main.onnx"), str(run_dir / "opt/peer.onnx")]
    assert (
        main(
            [
                "export",
                str(run_dir / "ensemble.onnx"),
                "-o",
                str(tmp_path / "deploy.onnx"),
                "--data",
                f"npz:{tabular / 'tab.npz'}",
                "--members",
                *members,
            ]
        )
        == 0
    )
    card = json.loads((tmp_path / "deploy.card.json").read_text())
    assert card["input_normalization"] == report["normalization"]


# --- the README's first worked example, as written ---------------------------------------------------


def _readme_section_blocks(title: str) -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL):
        blocks.setdefault(lang, []).append(body)
    return blocks


def test_readme_bring_your_own_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex

    blocks = _readme_section_blocks("Your own network and data")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks["python"][0], "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = capsys.readouterr().out
    assert "CompileResult(4 members, ensemble accuracy" in printed and "runs/byo/ensemble.onnx" in printed
    report = json.loads((tmp_path / "runs/byo/report.json").read_text())
    assert report["quality"]["accuracy"] > 0.9 and report["normalization"]["mode"] == "mean-std"
    # the shell block: the same compile from the command line, on what the Python block wrote
    (command,) = blocks["bash"]
    argv = shlex.split(command.strip())
    assert argv[0] == "codec"
    assert main(argv[1:] + ["--quiet"]) == 0
    assert (tmp_path / "runs/byo_cli/ensemble.onnx").is_file()
