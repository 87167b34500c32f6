"""Ensemble-aware losses (Lee et al., "Why M Heads are Better than One", 2015), as functions of logits.

Every loss takes the members' logits stacked as ``(M, B, K)`` (M members, B examples, K classes) and the
labels ``(B,)``, and returns a scalar to minimise with one backward pass over all members:

- ``independent``: the sum over members of each member's mean cross-entropy. Members are coupled only
  through a shared trunk (TreeNets); its gradient is the sum of the members' gradients.
- ``score_avg``: the cross-entropy of the mean of the members' logits (Lee et al.'s "score-averaged").
- ``prob_avg``: the negative log of the mean of the members' softmax probabilities ("probability-averaged").
  Each member's gradient is about 1/M of what independent training gives it, which is why Lee et al.
  multiply SGD's learning rate by M for these two (`--lr-scale-by-members`). Adam normalises gradient
  scale away, so with Adam that option makes each step M times larger instead of compensating.
- ``mcl``: Multiple Choice Learning's set loss with top-k assignment (Guzman-Rivera et al.; Lee et al.'s
  "stochastic MCL"): per example, the k members with the LOWEST cross-entropy on it get its gradient, the
  others none. Ties are broken at random (a seeded `torch.Generator`), so identical members (the same
  initialisation, or full sharing) do not all favour member 0. The loss is
  ``mean_b sum_m mask[m, b] * CE[m, b]``, so with k = M it is exactly the independent loss, values and
  gradients. ``alpha`` mixes in the independent loss: ``(1 - alpha) * MCL + alpha * independent``.

Bagging gives each member its own bootstrap sample; it enters as per-member example weights ``(M, B)``
(how many times the example is in the member's sample), normalised by the batch size, so a weight-1
batch gives the unweighted loss. Weights apply to the losses that score members one by one
(independent, MCL); the score- and probability-averaged losses score the combined output, which has no
per-member example, so `EnsembleLoss` refuses weights for them.

`EnsembleLoss.validation` is the deterministic value of the same objective used for early stopping: for
MCL the sum of the k lowest member losses per example, which does not depend on how ties are broken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codec.errors import ConfigError, ShapeError

LOSSES = ("independent", "score_avg", "prob_avg", "mcl")
# Losses whose value is a function of each member's own output (so per-member example weights apply).
MEMBERWISE_LOSSES = ("independent", "mcl")


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ShapeError(
            f"ensemble logits must be (members, batch, classes), got shape {tuple(logits.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != logits.shape[1]:
        raise ShapeError(f"labels have shape {tuple(labels.shape)} for logits of shape {tuple(logits.shape)}")


def _check_weights(weights: torch.Tensor | None, logits: torch.Tensor) -> None:
    if weights is not None and tuple(weights.shape) != tuple(logits.shape[:2]):
        raise ShapeError(
            f"example weights have shape {tuple(weights.shape)}; want (members, batch) = "
            f"{tuple(logits.shape[:2])}"
        )


def member_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy on each example.

    Args:
        logits: (M, B, K) member logits.
        labels: (B,) integer labels.

    Returns:
        (M, B) losses (differentiable).
    """
    _check(logits, labels)
    m, b, k = logits.shape
    flat = F.cross_entropy(logits.reshape(m * b, k), labels.repeat(m), reduction="none")
    return flat.reshape(m, b)


