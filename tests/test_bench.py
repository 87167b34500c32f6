"""codec bench: ensemble-size selection, paired statistics, the Table 1/2 analysis on hand-made ensembles, and
a tiny end-to-end run through the command (real training, compile, sweep, comparisons, inference)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from codec.errors import ConfigError
from codec.pipelines.bench import (
    PROFILES,
    Arm,
    SweepPoint,
    Task,
    analyse_seed,
    layer_macs,
    mcnemar_exact,
    paired_comparison,
    profile_config,
    select_members,
    summarise,
    training_work,
)

CLS = Task("classification", "prod")
REC = Task("reconstruction", "mean")


# ---------------------------------------------------------------------------------------------------------
# Choosing N_baseline
# ---------------------------------------------------------------------------------------------------------


def test_select_members_stops_after_patience_members_without_gain():
    curve = [0.90, 0.92, 0.925, 0.926, 0.924, 0.95]
    n, why, stopped = select_members(curve, CLS, min_gain=0.002, max_members=8, patience=2)
    assert (n, stopped) == (
        3,
        True,
    )  # 0.926 gains only 0.001 over 0.925, 0.924 none: stop; the late 0.95 is never seen
    assert "4..5" in why


def test_select_members_counts_gain_over_the_best_not_the_previous():
    # 0.93 after a dip to 0.91 is +0.02 over the previous member but only +0.01 over the best (0.92)
    n, _, _ = select_members([0.9, 0.92, 0.925, 0.91, 0.93], CLS, min_gain=0.011, max_members=8, patience=3)
    assert n == 2
    n, _, _ = select_members([0.9, 0.92, 0.925, 0.91, 0.93], CLS, min_gain=0.004, max_members=8, patience=3)
    assert n == 5


def test_select_members_keeps_at_least_two_and_stops_at_max():
    assert select_members([0.95, 0.90, 0.89, 0.88], CLS, 0.0, 8, patience=2)[:1] == (2,)
    n, why, stopped = select_members([0.8, 0.85, 0.9, 0.95], CLS, 0.001, 4, patience=2)
    assert (n, stopped) == (4, True) and "max members" in why
    assert select_members([0.8, 0.85, 0.9], CLS, 0.001, 8)[2] is False


def test_select_members_reconstruction_uses_relative_mse_decrease():
    # 0.0100 -> 0.0098 is a 2 % decrease, 0.0098 -> 0.0097 about 1 %, 0.0098 -> 0.00968 about 1.2 %
    curve = [0.012, 0.0100, 0.0098, 0.0097, 0.00968]
    assert select_members(curve, REC, 0.015, 8, patience=2)[:2] == (
        3,
        "members 4..5 each gained < 0.015 over 3 members on validation",
    )
    assert select_members(curve, REC, 0.005, 8, patience=2)[0] == 4


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def test_mcnemar_exact_by_hand():
    a = np.array([1, 1, 1, 1, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1], bool)
    assert mcnemar_exact(a, b) == pytest.approx(2 / 32)  # 5 discordant pairs all one way
    assert mcnemar_exact(b, a) == pytest.approx(2 / 32)
    assert mcnemar_exact(a, a) == 1.0
    # 3 vs 1 discordant: p = 2 * (1 + 4) / 16
    assert mcnemar_exact(np.array([1, 1, 1, 0]), np.array([0, 0, 0, 1])) == pytest.approx(10 / 16)
    # thousands of discordant pairs (a 10,000-image test set): no float overflow, the normal limit holds
    many_a = np.r_[np.ones(1500, bool), np.zeros(1500, bool)]
    assert mcnemar_exact(many_a, ~many_a) == 1.0
    skewed = np.r_[np.ones(1600, bool), np.zeros(1400, bool)]
    z = (1600 - 1400 - 1) / np.sqrt(3000)  # with continuity correction
    assert mcnemar_exact(skewed, ~skewed) == pytest.approx(math.erfc(z / np.sqrt(2)), rel=0.05)


def test_paired_comparison_verdicts():
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.9).astype(float)
    same = paired_comparison(CLS, a, a.copy(), n_boot=200)
    assert same["diff"] == 0 and not same["significant"] and same["verdict"] == "not significant"
    worse = a.copy()
    worse[:300] = 0
    better = paired_comparison(CLS, a, worse, n_boot=200)
    assert better["verdict"] == "better" and better["ci95"][0] > 0 and better["mcnemar_p"] < 1e-6
    assert paired_comparison(CLS, worse, a, n_boot=200)["verdict"] == "worse"
    # reconstruction: lower per-example error is better
    err = rng.random(500)
    assert paired_comparison(REC, err * 0.5, err, n_boot=200)["verdict"] == "better"


def test_summarise_leaves_out_missing_values():
    s = summarise([0.5, None, 0.7, 0.6], n_boot=200)
    assert s["values"] == [0.5, None, 0.7, 0.6]
    assert (s["n"], s["missing"], s["median"], s["min"], s["max"]) == (3, 1, 0.6, 0.5, 0.7)
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    assert summarise([None, None])["median"] is None
    assert summarise([0.3])["ci95"] is None


def test_task_curves_match_metrics():
    from codec.runtime.evaluation.metrics import cumulative_accuracy, cumulative_mse

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(4, 300)).astype(np.float32)
    y = rng.integers(0, 5, 300)
    np.testing.assert_allclose(CLS.curve(probs, y), cumulative_accuracy(probs, y, "prod"))
    recon = rng.random((3, 50, 12)).astype(np.float32)
    x = rng.random((50, 12))
    np.testing.assert_allclose(REC.curve(recon, x), cumulative_mse(recon, x), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Table 1/2 analysis on hand-made ensembles
# ---------------------------------------------------------------------------------------------------------


def _members_with_accuracies(y: np.ndarray, correct_sets: list[np.ndarray], k: int = 3) -> np.ndarray:
    """One-hot-ish member probabilities: member m is confidently right exactly on correct_sets[m]."""
    out = np.full((len(correct_sets), len(y), k), 0.05, np.float32)
    for m, correct in enumerate(correct_sets):
        labels = np.where(correct, y, (y + 1) % k)
        out[m, np.arange(len(y)), labels] = 0.9
    return out


def _arm(name, val, test, seconds, params):
    m = len(val)
    return Arm(
        name,
        [{"name": f"{name}{i}", "epochs": 5} for i in range(m)],
        np.cumsum(seconds),
        np.cumsum(seconds) * 10.0,
        np.asarray(params),
        val,
        test,
    )


def test_analyse_seed_tables():
    n = 400
    y = np.arange(n) % 3
    rng = np.random.default_rng(2)
    # baseline: members right on 80 % of examples each, independent errors -> the product rule gains
    base_sets = [rng.random(n) < 0.8 for _ in range(4)]
    base = _members_with_accuracies(y, base_sets)
    # CODE: main and peer are the baseline's first two; grown members are right everywhere
    code_sets = base_sets[:2] + [np.ones(n, bool), np.ones(n, bool)]
    code = _members_with_accuracies(y, code_sets)
    baseline = _arm("b", base, base, [10.0, 10.0, 10.0, 10.0], [100, 200, 300, 400])
    code_arm = _arm("c", code, code, [10.0, 11.0, 4.0, 4.0], [90, 190, 230, 270])
    result = analyse_seed(
        CLS, baseline, 4, code_arm, y, y, tp_dnn=100, csn_parameters=20, tp_codedn=40, n_boot=200
    )
    t1, t2 = result["table1"], result["table2"]
    target = CLS.curve(base, y)[3]
    code_curve = CLS.curve(code, y)
    reach = next(k for k in range(2, 5) if code_curve[k - 1] >= target)
    assert t1["n_code"] == reach and t1["reached"]
    assert t1["time_fraction"] == pytest.approx(np.cumsum([10.0, 11.0, 4.0, 4.0])[reach - 1] / 40.0)
    assert t1["work_fraction"] == pytest.approx(t1["time_fraction"])
    assert t1["memory_footprint"] == pytest.approx([90, 190, 230, 270][reach - 1] / 400)
    assert t1["baseline_test"]["value"] == pytest.approx(target)
    # every CODE size fits in the baseline's 40 s; the largest is taken
    assert t2["at_budget"]["k"] == 4
    assert t2["at_budget"]["vs_baseline"]["diff"] == pytest.approx(code_curve[3] - target)
    assert t2["unbounded"]["k"] == 2 + int(np.argmax(code_curve[1:]))


def test_analyse_seed_never_reaching_and_no_budget():
    n = 300
    y = np.arange(n) % 3
    good = _members_with_accuracies(y, [np.ones(n, bool)] * 3)
    bad = _members_with_accuracies(y, [np.arange(n) < 200] * 3)
    baseline = _arm("b", good, good, [1.0, 1.0, 1.0], [10, 20, 30])
    code_arm = _arm("c", bad, bad, [5.0, 5.0, 5.0], [9, 18, 27])
    result = analyse_seed(
        CLS, baseline, 2, code_arm, y, y, tp_dnn=10, csn_parameters=0, tp_codedn=9, n_boot=100
    )
    t1 = result["table1"]
    assert not t1["reached"] and t1["n_code"] is None and t1["time_fraction"] is None
    assert t1["memory_footprint_at"] == 3 and t1["memory_footprint"] == pytest.approx(27 / 20)
    assert result["table2"]["at_budget"] is None  # CODE's main and peer alone take longer than the baseline
    assert result["table2"]["unbounded"]["vs_baseline"]["verdict"] == "worse"


def test_layer_macs_and_work():
    from codec.ir.network import Activation, Dense, NetworkIR, Role

    rng = np.random.default_rng(0)
    roles = np.array([Role.FROZEN_SHARED] * 3 + [Role.TRAINABLE] * 5, np.int8)
    net = NetworkIR(
        "n",
        "x",
        "y",
        (10,),
        [
            Dense("l1", rng.random((8, 10)), np.zeros(8), Activation("relu"), roles),
            Dense("l2", rng.random((4, 8)), np.zeros(4), Activation("softmax")),
        ],
    )
    macs = layer_macs(net)
    assert macs[0] == {"layer": "l1", "own": 50, "frozen": 30, "neurons": 8, "frozen_neurons": 3}
    assert macs[1]["own"] == 32 and macs[1]["frozen"] == 0
    # 2 epochs, 100 train, 10 validation: per epoch 100*(6*82 + 2*30) + 10*2*112 without the cache
    assert training_work(macs, 2, 100, 10, cached=False) == 2 * (100 * (6 * 82 + 2 * 30) + 10 * 2 * 112)
    assert training_work(macs, 2, 100, 10, cached=True) == 2 * (100 * 6 * 82 + 10 * 2 * 112) + 2 * 30 * 110


# ---------------------------------------------------------------------------------------------------------
# Configuration and the command
# ---------------------------------------------------------------------------------------------------------


def test_profiles_validate_and_bad_options_are_config_errors():
    for name in PROFILES:
        PROFILES[name].validate()
    with pytest.raises(ConfigError, match="unknown profile"):
        profile_config("huge")
    with pytest.raises(ConfigError, match="unknown recipe"):
        profile_config("quick", recipes=("nope",))
    with pytest.raises(ConfigError, match="distinct"):
        profile_config("quick", seeds=(1, 1))
    with pytest.raises(ConfigError, match="at least 3"):
        profile_config("quick", max_members=2, sweep_members=2)
    with pytest.raises(ConfigError):
        profile_config("quick", sweep=(SweepPoint("bad", passes="dna,nosuchpass"),))
    assert SweepPoint("default").is_default and not SweepPoint("x", grow_init="main").is_default


def _parse(argv):
    from codec.commands import bench as command

    parser = argparse.ArgumentParser(prog="codec")
    command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_end_to_end(tmp_path):
    """A tiny real benchmark: 3 members max, 1 seed, 1 epoch, 2 sweep points, comparisons and inference."""
    from codec.commands import bench as command

    out = tmp_path / "out"
    args = _parse(
        [
            "--recipes",
            "classifier_s",
            "--seeds",
            "0",
            "--n-train",
            "500",
            "--n-test",
            "200",
            "--epochs",
            "1",
            "--max-members",
            "3",
            "--n-boot",
            "50",
            "--quiet",
            "-o",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    args.command_line = "codec bench --tiny"
    config = command.config_from_args(args)
    assert config.sweep_members == 3 and dict(config.train_overrides)["max_epochs"] == 1
    # keep the test fast: two sweep points (the default and one that changes the passes)
    import codec.pipelines.bench as bench_module

    quick = bench_module.PROFILES["quick"]
    bench_module.PROFILES["quick"] = bench_module.dataclasses.replace(
        quick,
        sweep=(SweepPoint("default"), SweepPoint("csne 0.7", passes="dna,dne,nda,csne{fire=0.7,corr=0.7}")),
        inference_batches=(4,),
    )
    try:
        assert command.run(args) == 0
    finally:
        bench_module.PROFILES["quick"] = quick

    index = json.loads((out / "bench.json").read_text())
    assert index["command"] == "codec bench --tiny" and index["recipes"] == {
        "classifier_s": "classifier_s.json"
    }
    assert index["machine"]["threads"] == 1 and "torch" in index["machine"]["versions"]
    r = json.loads((out / "classifier_s.json").read_text())
    assert r["kind"] == "codec-bench-recipe" and r["command"] == "codec bench --tiny" and r["seeds"] == [0]
    assert r["data"] == {"train": 450, "validation": 50, "test": 200}
    seed = r["per_seed"][0]
    base, code = seed["baseline"], seed["code"]
    assert [m["seed"] for m in base["members"]] == list(range(len(base["members"])))
    assert 2 <= base["n_baseline"] <= len(base["members"]) <= 3
    # CODE's main and peer are the baseline's first two members: same facts, not retrained
    assert code["members"][0]["train_seconds"] == base["members"][0]["train_seconds"]
    assert code["members"][1]["train_seconds"] == base["members"][1]["train_seconds"]
    assert len(code["members"]) == 3 and code["curve"][-1]["k"] == 3
    # our evaluation of the CODE members agrees with compile's own
    assert code["recomputed_vs_compile_max_abs_diff"] < 1e-9
    t1 = seed["table1"]
    assert t1["n_baseline"] == base["n_baseline"]
    assert t1["reached"] == (t1["n_code"] is not None)
    assert 0 < t1["memory_footprint"] and t1["baseline_test"]["n"] == 200
    assert seed["table2"]["unbounded"]["vs_baseline"]["verdict"] in ("better", "worse", "not significant")
    assert [row["point"]["name"] for row in r["sweep"]] == ["default", "csne 0.7"]
    assert all(row["members"] == 3 for row in r["sweep"])
    comparison = r["comparisons"][0]
    assert comparison["members"] == base["n_baseline"]
    for method in ("torchensemble", "treenet"):
        entry = comparison[method]
        assert entry["available"] or entry["why"]
        if entry["available"]:
            assert entry["train_seconds"] > 0
    if comparison["treenet"]["available"]:
        assert comparison["treenet"]["heads_stacked"] is True  # classifier_s's MLP branches stack
    inference = r["inference"]
    row = inference["batches"][0]
    assert row["batch"] == 4 and row["max_abs_diff_fused_vs_separate"] < 1e-4
    assert inference["flops_per_example_fused"] <= inference["flops_per_example_separate"]
    assert inference["gemm_best_gflops"] > 0
    assert r["summary"]["seeds"] == 1 and r["summary"]["n_baseline"]["values"] == [base["n_baseline"]]

    # the report renders this fresh output, and the compile run the benchmark kept in --work-dir
    from codec.pipelines.report import render

    page = render([out, tmp_path / "work" / "classifier_s" / "code_0"])
    assert page.count("<svg") >= 8 and page.count("<table") >= 8
    assert "Table 1 analogue" in page and "compile run" in page and "<script" not in page


# ---------------------------------------------------------------------------------------------------------
# bench/engine.py: the machine-limit arithmetic and the end-to-end protocol
# ---------------------------------------------------------------------------------------------------------


def _engine_bench():
    """bench/engine.py is a script, not a module of codec: load it from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_counts_gemm_flops_and_adam_bytes():
    from torch import nn

    engine = _engine_bench()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    layers = engine.gemm_layers(mlp, (4,))
    assert [(g["m"], g["k"], g["n"], g["macs"]) for g in layers] == [(1, 4, 3, 12), (1, 3, 2, 6)]
    # batch 5: forward and weight gradient 2*5*18 each; the input gradient skips the first layer: 2*5*6
    assert engine.training_flops(layers, 5) == {
        "forward": 180.0,
        "weight_grad": 180.0,
        "input_grad": 60.0,
        "total": 420.0,
    }
    # a 3x3 convolution over a 2x5x5 input: 9 output positions, 2*3*3 inputs each, 4 channels
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    layers = engine.gemm_layers(conv, (2, 5, 5))
    assert [(g["m"], g["k"], g["n"], g["macs"]) for g in layers] == [(9, 18, 4, 648), (1, 36, 2, 72)]
    # Adam: param, grad, exp_avg, exp_avg_sq read, param, exp_avg, exp_avg_sq written, 4 bytes each
    assert engine.adam_bytes(10) == 10 * 7 * 4


