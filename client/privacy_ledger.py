"""The site's privacy ledger: what it has spent, kept across rounds (and runs).

The ledger holds the RDP accountant's history (noise multiplier, sample rate, steps per
entry) and the noise multiplier calibrated at the site's first round, so epsilon is
cumulative: it is recomputed from the whole history every time, never reset per round.
It lives in ``context.state`` and, when the site names a ledger file, on disk as JSON; a
ledger file is locked (``fcntl.flock`` on ``<file>.lock``) from load to save
(:func:`ledger_file_session`), so two handler processes cannot both spend one state.
The accountant is Opacus' RDP accountant (Mironov, CSF 2017; Mironov, Talwar, Zhang 2019
for the sampled Gaussian mechanism) over the orders :data:`RDP_ORDERS`: Opacus' default
orders, which stop at 63, and larger ones up to 1024. Epsilon is the minimum over the orders
of the RDP-to-DP conversion, so more orders can only lower it, never raise it; a noisy count
alone, or the first rounds of a run, have their optimal order above 63 (Opacus then warns
"Optimal order is the largest alpha" and over-reports).

The noisy record count of a run (``client.record_count``: n + N(0, sigma_c^2), the only form
in which a site releases its count) is kept with the run (``noisy_count``) and charged once
per run as the entry (sigma_c, 1.0, 1) of ``history``: the Gaussian mechanism of L2
sensitivity 1 has exactly the RDP of a sampled Gaussian step with q = 1 and multiplier
sigma_c (Mironov 2017, Prop. 7).

Distributed-DP rounds (``dp-mode = "distributed"``) are kept apart in
``distributed_history``: (Skellam variance the site assumes is in the sum, L1 and L2
sensitivity, sample rate, rounds). Their RDP is that of the Poisson-subsampled Skellam
mechanism (``common.distributed_dp.accounting``); when a ledger holds both kinds, the RDP of
both is added at integer orders and converted once, so the lifetime epsilon covers every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord

LEDGER_KEY = "privacy-ledger"
ACCOUNTANT = "rdp"
#: RDP orders of the site's accountant: Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (1.1 to 10.9
#: by 0.1, then 12 to 63), then sparser orders to 1024 (each integer order costs Opacus a sum
#: of that many terms, so the high ones are spaced out).
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024),
)


@dataclass
class PrivacyLedger:
    """``history`` is the site's lifetime spend (every run); ``run_id``, ``rounds``,
    ``noise_multiplier`` and ``noisy_count`` belong to the current run and are reset when a
    new run starts. ``count_releases`` counts the noisy counts charged in ``history``."""

    noise_multiplier: float | None = None
    delta: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    run_id: int = 0
    #: (variance, l1, l2, sample rate, rounds) of distributed-DP rounds (Skellam accountant).
    distributed_history: list[tuple[float, float, float, float, int]] = field(default_factory=list)
    #: The trust assumption of the latest distributed-DP round: honest sites assumed.
    distributed_honest_sites: int = 0
    #: This run's noisy record count (drawn once per run, charged in ``history``).
    noisy_count: float | None = None
    #: How many noisy counts ``history`` charges (one per run that drew one).
    count_releases: int = 0
    #: Where the current run's entries begin in ``history`` and ``distributed_history``:
    #: the run's own budget covers those, the site's lifetime budget covers all.
    run_start: int = 0
    run_distributed_start: int = 0

    def knows_run(self, run_id: int) -> bool:
        """Whether this ledger holds state of run ``run_id`` (a round, a count or a sigma)."""
        return self.run_id == run_id and bool(
            self.rounds or self.noisy_count is not None or self.noise_multiplier is not None
        )

    def start_run(self, run_id: int) -> None:
        """Enter ``run_id``: a new run gets its own calibration, round list and count."""
        if run_id != self.run_id:
            self.run_id, self.noise_multiplier, self.rounds = run_id, None, []
            self.noisy_count = None
            self.run_start = len(self.history)
            self.run_distributed_start = len(self.distributed_history)

    def projected(self) -> PrivacyLedger:
        """A copy to add planned entries to (the run markers kept), for budget checks."""
        return dataclasses.replace(
            self,
            history=list(self.history),
            rounds=list(self.rounds),
            distributed_history=list(self.distributed_history),
        )

    def this_run(self) -> PrivacyLedger:
        """A ledger of the current run's entries only (what the run's own budget covers)."""
        return PrivacyLedger(
            delta=self.delta,
            history=list(self.history[self.run_start :]),
            distributed_history=list(self.distributed_history[self.run_distributed_start :]),
        )

    def budget_delta(self, policy_delta: float) -> float:
        """The delta budgets are checked at: the smaller of the ledger's and the policy's."""
        return policy_delta if self.delta is None else min(self.delta, policy_delta)

    def charge_noisy_count(self, noisy_count: float, *, count_noise: float) -> None:
        """Keep this run's noisy count and charge its Gaussian mechanism (sensitivity 1)."""
        self.noisy_count = float(noisy_count)
        self.history.append(count_charge(count_noise))
        self.count_releases += 1

    def epsilon(self, delta: float | None = None) -> float:
        return self.epsilon_with([], delta)

    def epsilon_with(
        self, steps: list[tuple[float, float, int]], delta: float | None = None
    ) -> float:
        """Lifetime epsilon if the sampled-Gaussian ``steps`` were added to the ledger."""
        delta = delta if delta is not None else self.delta or 1e-5
        history = [*self.history, *steps]
        if not self.distributed_history:
            return epsilon_of(history, delta)
        return combined_epsilon(history, self.distributed_history, delta)

    def describe(self, delta: float | None = None) -> str:
        """What the ledger holds, in plain words (written into the ledger file)."""
        delta = delta if delta is not None else self.delta or 1e-5
        if not self.history and not self.distributed_history:
            return "nothing spent yet"
        parts = []
        if self.count_releases:
            parts.append(
                f"{self.count_releases} noisy record count(s) (Gaussian mechanism, sensitivity 1)"
            )
        steps = sum(n for _, _, n in self.history) - self.count_releases
        if steps > 0:
            parts.append(
                f"{steps} site-local DP-SGD steps (record-level DP for this site's records; "
                "RDP accountant of the sampled Gaussian mechanism)"
            )
        if self.distributed_history:
            rounds = sum(int(entry[4]) for entry in self.distributed_history)
            parts.append(
                f"{rounds} distributed-DP rounds (one DP-SGD step on the union of the sites' "
                "records each; record-level DP across the federation; RDP of the "
                "Poisson-subsampled Skellam mechanism; trust: at least "
                f"{self.distributed_honest_sites} honest sites' noise shares in every sum "
                "and SecAgg+ revealing only the sum)"
            )
        return (
            f"epsilon {self.epsilon(delta):.4f} at delta {delta:g} spent over "
            + " and ".join(parts)
            + ", composed by adding RDP"
        )

    def add_distributed_round(
        self, entry: tuple[float, float, float, float, int], *, honest_sites: int
    ) -> None:
        """Record distributed-DP rounds; repeats of the same mechanism share one entry."""
        variance, l1, l2, rate, steps = entry
        # Merge only within the current run, so the run's entries stay apart from earlier ones.
        in_run = len(self.distributed_history) > self.run_distributed_start
        last = self.distributed_history[-1] if in_run else None
        if last is not None and tuple(last[:4]) == (variance, l1, l2, rate):
            self.distributed_history[-1] = (variance, l1, l2, rate, int(last[4]) + int(steps))
        else:
            self.distributed_history.append((variance, l1, l2, rate, int(steps)))
        self.distributed_honest_sites = honest_sites

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "noise-multiplier": -1.0
                if self.noise_multiplier is None
                else self.noise_multiplier,
                "delta": -1.0 if self.delta is None else self.delta,
                "sigmas": [float(s) for s, _, _ in self.history],
                "sample-rates": [float(q) for _, q, _ in self.history],
                "steps": [int(n) for _, _, n in self.history],
                "rounds": list(self.rounds),
                "run-id": str(self.run_id),  # uint64 run ids do not fit a signed int
                "ddp-variances": [float(e[0]) for e in self.distributed_history],
                "ddp-l1": [float(e[1]) for e in self.distributed_history],
                "ddp-l2": [float(e[2]) for e in self.distributed_history],
                "ddp-sample-rates": [float(e[3]) for e in self.distributed_history],
                "ddp-steps": [int(e[4]) for e in self.distributed_history],
                "ddp-honest-sites": self.distributed_honest_sites,
                # a list: empty when no count was drawn (a noisy count may be negative)
                "noisy-count": [] if self.noisy_count is None else [float(self.noisy_count)],
                "count-releases": self.count_releases,
                "run-start": self.run_start,
                "run-distributed-start": self.run_distributed_start,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        sigma, delta = float(record["noise-multiplier"]), float(record["delta"])
        noisy = [float(v) for v in record.get("noisy-count", [])]  # type: ignore[union-attr]
        history = list(
            zip(record["sigmas"], record["sample-rates"], record["steps"], strict=True)  # type: ignore[arg-type]
        )
        return cls(
            noise_multiplier=None if sigma < 0 else sigma,
            delta=None if delta < 0 else delta,
            history=[(float(s), float(q), int(n)) for s, q, n in history],
            rounds=[int(r) for r in record["rounds"]],  # type: ignore[union-attr]
            run_id=int(str(record.get("run-id", "0"))),
            distributed_history=[
                (float(v), float(a), float(b), float(q), int(n))
                for v, a, b, q, n in zip(
                    record.get("ddp-variances", []),  # type: ignore[arg-type]
                    record.get("ddp-l1", []),  # type: ignore[arg-type]
                    record.get("ddp-l2", []),  # type: ignore[arg-type]
                    record.get("ddp-sample-rates", []),  # type: ignore[arg-type]
                    record.get("ddp-steps", []),  # type: ignore[arg-type]
                    strict=True,
                )
            ],
            distributed_honest_sites=int(record.get("ddp-honest-sites", 0)),  # type: ignore[arg-type]
            noisy_count=noisy[0] if noisy else None,
            count_releases=int(record.get("count-releases", 0)),  # type: ignore[arg-type]
            run_start=int(record.get("run-start", 0)),  # type: ignore[arg-type]
            run_distributed_start=int(record.get("run-distributed-start", 0)),  # type: ignore[arg-type]
        )

    def save(self, path: Path) -> None:
        """Write atomically, owner-only permissions."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when a stale tmp file had looser permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self) | {"statement": self.describe()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            noise_multiplier=data["noise_multiplier"],
            delta=data["delta"],
            history=[(float(s), float(q), int(n)) for s, q, n in data["history"]],
            rounds=[int(r) for r in data["rounds"]],
            run_id=int(data.get("run_id", 0)),
            distributed_history=[
                (float(v), float(a), float(b), float(q), int(n))
                for v, a, b, q, n in data.get("distributed_history", [])
            ],
            distributed_honest_sites=int(data.get("distributed_honest_sites", 0)),
            noisy_count=data.get("noisy_count"),
            count_releases=int(data.get("count_releases", 0)),
            # Ledgers written before runs were told apart: the whole history is the run's.
            run_start=int(data.get("run_start", 0)),
            run_distributed_start=int(data.get("run_distributed_start", 0)),
        )


@contextlib.contextmanager
def ledger_file_session(path: Path) -> Iterator[PrivacyLedger]:
    """The ledger in ``path``, with an exclusive lock held until the block ends.

    Load, decide, train and save inside one ``with`` block: a second process that opens the
    same ledger waits until the first has saved, so it never trains on a stale state. The
    lock is ``fcntl.flock`` on ``<path>.lock`` (the ledger itself is replaced atomically on
    save, so its own inode cannot carry the lock); the kernel releases it if the process
    dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield PrivacyLedger.load(path)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def count_charge(count_noise: float) -> tuple[float, float, int]:
    """The history entry of one noisy count: Gaussian noise of standard deviation
    ``count_noise`` on a count of sensitivity 1 (add/remove one record)."""
    if not (math.isfinite(count_noise) and count_noise > 0):
        raise ValueError(f"count noise must be finite and > 0, got {count_noise}")
    return (float(count_noise), 1.0, 1)


