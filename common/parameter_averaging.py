"""Exponential moving average of a model's parameters over training steps or rounds.

Averaging the iterates of DP-SGD is post-processing of the released (noised) models, so it
costs no privacy, and it averages out part of the noise of the last steps: De et al.,
"Unlocking High-Accuracy Differentially Private Image Classification through Scale" (2022),
section 3.3, use an EMA of the parameters for all their results. The decay warms up as in
their reference code and TensorFlow's ``ExponentialMovingAverage(num_updates=...)``:
``min(decay, (1 + t) / (10 + t))`` at step ``t``, so the first iterates are not held for long.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def warmed_up_decay(decay: float, step: int) -> float:
    """The decay used at ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"averaging decay must be in [0, 1), got {decay}")
    return min(decay, (1.0 + step) / (10.0 + step))


def average_parameters(
    averaged: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    *,
    decay: float,
    step: int,
) -> dict[str, torch.Tensor]:
    """The average after ``step``: ``d * averaged + (1 - d) * current`` for floating-point
    entries (``d`` = ``warmed_up_decay``), ``current`` as it is for the others (counters,
    integer buffers). ``decay`` 0 returns copies of ``current``."""
    d = warmed_up_decay(decay, step)
    out = {}
    for name, value in current.items():
        if d == 0.0 or not value.is_floating_point():
            out[name] = value.detach().clone()
        else:
            out[name] = d * averaged[name] + (1.0 - d) * value.detach()
    return out
