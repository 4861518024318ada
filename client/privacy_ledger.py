"""The site's privacy ledger: what it has spent, kept across rounds (and runs).

The ledger holds the RDP accountant's history (noise multiplier, sample rate, steps per
entry) and the noise multiplier calibrated at the site's first round, so epsilon is
cumulative: it is recomputed from the whole history every time, never reset per round.
It lives in ``context.state`` and, when the site names a ledger file, on disk as JSON.
The accountant is Opacus' RDP accountant (Mironov, CSF 2017; Mironov, Talwar, Zhang 2019
for the sampled Gaussian mechanism).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord

LEDGER_KEY = "privacy-ledger"
ACCOUNTANT = "rdp"


@dataclass
class PrivacyLedger:
    """``history`` is the site's lifetime spend (every run); ``run_id``, ``rounds`` and
    ``noise_multiplier`` belong to the current run and are reset when a new run starts."""

    noise_multiplier: float | None = None
    delta: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    run_id: int = 0

    def start_run(self, run_id: int) -> None:
        """Enter ``run_id``: a new run gets its own calibration and round list."""
        if run_id != self.run_id:
            self.run_id, self.noise_multiplier, self.rounds = run_id, None, []

    def epsilon(self, delta: float | None = None) -> float:
        return epsilon_of(self.history, delta if delta is not None else self.delta or 1e-5)

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
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        sigma, delta = float(record["noise-multiplier"]), float(record["delta"])
        history = list(
            zip(record["sigmas"], record["sample-rates"], record["steps"], strict=True)  # type: ignore[arg-type]
        )
        return cls(
            noise_multiplier=None if sigma < 0 else sigma,
            delta=None if delta < 0 else delta,
            history=[(float(s), float(q), int(n)) for s, q, n in history],
            rounds=[int(r) for r in record["rounds"]],  # type: ignore[union-attr]
            run_id=int(str(record.get("run-id", "0"))),
        )

    def save(self, path: Path) -> None:
        """Write atomically, owner-only permissions."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when a stale tmp file had looser permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle)
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
        )


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of sampled-Gaussian steps under the RDP accountant."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Sigma such that ``steps`` steps at ``sample_rate`` spend at most ``epsilon``."""
    if not math.isfinite(epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=ACCOUNTANT,
        )
    )
