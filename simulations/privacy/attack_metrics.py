"""ROC curve, AUC and true-positive rate at a fixed false-positive rate of a membership
inference attack.

Carlini et al., "Membership Inference Attacks From First Principles" (LiRA, IEEE S&P 2022),
argue that an attack is to be judged by its true-positive rate at low false-positive rates
(0.1%, 1%), not by AUC or balanced accuracy alone: an attack that identifies a few records
with certainty is a real breach even when its AUC is near 0.5. Both are reported here.
Scores are "higher means more likely a member"; the curve sweeps one global threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RocCurve:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    num_members: int
    num_non_members: int

    def tpr_at_fpr(self, max_fpr: float) -> float:
        """The largest TPR reached at a threshold whose FPR is at most ``max_fpr``.

        With N non-members the smallest non-zero FPR is 1/N: below that only thresholds
        that flag no non-member at all count (LiRA's convention).
        """
        if not 0.0 <= max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
        return float(self.tpr[self.fpr <= max_fpr].max())

    def auc(self) -> float:
        """Area under the curve (trapezoid rule; ties count one half)."""
        return float(np.trapezoid(self.tpr, self.fpr))


def _checked(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member)
    if scores.ndim != 1 or scores.shape != is_member.shape:
        raise ValueError(
            f"scores and is_member must be 1-D of the same length, got {scores.shape} and "
            f"{is_member.shape}"
        )
    if is_member.dtype != np.bool_:
        raise ValueError(f"is_member must be boolean, got {is_member.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (a NaN or inf score has no rank)")
    if is_member.all() or not is_member.any():
        raise ValueError("an ROC curve needs at least one member and one non-member")
    return scores, is_member


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> RocCurve:
    """The ROC curve of the attack that says "member" when the score is at least a threshold."""
    scores, is_member = _checked(scores, is_member)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_members = scores[order], is_member[order]
    # one point per distinct threshold: the last position of each run of equal scores
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_pos = np.cumsum(sorted_members)[last_of_tie]
    false_pos = np.cumsum(~sorted_members)[last_of_tie]
    num_members, num_non = int(is_member.sum()), int((~is_member).sum())
    return RocCurve(
        fpr=np.r_[0.0, false_pos / num_non],
        tpr=np.r_[0.0, true_pos / num_members],
        num_members=num_members,
        num_non_members=num_non,
    )


@dataclass(frozen=True)
class AttackSummary:
    """What the privacy report states about one attack on one model."""

    attack: str
    auc: float
    tpr_at_0_1_fpr: float
    tpr_at_1_fpr: float
    num_members: int
    num_non_members: int

    @classmethod
    def of(cls, attack: str, curve: RocCurve) -> AttackSummary:
        return cls(
            attack=attack,
            auc=curve.auc(),
            tpr_at_0_1_fpr=curve.tpr_at_fpr(0.001),
            tpr_at_1_fpr=curve.tpr_at_fpr(0.01),
            num_members=curve.num_members,
            num_non_members=curve.num_non_members,
        )
