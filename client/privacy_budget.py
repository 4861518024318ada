"""A site's two privacy budgets: what a run may spend, and what the site spends over its life.

The coordinator's run config asks for an epsilon: the most this run may spend at the site
(its own entries in the ledger: the run's noisy count and its DP-SGD or distributed-DP
rounds). The site's policy caps its lifetime: every entry of its ledger, every run it ever
served (``max-epsilon``). Both are checked, composed with the RDP accountant at the smaller of
the ledger's and the policy's delta; a refusal says which budget would be exceeded and who
can change it (the run's epsilon is the coordinator's, the lifetime cap is the site's own).
"""

from __future__ import annotations

from fedmm.client.privacy_ledger import PrivacyLedger
from fedmm.common.site_refusal import RefusalCode, SiteRefusal

_SLACK = 1 + 1e-9  # calibration targets the budget exactly: float noise is not an overrun


def budget_refusal(
    projected: PrivacyLedger,
    *,
    run_epsilon: float,
    lifetime_epsilon: float,
    delta: float,
    what: str,
    accountant: str,
) -> SiteRefusal | None:
    """A refusal when ``projected`` (the ledger with what ``what`` would add) takes the run
    past ``run_epsilon`` or the site past ``lifetime_epsilon``; None when both hold."""
    run = projected.this_run().epsilon(delta)
    if run > run_epsilon * _SLACK:
        return SiteRefusal(
            RefusalCode.PRIVACY_BUDGET,
            f"run privacy budget: {what} would take this run's epsilon to {run:.3f} > the "
            f"{run_epsilon:g} the run may spend (delta {delta:g}, record-level, {accountant}); "
            "the coordinator may ask for a larger epsilon or fewer rounds",
        )
    lifetime = projected.epsilon(delta)
    if lifetime > lifetime_epsilon * _SLACK:
        return SiteRefusal(
            RefusalCode.LIFETIME_BUDGET,
            f"lifetime privacy budget: {what} would take this site's epsilon over every run to "
            f"{lifetime:.3f} > its policy's max-epsilon {lifetime_epsilon:g} (delta {delta:g}, "
            f"record-level, {accountant}); only the site's own policy can raise it",
        )
    return None