def is_count_charge(entry: tuple[float, float, int]) -> bool:
    """Whether a history entry is a noisy-count release (sampling rate 1), not DP-SGD steps."""
    return float(entry[1]) == 1.0


def dp_sgd_history(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The DP-SGD entries of a history (what reports call the site's steps)."""
    return [entry for entry in history if not is_count_charge(entry)]


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of sampled-Gaussian steps under the RDP accountant: exactly what
    Opacus' ``RDPAccountant`` over :data:`RDP_ORDERS` gives (its ``compute_rdp`` of an entry
    is one step's RDP times the steps, summed over the entries, then ``get_privacy_spent``),
    with one step's RDP at each (sigma, q) computed once per process
    (:func:`step_rdp`): at orders up to 1024 that computation, repeated at every round's
    ledger check, was about a tenth of a site's round."""
    if not history:
        return 0.0
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(np.asarray(step_rdp(sigma, rate)) * steps for sigma, rate, steps in history)
    epsilon, _order = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


@lru_cache(maxsize=1024)
def step_rdp(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """One sampled-Gaussian step's RDP at :data:`RDP_ORDERS` (Opacus' ``compute_rdp``)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(value) for value in rdp)


def combined_epsilon(
    history: list[tuple[float, float, int]],
    distributed_history: list[tuple[float, float, float, float, int]],
    delta: float,
) -> float:
    """Epsilon of sampled-Gaussian steps and distributed-DP (Skellam) rounds together: RDP
    added at integer orders (Mironov 2017, composition) and converted once."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedmm.common.distributed_dp.accounting import (
        RDP_ORDERS,
        SkellamRound,
        epsilon_from_rdp,
        rounds_rdp,
    )

    rdp = rounds_rdp([SkellamRound(*entry) for entry in distributed_history])
    for sigma, rate, steps in history:
        rdp = rdp + np.asarray(
            compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
        )
    return epsilon_from_rdp(rdp, RDP_ORDERS, delta)


def calibrate_noise_multiplier(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    spent: PrivacyLedger | None = None,
    relative_tolerance: float = 1e-3,
) -> float:
    """The smallest sigma (to ``relative_tolerance``) such that the ledger ``spent`` (every
    entry of both kinds) followed by ``steps`` steps at ``sample_rate`` stays within
    ``epsilon`` (RDP composition, converted once). Raises ``ValueError`` when no sigma up
    to 1e4 does (the budget is spent)."""
    if not math.isfinite(epsilon):
        return 0.0
    ledger = spent or PrivacyLedger()
    return smallest_noise_multiplier(
        lambda sigma: ledger.epsilon_with([(sigma, sample_rate, steps)], delta),
        epsilon=epsilon,
        relative_tolerance=relative_tolerance,
        spent_by="the ledger",
    )


def smallest_noise_multiplier(
    total: Callable[[float], float],
    *,
    epsilon: float,
    relative_tolerance: float,
    spent_by: str,
) -> float:
    """The smallest sigma (to ``relative_tolerance``) with ``total(sigma) <= epsilon``, for
    a ``total`` epsilon that falls as sigma grows: doubling, then bisection. Raises
    ``ValueError`` naming ``spent_by`` when no sigma up to 1e4 does."""
    low, high = 0.0, 1.0
    while total(high) > epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"epsilon {epsilon:g} cannot be met: {spent_by} has spent it")
    while (high - low) > relative_tolerance * high:
        middle = (low + high) / 2
        if total(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high
