"""`codec profile` says what the default `codec opt` removes, and that is what opt removes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from codec.cli import main
from codec.ir import Activation, Dense, NetworkIR, lower, save_model


def _member(seed: int, dead: list[int]) -> NetworkIR:
    rng = np.random.default_rng(seed)
    b1 = rng.normal(0.2, 0.05, 16).astype(np.float32)
    b1[dead] = -1e3  # dead on every input
    return NetworkIR(
        f"m{seed}",
        "input",
        "output",
        (784,),
        [
            Dense("fc1", rng.standard_normal((16, 784)).astype(np.float32) * 0.05, b1, Activation("relu")),
            Dense(
                "out",
                rng.standard_normal((10, 16)).astype(np.float32),
                np.zeros(10, np.float32),
                Activation("softmax"),
            ),
        ],
    )


@pytest.fixture
def pair(tmp_path):
    main_path = save_model(lower(_member(0, [0, 1, 2, 3])), tmp_path / "main.onnx")
    peer_path = save_model(lower(_member(1, [2, 3, 4, 5])), tmp_path / "peer.onnx")
    return main_path, peer_path


def _profile(args, capsys) -> dict:
    assert main(["profile", *args, "--data", "mnist_small", "--limit", "200", "--quiet", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_profile_alone_and_with_peer_matches_default_opt(pair, tmp_path, capsys):
    main_path, peer_path = pair
    alone = _profile([str(main_path)], capsys)
    assert alone["layers"][0]["always_zero"] == 4
    assert alone["opt_default"]["removes_per_layer"] == {"fc1": 4}
    assert "same position in every member" in alone["opt_default"]["note"]

    beside = _profile([str(main_path), "--peer", str(peer_path)], capsys)
    assert beside["opt_default"]["removes_per_layer"] == {"fc1": 2}  # positions 2 and 3 only
    assert "removes 2 of this model's 4 dead neurons" in beside["opt_default"]["note"]

    args = [
        "opt",
        "--passes",
        "dna,dne",
        str(main_path),
        "--peer",
        str(peer_path),
        "--data",
        "mnist_small",
        "--limit",
        "200",
        "--quiet",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["passes"][1]["details"]["removed_per_layer"]["main"]
        == beside["opt_default"]["removes_per_layer"]
    )


def test_profile_human_output_says_what_opt_does(pair, capsys):
    main_path, _ = pair
    assert main(["profile", str(main_path), "--data", "mnist_small", "--limit", "100", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "opt removes" in out and "dna{scope=member} removes each member's own" in out
