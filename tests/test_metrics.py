"""Tests of codec.runtime.evaluation.metrics against small examples computed by hand (the arithmetic is in the
comments), plus the error cases."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec.errors import CodecError, ConfigError, DataError, ShapeError
from codec.runtime.evaluation import metrics

# The shared example: 3 members x 4 examples x 3 classes (each member lists examples ex0..ex3).
MEMBER0 = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]  # argmax 0 1 2 0
MEMBER1 = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]  # argmax 0 2 0 1
MEMBER2 = [[0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]  # argmax 1 1 2 2
PROBS = np.array([MEMBER0, MEMBER1, MEMBER2])
Y = np.array([0, 1, 2, 1])
# Member correctness vs Y:  member0 [T T T F] = 3/4,  member1 [T F F T] = 2/4,  member2 [F T T F] = 2/4.

# prod, unnormalised products per class:
#   ex0: .7*.6*.1=.042  .2*.3*.8=.048  .1*.1*.1=.001  -> sum .091, argmax 1 (wrong)
#   ex1: .1*.2*.1=.002  .6*.2*.7=.084  .3*.6*.2=.036  -> sum .122, argmax 1 (right)
#   ex2: .3*.5*.2=.030  .3*.4*.2=.024  .4*.1*.6=.024  -> sum .078, argmax 0 (wrong)
#   ex3: .5*.2*.3=.030  .4*.7*.3=.084  .1*.1*.4=.004  -> sum .118, argmax 1 (right)
PROD_EXPECTED = np.array(
    [
        [0.042, 0.048, 0.001],
        [0.002, 0.084, 0.036],
        [0.030, 0.024, 0.024],
        [0.030, 0.084, 0.004],
    ]
)
PROD_EXPECTED = PROD_EXPECTED / PROD_EXPECTED.sum(axis=1, keepdims=True)


def one_line(error: pytest.ExceptionInfo) -> bool:
    message = str(error.value)
    return bool(message) and "\n" not in message


# ---------------------------------------------------------------------------------------------- combine


def test_combine_prod_by_hand():
    scores = metrics.combine(PROBS, "prod")
    np.testing.assert_allclose(scores, PROD_EXPECTED, rtol=1e-12)
    assert metrics.accuracy(scores, Y) == 0.5  # right on ex1 and ex3 only


def test_combine_mean_by_hand():
    # ex0 [1.4 1.3 .3]/3 -> 0 ok; ex1 [.4 1.5 1.1]/3 -> 1 ok;
    # ex2 [1.0 .9 1.1]/3 -> 2 ok; ex3 [1.0 1.4 .6]/3 -> 1 ok
    expected = np.array([[1.4, 1.3, 0.3], [0.4, 1.5, 1.1], [1.0, 0.9, 1.1], [1.0, 1.4, 0.6]]) / 3
    scores = metrics.combine(PROBS, "mean")
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert metrics.accuracy(scores, Y) == 1.0


def test_combine_vote_by_hand_with_a_tie_going_to_the_lowest_class():
    # Member argmaxes per example: ex0 (0,0,1) ex1 (1,2,1) ex2 (2,0,2) ex3 (0,1,2) -> a three-way tie.
    expected = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 2], [1, 1, 1]]) / 3
    scores = metrics.combine(PROBS, "vote")
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # The tie on ex3 goes to class 0, but Y[3] = 1: 3 of 4 right.
    assert scores[3].argmax() == 0
    assert metrics.accuracy(scores, Y) == 0.75


def test_vote_uses_each_members_lowest_index_on_its_own_ties():
    # Member 0 ties classes 1 and 2 (votes 1); member 1 votes 2. Votes: class 1 one, class 2 one -> tie,
    # and the ensemble's argmax picks class 1.
    probs = np.array([[[0.0, 0.5, 0.5]], [[0.1, 0.2, 0.7]]])
    scores = metrics.combine(probs, "vote")
    np.testing.assert_array_equal(scores, [[0.0, 0.5, 0.5]])
    assert metrics.accuracy(scores, [1]) == 1.0


def test_combine_max_by_hand():
    # Per-class maxima: ex0 [.7 .8 .1]/1.6; ex1 [.2 .7 .6]/1.5; ex2 [.5 .4 .6]/1.5; ex3 [.5 .7 .4]/1.6
    expected = np.array([[0.7, 0.8, 0.1], [0.2, 0.7, 0.6], [0.5, 0.4, 0.6], [0.5, 0.7, 0.4]])
    expected = expected / np.array([[1.6], [1.5], [1.5], [1.6]])
    scores = metrics.combine(PROBS, "max")
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert metrics.accuracy(scores, Y) == 0.75  # ex0 wrong


def test_prod_with_a_zero_probability_is_a_veto():
    # Member 0 rules out class 0, member 1 rules out class 2; class 1 has product .25 and wins outright.
    probs = np.array([[[0.0, 0.5, 0.5]], [[0.5, 0.5, 0.0]]])
    scores = metrics.combine(probs, "prod")
    assert np.all(np.isfinite(scores))
    assert scores[0, 1] == pytest.approx(1.0, abs=1e-15)
    # The vetoed classes get PROD_EPS * 0.5 / 0.25 = 2 * PROD_EPS, not a comparable probability.
    assert scores[0, 0] == pytest.approx(2 * metrics.PROD_EPS, rel=1e-9)
    assert scores[0, 2] == pytest.approx(2 * metrics.PROD_EPS, rel=1e-9)


def test_prod_veto_beats_a_tiny_but_nonzero_product():
    # Class 0: .99999^3 * 0 (vetoed by member 3); class 1: 1e-5^3 * 1 = 1e-15. Clipping at 1e-12 instead
    # of PROD_EPS would score class 0 at ~1e-12 > 1e-15 and let the veto lose.
    probs = np.array([[[0.99999, 1e-5]], [[0.99999, 1e-5]], [[0.99999, 1e-5]], [[0.0, 1.0]]])
    scores = metrics.combine(probs, "prod")
    assert scores[0].argmax() == 1
    assert scores[0, 0] < 1e-290


def test_prod_when_every_class_is_vetoed_stays_finite():
    # Each class is zero in one member: all products clip to PROD_EPS * 1 -> uniform.
    probs = np.array([[[0.0, 1.0]], [[1.0, 0.0]]])
    np.testing.assert_allclose(metrics.combine(probs, "prod"), [[0.5, 0.5]])


def test_prod_does_not_underflow_with_many_members():
    # A direct product would be 0.5 ** 2000 = 0 for the best class and give 0/0.
    probs = np.tile(np.array([0.2, 0.3, 0.5]), (2000, 1, 1))
    scores = metrics.combine(probs, "prod")
    assert np.all(np.isfinite(scores))
    assert scores[0].argmax() == 2 and scores[0, 2] == pytest.approx(1.0)


def test_max_all_zero_row_becomes_uniform():
    probs = np.zeros((2, 1, 4))
    np.testing.assert_allclose(metrics.combine(probs, "max"), [[0.25] * 4])


def test_combine_accepts_a_list_of_members_and_float32():
    scores = metrics.combine([np.asarray(m, dtype=np.float32) for m in PROBS], "mean")
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, metrics.combine(PROBS, "mean"), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(2, 5),
    st.sampled_from(metrics.CRITERIA),
    st.integers(0, 2**31 - 1),
)
def test_combined_rows_are_distributions(m, n, k, criterion, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=(m, n))
    scores = metrics.combine(probs, criterion)
    assert scores.shape == (n, k)
    assert np.all(scores >= 0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------------ accuracies


def test_accuracy_from_scores_and_from_labels():
    assert metrics.accuracy(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), [1, 1, 1]) == pytest.approx(2 / 3)
    assert metrics.accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])) == 0.75
    # Logits are fine for accuracy.
    assert metrics.accuracy(np.array([[-3.0, 2.0], [1.0, -1.0]]), [1, 0]) == 1.0


def test_member_and_oracle_accuracies():
    np.testing.assert_allclose(metrics.member_accuracies(PROBS, Y), [0.75, 0.5, 0.5])
    # ex0-ex2 member 0 is right, ex3 member 1 is right -> 4/4.
    assert metrics.oracle_accuracy(PROBS, Y) == 1.0
    # With label 2 on ex0, where the members say (0, 0, 1), nobody is right there: 3/4.
    assert metrics.oracle_accuracy(PROBS, [2, 1, 2, 1]) == 0.75


def test_cumulative_accuracy_prod_and_mean():
    # prod of members 0,1: ex0 [.42 .06 .01] ok; ex1 [.02 .12 .18] wrong; ex2 [.15 .12 .04] wrong;
    # ex3 [.10 .28 .01] ok -> .5.  All three: .5 (see PROD_EXPECTED).
    np.testing.assert_allclose(metrics.cumulative_accuracy(PROBS, Y, "prod"), [0.75, 0.5, 0.5])
    # mean of members 0,1 ranks like their sum: ex0 [1.3 .5 .2] ok; ex1 [.3 .8 .9] wrong;
    # ex2 [.8 .7 .5] wrong; ex3 [.7 1.1 .2] ok -> .5.  All three: 1.0.
    np.testing.assert_allclose(metrics.cumulative_accuracy(PROBS, Y, "mean"), [0.75, 0.5, 1.0])


def test_ensemble_effect_by_hand():
    # best member 0.75: mean 1.0 -> +0.25; prod 0.5 -> -0.25; vote 0.75 -> 0; max 0.75 -> 0.
    assert metrics.ensemble_effect(PROBS, Y, "mean") == pytest.approx(0.25)
    assert metrics.ensemble_effect(PROBS, Y, "prod") == pytest.approx(-0.25)
    assert metrics.ensemble_effect(PROBS, Y, "vote") == pytest.approx(0.0)
    assert metrics.ensemble_effect(PROBS, Y, "max") == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------- nll, ece


def test_nll_by_hand():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    # -(log .5 + log .1 + log 1) / 3
    assert metrics.nll(probs, [1, 1, 1]) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 3)
    # A zero true-class probability costs -log(eps).
    assert metrics.nll(probs, [0, 0, 0], eps=1e-6) == pytest.approx(
        -(math.log(0.5) + math.log(0.9) + math.log(1e-6)) / 3
    )


def test_nll_of_the_prod_ensemble_by_hand():
    # True-class probabilities (Y = 0 1 2 1): .042/.091, .084/.122, .024/.078, .084/.118
    expected = -np.mean(np.log([0.042 / 0.091, 0.084 / 0.122, 0.024 / 0.078, 0.084 / 0.118]))
    assert metrics.nll(metrics.combine(PROBS, "prod"), Y) == pytest.approx(expected, rel=1e-12)


def test_ece_two_bins_by_hand_with_right_closed_bins():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
    y = [0, 1, 1, 0]
    # confidences .9 .8 .6 .5, predictions 0 0 1 0 (the .5/.5 tie goes to class 0), correct T F T T.
    # Bin (0, .5]: {ex3}: acc 1, conf .5 -> 1/4 * .5 = .125
    # Bin (.5, 1]: {ex0, ex1, ex2}: acc 2/3, conf 2.3/3 -> 3/4 * |2/3 - 2.3/3| = 3/4 * .1 = .075
    assert metrics.ece(probs, y, n_bins=2) == pytest.approx(0.2)
    # (With left-closed bins everything would share [.5, 1]: |3/4 - 2.8/4| = .05, so this pins (lo, hi].)


def test_ece_one_bin_and_perfect_calibration():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
    # One bin: |3/4 - 2.8/4| = .05
    assert metrics.ece(probs, [0, 1, 1, 0], n_bins=1) == pytest.approx(0.05)
    # Confidence 1 and always right -> 0.
    assert metrics.ece(np.eye(3), [0, 1, 2]) == 0.0


def test_ece_edges_are_compared_as_linspace_computes_them():
    # 0.3 is the right edge of bin 2 of 10; a naive ceil(0.3 * 10) - 1 would put it in bin 3.
    # Put a wrong prediction at confidence .3 and a right one at .35: same bin -> different ECE.
    probs = np.array([[0.3, 0.25, 0.25, 0.2], [0.35, 0.25, 0.2, 0.2]])
    # Separate bins (2 and 3): (|0 - .3| + |1 - .35|) / 2 = .475 ; a shared bin would give |.5 - .325| = .175
    assert metrics.ece(probs, [1, 0], n_bins=10) == pytest.approx(0.475)


# ------------------------------------------------------------------------------------------- autoencoders


def test_mse_and_cumulative_mse_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 1.0]])
    recons = np.array(
        [
            [[1.0, 0.0], [1.0, 1.0]],  # alone: errors 1,0,0,0 -> 1/4
            [[-1.0, 0.0], [1.0, 3.0]],  # mean with member 0: [[0,0],[1,2]] -> errors 0,0,0,1 -> 1/4
            [[0.0, 0.0], [1.0, -2.0]],  # mean of 3: [[0,0],[1,2/3]] -> (1/3)^2 / 4 = 1/36
        ]
    )
    assert metrics.mse(recons[0], x) == pytest.approx(0.25)
    np.testing.assert_allclose(metrics.cumulative_mse(recons, x), [0.25, 0.25, 1 / 36])


# --------------------------------------------------------------------------------- CODE-specific metrics


def test_redundancy_by_hand():
    # Columns (inputs): (0,0,0) U=1; (1,1,2) U=2; (2,1,1) U=2.
    # R = ((3-1) + (3-2) + (3-2)) / (3 * 3) = 4/9
    assert metrics.redundancy(np.array([[0, 1, 2], [0, 1, 1], [0, 2, 1]])) == pytest.approx(4 / 9)
    # The shared example's argmaxes: U = 2, 2, 2, 3 -> (1+1+1+0) / (3*4) = 1/4.
    assert metrics.redundancy(PROBS.argmax(axis=2)) == pytest.approx(0.25)
    # Extremes: always agreeing -> (N-1)/N; always all different -> 0.
    assert metrics.redundancy(np.zeros((4, 5))) == pytest.approx(3 / 4)
    assert metrics.redundancy(np.array([[0, 1], [1, 2], [2, 0]])) == 0.0


def test_memory_footprint_by_hand():
    # (1000 + 4*600 + 400) / (5*1000) = 3800/5000
    assert metrics.memory_footprint(1000, 5, 600, 400, 5) == pytest.approx(0.76)
    # CODE with nothing shared and full-size members equals the baseline.
    assert metrics.memory_footprint(1000, 5, 1000, 0, 5) == 1.0
    assert metrics.memory_footprint(np.int64(10), 1, 0, 0, 2) == 0.5


def test_assignment_table_by_hand():
    losses = np.array(
        [
            [0.1, 2.0, 0.5, 0.3, 1.0],
            [0.4, 0.2, 0.5, 0.9, 1.0],
            [0.9, 0.3, 0.1, 0.3, 1.0],
        ]
    )
    y = [0, 1, 2, 2, 1]
    # Winners: ex0 m0, ex1 m1, ex2 m2, ex3 tie m0/m2 -> m0, ex4 three-way tie -> m0.
    # m0 wins ex0 (c0), ex3 (c2), ex4 (c1); m1 wins ex1 (c1); m2 wins ex2 (c2).
    expected = [[1, 1, 1], [0, 1, 0], [0, 0, 1]]
    table = metrics.assignment_table(losses, y, 3)
    np.testing.assert_array_equal(table, expected)
    assert table.sum() == 5
    # An extra unused class gives an all-zero column.
    np.testing.assert_array_equal(metrics.assignment_table(losses, y, 4)[:, 3], [0, 0, 0])


# ------------------------------------------------------------------------------------------- reports


def test_evaluate_classifier_collects_everything_as_plain_json():
    report = metrics.evaluate_classifier(PROBS, Y, "prod")
    json.dumps(report)  # must not raise
    assert report["criterion"] == "prod"
    assert (report["n_members"], report["n_examples"], report["n_classes"]) == (3, 4, 3)
    assert report["accuracy"] == 0.5
    assert report["member_accuracies"] == [0.75, 0.5, 0.5]
    assert report["best_member_accuracy"] == 0.75
    assert report["oracle_accuracy"] == 1.0
    assert report["ensemble_effect"] == pytest.approx(-0.25)
    assert report["redundancy"] == pytest.approx(0.25)
    assert report["cumulative_accuracy"] == [0.75, 0.5, 0.5]
    assert report["nll"] == pytest.approx(metrics.nll(PROD_EXPECTED, Y))
    assert report["ece"] == pytest.approx(metrics.ece(PROD_EXPECTED, Y))
    for key in ("accuracy", "nll", "ece", "ensemble_effect", "redundancy", "oracle_accuracy"):
        assert type(report[key]) is float


def test_bootstrap_ci_contains_the_point_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    predictions = np.where(rng.random(60) < 0.7, y, (y + 1) % 3)  # about 70 % right
    first = metrics.bootstrap_ci(metrics.accuracy, predictions, y, n_boot=300, seed=7)
    point, low, high = first
    assert point == metrics.accuracy(predictions, y)
    assert low <= point <= high and low < high
    assert metrics.bootstrap_ci(metrics.accuracy, predictions, y, n_boot=300, seed=7) == first
    assert metrics.bootstrap_ci(metrics.accuracy, predictions, y, n_boot=300, seed=8) != first


def test_bootstrap_ci_resamples_member_stacks_along_the_example_axis():
    shapes = []

    def ensemble_accuracy(member_probs, labels):
        shapes.append((member_probs.shape, labels.shape))
        return metrics.accuracy(metrics.combine(member_probs, "mean"), labels)

    point, low, high = metrics.bootstrap_ci(ensemble_accuracy, PROBS, Y, n_boot=50)
    # The mean ensemble is right on every example, so every resample is too.
    assert (point, low, high) == (1.0, 1.0, 1.0)
    assert set(shapes) == {((3, 4, 3), (4,))}


def test_bootstrap_ci_explicit_axes_for_member_losses():
    losses = np.array([[0.1, 0.9, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5]])  # (M, N), not covered by the rule

    def member0_wins(member_losses):
        return float(np.mean(member_losses.argmin(axis=0) == 0))

    point, _, _ = metrics.bootstrap_ci(member0_wins, losses, n_boot=20, axes=[1])
    assert point == 0.5
    with pytest.raises(ShapeError) as error:  # the default rule resamples axis 0 of length 2
        metrics.bootstrap_ci(member0_wins, losses, Y, n_boot=5)
    assert one_line(error)


def test_bootstrap_ci_errors():
    with pytest.raises(ConfigError):
        metrics.bootstrap_ci(metrics.accuracy, Y, Y, n_boot=0)
    with pytest.raises(ConfigError):
        metrics.bootstrap_ci(metrics.accuracy, Y, Y, alpha=1.5)
    with pytest.raises(ConfigError):
        metrics.bootstrap_ci(lambda a: a, Y, n_boot=3)  # returns an array, not a number
    with pytest.raises(ConfigError):
        metrics.bootstrap_ci(metrics.accuracy, Y, Y, axes=[0])
    with pytest.raises(DataError):
        metrics.bootstrap_ci(metrics.accuracy)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error_type",
    [
        (lambda: metrics.combine(PROBS, "median"), ConfigError),
        (lambda: metrics.combine([PROBS[0], PROBS[1][:3]], "mean"), ShapeError),  # different N
        (lambda: metrics.combine([PROBS[0], PROBS[1][:, :2]], "mean"), ShapeError),  # different K
        (lambda: metrics.combine(PROBS[0], "mean"), ShapeError),  # (N, K), not (M, N, K)
        (lambda: metrics.combine(np.zeros((0, 4, 3)), "mean"), DataError),
        (lambda: metrics.combine([], "mean"), DataError),
        (lambda: metrics.combine(np.where(PROBS == 0.7, np.nan, PROBS)), DataError),
        (lambda: metrics.combine(-PROBS), DataError),
        (lambda: metrics.combine(np.array([[["a", "b"]]])), DataError),
        (lambda: metrics.accuracy(PROBS[0], Y[:3]), ShapeError),
        (lambda: metrics.accuracy(PROBS[0], [0, 1, 2, 3]), DataError),  # label 3 with K = 3
        (lambda: metrics.accuracy(PROBS, Y), ShapeError),
        (lambda: metrics.member_accuracies(PROBS, Y[:3]), ShapeError),
        (lambda: metrics.member_accuracies(PROBS, [0, 1, 2, -1]), DataError),
        (lambda: metrics.oracle_accuracy(PROBS, [0.5, 1, 2, 1]), DataError),
        (lambda: metrics.cumulative_accuracy(PROBS, Y, "nope"), ConfigError),
        (lambda: metrics.ensemble_effect(PROBS, np.array([[0, 1, 2, 1]])), ShapeError),
        (lambda: metrics.nll(PROBS[0], Y, eps=0.0), ConfigError),
        (lambda: metrics.nll(np.full((4, 3), np.inf), Y), DataError),
        (lambda: metrics.ece(PROBS[0], Y, n_bins=0), ConfigError),
        (lambda: metrics.ece(np.zeros((0, 3)), []), DataError),
        (lambda: metrics.mse(np.zeros((2, 3)), np.zeros((3, 2))), ShapeError),
        (lambda: metrics.mse(np.zeros(0), np.zeros(0)), DataError),
        (lambda: metrics.cumulative_mse(np.zeros((3, 2, 2)), np.zeros((3, 2))), ShapeError),
        (lambda: metrics.redundancy(np.zeros(5)), ShapeError),
        (lambda: metrics.redundancy(np.zeros((3, 0))), DataError),
        (lambda: metrics.memory_footprint(0, 5, 600, 400, 5), DataError),
        (lambda: metrics.memory_footprint(1000, 5, 600, -1, 5), DataError),
        (lambda: metrics.memory_footprint(1000, 5, 600.5, 400, 5), DataError),
        (lambda: metrics.assignment_table(np.zeros((2, 4)), [0, 1, 2, 3], 3), DataError),
        (lambda: metrics.assignment_table(np.zeros((2, 4)), Y, 0), ConfigError),
        (lambda: metrics.assignment_table(np.zeros(4), Y, 3), ShapeError),
        (lambda: metrics.evaluate_classifier(PROBS, Y[:2]), ShapeError),
    ],
)
def test_bad_input_raises_one_line_codec_errors(call, error_type):
    with pytest.raises(error_type) as error:
        call()
    assert isinstance(error.value, CodecError)
    assert one_line(error)


def test_ragged_members_are_a_shape_error():
    with pytest.raises(ShapeError) as error:
        metrics.combine([[[0.5, 0.5], [1.0]], [[0.5, 0.5], [0.0, 1.0]]], "mean")
    assert one_line(error)
