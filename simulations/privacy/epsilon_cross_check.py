"""Every epsilon in the privacy report, recomputed with Google's ``dp-accounting``.

A site's epsilon is record-level (epsilon, delta)-DP for that site's records over the whole
run, from its privacy ledger (``client.privacy_ledger``): the history of (noise multiplier,
Poisson sample rate, steps) of its DP-SGD, accounted with Opacus' RDP accountant. Here the
same history is composed as ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` in
``dp_accounting``'s own RDP accountant, twice: with the ledger's orders
(``client.privacy_ledger.RDP_ORDERS``; the two must agree within ``RTOL``) and with
``dp_accounting``'s default orders (the reported epsilon must not be smaller than that one
by more than ``RTOL``: a grid of orders that misses the optimum can only over-report). Its
PLD accountant's epsilon, a tighter bound for the same mechanism, is reported beside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.client.privacy_ledger import dp_sgd_history, epsilon_of

RTOL = 0.01


class EpsilonMismatchError(RuntimeError):
    """The two accountants disagree on a site's epsilon."""


@dataclass(frozen=True)
class SiteEpsilon:
    """One site's epsilon at ``delta`` by three accountants."""

    site: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    opacus_rdp: float
    dp_accounting_rdp_same_orders: float
    dp_accounting_rdp: float
    dp_accounting_pld: float


def _dp_accounting() -> tuple[Any, Any, Any]:
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the epsilon cross-check needs Google's dp-accounting: "
            "pip install 'fedmm[privacy-eval]' (or pip install dp-accounting)"
        ) from error
    return dp_accounting, rdp, pld


class _DropFractionalOrderNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "_compute_log_a_frac failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_fractional_orders() -> Iterator[None]:
    """``dp_accounting`` logs (on the ``absl`` logger) each fractional order below 2 whose series
    does not converge and leaves that order out; at these settings the optimal order is far
    higher, so the notices say nothing about the result."""
    notice_filter = _DropFractionalOrderNotices()
    root = logging.getLogger("absl")
    root.addFilter(notice_filter)
    try:
        yield
    finally:
        root.removeFilter(notice_filter)


def cross_check_history(
    site: str, history: list[tuple[float, float, int]], delta: float
) -> SiteEpsilon:
    """The site's epsilon by Opacus and by ``dp_accounting``; raises when they disagree."""
    if not history:
        raise ValueError(f"site {site} has an empty privacy history: it never trained with DP")
    dp_accounting, rdp, pld = _dp_accounting()
    from fedmm.client.privacy_ledger import RDP_ORDERS

    def event(sigma: float, q: float) -> object:
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))

    same = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    own = rdp.RdpAccountant()
    tight = pld.PLDAccountant()
    with _quiet_fractional_orders():
        for sigma, q, steps in history:
            for accountant in (same, own, tight):
                accountant.compose(event(sigma, q), int(steps))
        same_epsilon, own_epsilon = float(same.get_epsilon(delta)), float(own.get_epsilon(delta))
    result = SiteEpsilon(
        site=site,
        delta=delta,
        # The DP-SGD part for display (the noisy-count releases are in the epsilons).
        noise_multiplier=max(s for s, _, _ in dp_sgd_history(history) or history),
        sample_rate=max(q for _, q, _ in dp_sgd_history(history) or history),
        steps=sum(int(n) for _, _, n in dp_sgd_history(history)),
        opacus_rdp=epsilon_of(history, delta),
        dp_accounting_rdp_same_orders=same_epsilon,
        dp_accounting_rdp=own_epsilon,
        dp_accounting_pld=float(tight.get_epsilon(delta)),
    )
    if abs(result.opacus_rdp - result.dp_accounting_rdp_same_orders) > RTOL * max(
        result.dp_accounting_rdp_same_orders, 1e-12
    ):
        raise EpsilonMismatchError(
            f"site {site}: Opacus RDP epsilon {result.opacus_rdp:.4f} differs from "
            f"dp-accounting's {result.dp_accounting_rdp_same_orders:.4f} (same orders, delta "
            f"{delta:g}) by more than {RTOL:.0%}"
        )
    if result.opacus_rdp < result.dp_accounting_rdp * (1 - RTOL):
        raise EpsilonMismatchError(
            f"site {site}: Opacus RDP epsilon {result.opacus_rdp:.4f} is below dp-accounting's "
            f"{result.dp_accounting_rdp:.4f} (its own orders, delta {delta:g}): under-reported"
        )
    return result


def cross_check_ledgers(ledger_dir: Path) -> list[SiteEpsilon]:
    """Every site ledger (``site-<id>.json``) of a run, cross-checked; [] when DP was off."""
    results = []
    for path in sorted(Path(ledger_dir).glob("site-*.json"), key=_site_order):
        data = json.loads(path.read_text(encoding="utf-8"))
        history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        if not history:
            continue  # a non-private run keeps a ledger with nothing spent
        delta = float(data["delta"]) if data.get("delta") else math.nan
        if not 0 < delta < 1:
            raise ValueError(f"{path} has no valid delta ({data.get('delta')!r})")
        results.append(cross_check_history(path.stem.removeprefix("site-"), history, delta))
    return results


def _site_order(path: Path) -> tuple[int, str]:
    suffix = path.stem.removeprefix("site-")
    return (int(suffix), "") if suffix.isdigit() else (1 << 62, suffix)