def test_engine_bench_time_to_quality_is_decided_on_validation_and_earliest_in_time():
    engine = _engine_bench()
    points = [
        {"k": 1, "seconds": 2.0, "val": 0.90, "test": 0.80},
        {"k": 2, "seconds": 2.0, "val": 0.95, "test": 0.81},
        {"k": 3, "seconds": 5.0, "val": 0.96, "test": 0.99},
        {"k": 4, "seconds": 5.0, "val": 0.99, "test": 0.70},
    ]
    reach = engine.time_to_quality(CLS, points, 0.95, baseline_seconds=4.0)
    # k=2 reaches on validation at 2 s; its test quality is reported, not the best test
    assert reach == {"reached": True, "k": 2, "seconds": 2.0, "val": 0.95, "test": 0.81, "fraction": 0.5}
    # sizes out of time order: the earliest in seconds wins, not the smallest k
    shuffled = [dict(points[3], seconds=1.0), *points[:3]]
    assert engine.time_to_quality(CLS, shuffled, 0.95, 4.0)["k"] == 4
    assert engine.time_to_quality(CLS, points, 0.995, 4.0)["reached"] is False
    # reconstruction: lower MSE is better
    mse = [
        {"k": 1, "seconds": 1.0, "val": 0.05, "test": 0.06},
        {"k": 2, "seconds": 3.0, "val": 0.03, "test": 0.04},
    ]
    assert engine.time_to_quality(REC, mse, 0.04, 2.0)["k"] == 2
    # float noise (the same ensemble scored after a rewrite) reaches; a real difference does not
    assert engine.time_to_quality(REC, mse, 0.03 * (1 - 1e-9), 2.0)["k"] == 2
    assert engine.time_to_quality(REC, mse, 0.03 * (1 - 1e-4), 2.0)["reached"] is False