def independent_ce(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over members of each member's mean cross-entropy (weighted by `weights` (M, B) when given).

    With weights the mean is ``sum_b w[m, b] * CE[m, b] / B``.
    """
    losses = member_losses(logits, labels)
    _check_weights(weights, logits)
    if weights is not None:
        losses = losses * weights
    return losses.sum(dim=0).mean()


def score_averaged_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the members' mean logits (the ensemble's averaged scores), mean over the batch."""
    _check(logits, labels)
    return F.cross_entropy(logits.mean(dim=0), labels)


def probability_averaged_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log(mean_m softmax(logits_m)[y])``, mean over the batch.

    Computed as ``log M - logsumexp_m log_softmax(logits_m)[y]`` so that confident members do not
    underflow the mean probability to 0.
    """
    _check(logits, labels)
    log_probs = F.log_softmax(logits, dim=2)  # (M, B, K)
    true = log_probs.gather(2, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)  # (M, B)
    return (math.log(logits.shape[0]) - torch.logsumexp(true, dim=0)).mean()


def mcl_assignment(losses: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which members get each example's gradient: per column, the k members with the lowest loss.

    Ties are broken at random: members are put in a random order per example (drawn from `generator`)
    and then stably sorted by loss, so among equal losses the random order decides.

    Args:
        losses: (M, B) per-member, per-example losses (not differentiated through).
        k: members per example, 1 <= k <= M.
        generator: the CPU generator of the random tie-breaking order (None: torch's global one).

    Returns:
        (M, B) boolean mask with exactly k True entries per column.
    """
    if losses.ndim != 2:
        raise ShapeError(f"member losses must be (members, batch), got shape {tuple(losses.shape)}")
    m = losses.shape[0]
    _check_k(k, m)
    losses = losses.detach()
    # A random permutation of the members per example: argsort of uniform noise (CPU, so the generator's
    # stream is the same whatever device the losses are on).
    noise = torch.rand(losses.shape, generator=generator)
    order = noise.argsort(dim=0).to(losses.device)
    shuffled = losses.gather(0, order)
    ranked = torch.sort(shuffled, dim=0, stable=True).indices[:k]  # positions in the shuffled order
    winners = order.gather(0, ranked)  # back to member indices
    mask = torch.zeros_like(losses, dtype=torch.bool)
    mask.scatter_(0, winners, True)
    return mask


def mcl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    k: int = 1,
    *,
    alpha: float = 0.0,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MCL set loss with top-k assignment, mixed with the independent loss by `alpha`.

    ``(1 - alpha) * mean_b sum_m mask[m, b] w[m, b] CE[m, b] + alpha * mean_b sum_m w[m, b] CE[m, b]``,
    where mask picks the k lowest-loss members of each example (`mcl_assignment`) and w are the example
    weights (1 without bagging). With k = M the mask is all True and this is `independent_ce`.
    """
    _check_alpha(alpha)
    losses = member_losses(logits, labels)
    _check_weights(weights, logits)
    mask = mcl_assignment(losses, k, generator)
    weighted = losses if weights is None else losses * weights
    set_loss = (weighted * mask).sum(dim=0).mean()
    if alpha == 0:
        return set_loss
    return (1.0 - alpha) * set_loss + alpha * weighted.sum(dim=0).mean()


def oracle_set_loss(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Mean over examples of the sum of the k lowest member losses: MCL's objective without the random
    tie-breaking (equal losses give the same sum whichever member is picked)."""
    losses = member_losses(logits, labels)
    _check_k(k, losses.shape[0])
    return torch.topk(losses, k, dim=0, largest=False).values.sum(dim=0).mean()


def _check_k(k, members: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"MCL k must be an integer, got {k!r}")
    if k < 1:
        raise ConfigError(f"MCL k must be at least 1, got {k}")
    if k > members:
        raise ConfigError(f"MCL k={k} is more than the {members} members (k must be in 1..{members})")


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"alpha (the weight of cross-entropy mixed into MCL) must be in [0, 1], got {alpha!r}"
        )


@dataclass(frozen=True)
class EnsembleLoss:
    """One of `LOSSES` with its options, validated against the number of members.

    Attributes:
        name: "independent", "score_avg", "prob_avg" or "mcl".
        members: M.
        k: MCL's members per example (1..M); ignored by the other losses.
        alpha: MCL's weight of the independent cross-entropy in [0, 1]; ignored by the other losses.
    """

    name: str
    members: int
    k: int = 1
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"unknown ensemble loss {self.name!r}; choose one of {', '.join(LOSSES)}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ConfigError(f"the number of members must be a positive integer, got {self.members!r}")
        if self.name == "mcl":
            _check_k(self.k, self.members)
            _check_alpha(self.alpha)

    @property
    def memberwise(self) -> bool:
        """True when the loss scores members one by one (so per-member example weights apply)."""
        return self.name in MEMBERWISE_LOSSES

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The training loss of a batch (MCL breaks ties with `generator`)."""
        self._check_members(logits)
        if weights is not None and not self.memberwise:
            raise ConfigError(
                f"the {self.name} loss scores the combined output, so per-member example weights (bagging) "
                "cannot apply; use --variation random with it"
            )
        if self.name == "independent":
            return independent_ce(logits, labels, weights)
        if self.name == "score_avg":
            return score_averaged_ce(logits, labels)
        if self.name == "prob_avg":
            return probability_averaged_nll(logits, labels)
        return mcl_loss(logits, labels, self.k, alpha=self.alpha, weights=weights, generator=generator)

    def validation(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same objective, deterministic and unweighted (for early stopping on held-out data)."""
        self._check_members(logits)
        if self.name != "mcl":
            return self(logits, labels)
        set_loss = oracle_set_loss(logits, labels, self.k)
        if self.alpha == 0:
            return set_loss
        return (1.0 - self.alpha) * set_loss + self.alpha * independent_ce(logits, labels)

    def _check_members(self, logits: torch.Tensor) -> None:
        if logits.ndim != 3 or logits.shape[0] != self.members:
            raise ShapeError(
                f"the {self.name} loss is for {self.members} members, got logits of shape "
                f"{tuple(logits.shape)}"
            )

    def to_dict(self) -> dict:
        """Plain values for reports (k and alpha only where they mean something)."""
        out: dict = {"name": self.name, "members": self.members}
        if self.name == "mcl":
            out.update(k=self.k, alpha=self.alpha)
        return out


__all__ = [
    "LOSSES",
    "MEMBERWISE_LOSSES",
    "EnsembleLoss",
    "independent_ce",
    "mcl_assignment",
    "mcl_loss",
    "member_losses",
    "oracle_set_loss",
    "probability_averaged_nll",
    "score_averaged_ce",
]
