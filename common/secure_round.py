"""The contract of one secure-aggregation round on Flower messages (no Flower, no torch).

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020; Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017) runs as four message exchanges, one custom action each. Both the
coordinator (``server.secure_aggregation``) and the site (``client.app``) use these names:

- ``train.secagg_setup``: global model + train request + round config; the site trains, keeps
  its update waiting, and advertises its public keys.
- ``train.secagg_share``: neighbours' public keys in, sealed Shamir shares out.
- ``train.secagg_masked``: neighbours' sealed shares in, the masked vector out.
- ``train.secagg_unmask``: survivor/dropped lists in, the requested shares out (and, when the
  request names the next round, the public keys of the site's fresh key pairs for it).

When every sampled site advertised its keys for a round in the unmask reply of the one
before, the round runs in three exchanges: the first request carries the round config, the
task and the neighbours' advertised keys, and the site trains and shares keys in one go:

- ``train.secagg_setup_share``: round config (record ``secagg``) and neighbours' keys (record
  ``secagg_share``) in, sealed Shamir shares out; then masked input and unmask as above.

Federated evaluation sums its counts with the same exchanges as ``evaluate.secagg_*``
messages (:func:`stage_message_type`).

In active-coordinator mode (``common.secagg.active_parameters``) a fifth exchange runs
between masked input and unmask:

- ``train.secagg_consistency``: the survivor set in, the site's signature over it out.

The model update travels as one flat float vector in the state-dict order of the global
arrays (:func:`flatten_update`, :func:`unflatten_update`). Next to it, in the same masked
vector, go the FedAvg weight (the site's public, noisy record count) and the summed metrics
named in :data:`SUMMED_METRICS`, each multiplied by the weight so that their sum over sites
divided by the summed weight is the weighted mean (what plain FedAvg reports). Only metrics
that are functions of the noisy count and the request are summed: the train loss of a site's
private batches is covered by no accountant and is never sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmm.common import site_refusal

ACTION_SETUP = "secagg_setup"
ACTION_SHARE = "secagg_share"
ACTION_MASKED = "secagg_masked"
ACTION_UNMASK = "secagg_unmask"
ACTION_CONSISTENCY = "secagg_consistency"
#: Setup and share keys in one exchange, with keys the sites advertised the round before.
ACTION_SETUP_SHARE = "secagg_setup_share"
MESSAGE_SETUP = f"train.{ACTION_SETUP}"
MESSAGE_SHARE = f"train.{ACTION_SHARE}"
MESSAGE_MASKED = f"train.{ACTION_MASKED}"
MESSAGE_UNMASK = f"train.{ACTION_UNMASK}"
MESSAGE_CONSISTENCY = f"train.{ACTION_CONSISTENCY}"
MESSAGE_SETUP_SHARE = f"train.{ACTION_SETUP_SHARE}"


def stage_message_type(kind: str, action: str) -> str:
    """The message type of one exchange of a sum of ``kind`` (``train``, or ``evaluate`` for
    federated evaluation's counts): ``evaluate.secagg_setup`` and so on."""
    if kind not in ("train", "evaluate"):
        raise ValueError(f"a secure sum runs in train or evaluate messages, not {kind!r}")
    return f"{kind}.{action}"


#: Record names inside the messages' RecordDicts.
RECORD_SECAGG = "secagg"  # ConfigRecord: the protocol payload of the stage
RECORD_MASKED = "masked"  # ArrayRecord: the masked vector (masked-input replies only)
#: ConfigRecord of a ``secagg_setup_share`` request: the share-keys payload, next to the
#: setup payload in ``secagg`` (both carry ``site_ids``, so they travel apart).
RECORD_SECAGG_SHARE = "secagg_share"
RECORD_STATUS = site_refusal.RECORD_STATUS  # ConfigRecord: refused (bool), code (str)
#: MetricRecord of the setup reply: under key "epsilon", the epsilon *bound* the site commits
#: to (the smaller of its policy's max-epsilon and the run's epsilon; a site that replies is
#: within it), never its exact spend, which is a function of its record count.
RECORD_PRIVACY = "privacy"

#: A training reply's metrics (plain FedAvg's MetricRecord; SecAgg+ sums the count as the
#: weight and the steps inside the masked vector): the site's public (noisy) record count,
#: its DP-SGD steps, and its epsilon bound (the same bound as in ``RECORD_PRIVACY``).
METRIC_NUM_EXAMPLES = "num_examples"
METRIC_STEPS = "steps"
METRIC_EPSILON_BOUND = "epsilon_bound"

#: Metrics summed inside the masked vector, each as weight * value.
SUMMED_METRICS = (METRIC_STEPS,)
#: The epsilon bound is reported in the clear, rounded up to this grid.
EPSILON_REPORT_STEP = 0.01


def flatten_update(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """The arrays named by ``keys``, in that order, as one float64 vector."""
    missing = [key for key in keys if key not in arrays]
    if missing or len(arrays) != len(keys):
        raise ValueError(f"update keys differ from the global model's (missing {missing[:3]})")
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[key], dtype=np.float64).reshape(-1) for key in keys])


def unflatten_update(
    vector: np.ndarray, shapes: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_update` for arrays of the given (key, shape) list."""
    sizes = [math.prod(shape) for _, shape in shapes]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"vector has {vector.size} entries, expected {sum(sizes)}")
    out, start = {}, 0
    for (key, shape), size in zip(shapes, sizes, strict=True):
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


def weighted_metrics(*, weight: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """The summed metrics of one site: weight * value of each (weight: its noisy count)."""
    return {name: float(weight * value) for name, value in metrics.items()}


def metric_ranges(*, max_weight: int, max_steps: int) -> dict[str, tuple[float, float]]:
    """Quantisation ranges of the summed metrics (values outside are clipped)."""
    return {METRIC_STEPS: (0.0, float(max_weight) * max(1, max_steps))}


def reported_epsilon(epsilon: float) -> float:
    """A site's epsilon bound as reported in the clear: rounded up to the report grid."""
    if not math.isfinite(epsilon):
        return math.inf
    steps = math.ceil(epsilon / EPSILON_REPORT_STEP - 1e-9)
    # round() drops the float noise of the product (0.7000000000000001 for 70 steps).
    return round(steps * EPSILON_REPORT_STEP, 9)