def test_engine_bench_end_to_end_protocol(tmp_path):
    """A tiny real run: 2 baseline members, engine-only, a 3-member compile; engine-only's members are the
    baseline's (same seeds, same weights), and CODE's sizes carry the times the protocol says."""
    engine = _engine_bench()
    r = engine.end_to_end(
        "classifier_s", 2, 3, None, 1, 0, tmp_path, {"n_train": 300, "n_test": 100, "max_epochs": 1}
    )
    assert r["data"] == {"train": 270, "validation": 30, "test": 100}
    base, alone, code = r["baseline"], r["engine_only"], r["code"]
    assert [p["k"] for p in base["sizes"]] == [1, 2] and [p["k"] for p in code["sizes"]] == [1, 2, 3]
    assert base["sizes"][1]["seconds"] == pytest.approx(sum(m["train_seconds"] for m in base["members"]))
    assert r["target_val"] == base["sizes"][-1]["val"]
    # stacked training of the same seeds gives the baseline's members: the same quality at every size
    assert alone["stacked"] == [0, 1]
    assert [(p["val"], p["test"]) for p in alone["sizes"]] == [(p["val"], p["test"]) for p in base["sizes"]]
    assert len({p["seconds"] for p in alone["sizes"]}) == 1
    t = code["time"]
    assert code["main_peer_stacked"]
    assert [p["seconds"] for p in code["sizes"]] == pytest.approx(
        [t["main_peer"] + t["passes"]] * 2 + [t["main_peer"] + t["passes"] + t["grown"]]
    )
    for name, arm in (("code", code), ("engine_only", alone)):
        reach = r["time_to_baseline_quality"][name]
        expected = engine.time_to_quality(CLS, arm["sizes"], r["target_val"], base["seconds"])
        assert reach == expected
        assert reach["reached"] == any(p["val"] >= r["target_val"] for p in arm["sizes"])
