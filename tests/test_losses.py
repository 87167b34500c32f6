"""Ensemble-aware losses against hand computations: MCL assignment, k = M, score/probability averaging,
ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codec.errors import ConfigError, ShapeError
from codec.runtime.training.losses import (
    EnsembleLoss,
    independent_ce,
    mcl_assignment,
    mcl_loss,
    member_losses,
    oracle_set_loss,
    probability_averaged_nll,
    score_averaged_ce,
)


def _ce(logits_row: np.ndarray, label: int) -> float:
    """Cross-entropy of one example by hand (float64)."""
    z = logits_row.astype(np.float64)
    return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label])


def _random_logits(seed: int, m: int = 4, b: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, b, k, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (b,), generator=generator)
    return logits, labels


# Hand-built: 3 members, 4 examples, 3 classes. A member is confident and right (+4 on the label), unsure
# (all 0) or confident and wrong (+4 on another class), so the per-example loss order is known.
RIGHT, UNSURE, WRONG = 0, 1, 2


def _hand_logits():
    labels = torch.tensor([0, 1, 2, 0])
    kinds = [  # kinds[m][b]
        [RIGHT, WRONG, UNSURE, WRONG],
        [UNSURE, RIGHT, WRONG, UNSURE],
        [WRONG, UNSURE, RIGHT, RIGHT],
    ]
    logits = torch.zeros(3, 4, 3, dtype=torch.float64)
    for m in range(3):
        for b in range(4):
            label = int(labels[b])
            if kinds[m][b] == RIGHT:
                logits[m, b, label] = 4.0
            elif kinds[m][b] == WRONG:
                logits[m, b, (label + 1) % 3] = 4.0
    return logits, labels, np.array(kinds)


def test_member_losses_are_each_members_cross_entropy():
    logits, labels = _random_logits(0)
    losses = member_losses(logits, labels).numpy()
    expected = [[_ce(logits[m, b].numpy(), int(labels[b])) for b in range(6)] for m in range(4)]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)


def test_mcl_k1_gives_each_example_to_the_lowest_loss_member():
    logits, labels, kinds = _hand_logits()
    losses = member_losses(logits, labels)
    mask = mcl_assignment(losses, 1, torch.Generator().manual_seed(0))
    # The member that is right on each example wins it; the confidently wrong one never does.
    assert mask.tolist() == (kinds == RIGHT).tolist()
    assert not mask[torch.from_numpy(kinds == WRONG)].any()

    logits.requires_grad_(True)
    loss = mcl_loss(logits, labels, 1, generator=torch.Generator().manual_seed(0))
    expected = np.mean(
        [min(_ce(logits[m, b].detach().numpy(), int(labels[b])) for m in range(3)) for b in range(4)]
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    has_gradient = logits.grad.abs().sum(dim=2) > 0
    assert has_gradient.tolist() == (kinds == RIGHT).tolist()  # only the winners are trained on an example


def test_mcl_k2_trains_the_two_lowest_and_never_the_highest():
    logits, labels, kinds = _hand_logits()
    mask = mcl_assignment(member_losses(logits, labels), 2, torch.Generator().manual_seed(1))
    assert mask.sum(dim=0).tolist() == [2, 2, 2, 2]
    assert mask.tolist() == (kinds != WRONG).tolist()
    # The set loss is the sum of the two lowest losses per example, averaged over examples.
    per_example = np.sort(member_losses(logits, labels).numpy(), axis=0)[:2].sum(axis=0)
    value = mcl_loss(logits, labels, 2, generator=torch.Generator().manual_seed(1))
    assert float(value) == pytest.approx(per_example.mean(), rel=1e-12)
    assert float(oracle_set_loss(logits, labels, 2)) == pytest.approx(per_example.mean(), rel=1e-12)


def test_mcl_with_k_equal_to_m_is_independent_cross_entropy_values_and_gradients():
    for seed in range(3):
        logits, labels = _random_logits(seed)
        weights = torch.from_numpy(np.random.default_rng(seed).integers(0, 3, (4, 6)).astype(np.float64))
        for w in (None, weights):
            a = logits.clone().requires_grad_(True)
            b = logits.clone().requires_grad_(True)
            mcl = mcl_loss(a, labels, 4, weights=w, generator=torch.Generator().manual_seed(seed))
            independent = independent_ce(b, labels, w)
            assert float(mcl.detach()) == float(independent.detach())
            mcl.backward()
            independent.backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_independent_ce_is_the_sum_over_members_of_mean_cross_entropy():
    logits, labels = _random_logits(4)
    per = np.array([[_ce(logits[m, b].numpy(), int(labels[b])) for b in range(6)] for m in range(4)])
    assert float(independent_ce(logits, labels)) == pytest.approx(per.mean(axis=1).sum(), rel=1e-12)
    weights = np.random.default_rng(0).integers(0, 4, (4, 6)).astype(np.float64)
    # bagging: sum_b w * CE / B per member
    expected = (weights * per).sum(axis=1).sum() / 6
    assert float(independent_ce(logits, labels, torch.from_numpy(weights))) == pytest.approx(
        expected, rel=1e-12
    )


def test_score_and_probability_averaged_losses_match_hand_formulas():
    logits, labels = _random_logits(5)
    z = logits.numpy()
    y = labels.numpy()
    mean_scores = z.mean(axis=0)
    score = np.mean([_ce(mean_scores[b], int(y[b])) for b in range(len(y))])
    assert float(score_averaged_ce(logits, labels)) == pytest.approx(score, rel=1e-12)
    probs = np.exp(z - z.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    prob = -np.mean(np.log(probs.mean(axis=0)[np.arange(len(y)), y]))
    assert float(probability_averaged_nll(logits, labels)) == pytest.approx(prob, rel=1e-12)
    # The two differ from each other and from the independent loss (they combine before scoring).
    assert abs(score - prob) > 1e-3


def test_probability_averaged_loss_is_finite_for_confident_members():
    logits = torch.tensor([[[200.0, -200.0]], [[-200.0, 200.0]]])  # each member sure of a different class
    value = probability_averaged_nll(logits, torch.tensor([0]))
    assert float(value) == pytest.approx(math.log(2), rel=1e-6)  # mean probability 1/2 on the label


def test_single_member_losses_coincide():
    logits, labels = _random_logits(6, m=1)
    reference = float(independent_ce(logits, labels))
    assert float(score_averaged_ce(logits, labels)) == pytest.approx(reference, rel=1e-12)
    assert float(probability_averaged_nll(logits, labels)) == pytest.approx(reference, rel=1e-12)
    assert float(mcl_loss(logits, labels, 1)) == pytest.approx(reference, rel=1e-12)


def test_ties_are_broken_at_random_but_reproducibly():
    equal = torch.zeros(4, 2000)  # every member has the same loss on every example
    first = mcl_assignment(equal, 1, torch.Generator().manual_seed(7))
    again = mcl_assignment(equal, 1, torch.Generator().manual_seed(7))
    other = mcl_assignment(equal, 1, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    wins = first.sum(dim=1).numpy()
    assert wins.sum() == 2000
    assert np.all(np.abs(wins - 500) < 100)  # spread over the members, not always member 0
    # Ties only among the lowest: a strictly lower member always wins, whatever the random order.
    losses = torch.ones(4, 500)
    losses[2] = 0.5
    assert mcl_assignment(losses, 1, torch.Generator().manual_seed(3))[2].all()
    # With k = 2 the second place is drawn among the tied members.
    second = mcl_assignment(losses, 2, torch.Generator().manual_seed(3))
    assert second[2].all() and second.sum(dim=0).eq(2).all() and second[[0, 1, 3]].sum(dim=1).min() > 100


def test_alpha_mixes_mcl_with_independent_cross_entropy():
    logits, labels = _random_logits(9)
    independent = float(independent_ce(logits, labels))
    pure = float(oracle_set_loss(logits, labels, 1))
    assert float(mcl_loss(logits, labels, 1, alpha=1.0)) == pytest.approx(independent, rel=1e-12)
    assert float(mcl_loss(logits, labels, 1, alpha=0.25)) == pytest.approx(
        0.75 * pure + 0.25 * independent, rel=1e-12
    )
    loss = EnsembleLoss("mcl", 4, k=1, alpha=0.25)
    assert float(loss.validation(logits, labels)) == pytest.approx(
        0.75 * pure + 0.25 * independent, rel=1e-12
    )


def test_ensemble_loss_dispatch_and_validation_value():
    logits, labels = _random_logits(10)
    assert float(EnsembleLoss("independent", 4)(logits, labels)) == float(independent_ce(logits, labels))
    assert float(EnsembleLoss("score_avg", 4)(logits, labels)) == float(score_averaged_ce(logits, labels))
    assert float(EnsembleLoss("prob_avg", 4)(logits, labels)) == float(
        probability_averaged_nll(logits, labels)
    )
    mcl = EnsembleLoss("mcl", 4, k=2)
    assert float(mcl.validation(logits, labels)) == float(oracle_set_loss(logits, labels, 2))
    assert mcl.memberwise and not EnsembleLoss("prob_avg", 4).memberwise
    assert mcl.to_dict() == {"name": "mcl", "members": 4, "k": 2, "alpha": 0.0}


def test_bad_options_raise_one_line_errors():
    with pytest.raises(ConfigError, match="unknown ensemble loss 'foo'"):
        EnsembleLoss("foo", 3)
    with pytest.raises(ConfigError, match="k=4 is more than the 3 members"):
        EnsembleLoss("mcl", 3, k=4)
    with pytest.raises(ConfigError, match="at least 1"):
        EnsembleLoss("mcl", 3, k=0)
    with pytest.raises(ConfigError, match="alpha"):
        EnsembleLoss("mcl", 3, alpha=1.5)
    logits, labels = _random_logits(11, m=3)
    with pytest.raises(ConfigError, match="bagging"):
        EnsembleLoss("score_avg", 3)(logits, labels, torch.ones(3, 6, dtype=torch.float64))
    with pytest.raises(ShapeError, match="for 2 members"):
        EnsembleLoss("independent", 2)(logits, labels)
    with pytest.raises(ShapeError, match="example weights"):
        independent_ce(logits, labels, torch.ones(3, 5))
    with pytest.raises(ShapeError, match="members, batch, classes"):
        member_losses(logits[0], labels)
