"""The site's last line of its distributed-DP trust assumption, at the unmask stage.

A site sizes its guarantee on h honest shares being in every sum (``min-honest-sites``). When
the coordinator reports fewer than h survivors at the unmask stage, the sum would carry less
noise than the site accounted for, so the site refuses to reveal any share: without the
shares of enough sites nothing can be unmasked and the round is discarded. No torch here (the
unmask stage runs in a fresh process per message in deployment).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from client.secagg.stages import SecAggRefusal
from common.site_refusal import RefusalCode

#: ``context.state`` record: the round and the honest survivors this site requires.
GUARD_KEY = "ddp-guard"


class TooFewSurvivors(SecAggRefusal):
    """Fewer survivors than the site's assumed honest sites: it will not unmask."""


def require_enough_survivors(request: Mapping[str, Any], *, min_survivors: int) -> None:
    """Raise :class:`TooFewSurvivors` when the unmask request reports fewer than
    ``min_survivors`` survivors in the sum (``num_survivors``: the whole round's count; the
    request lists only this site's neighbours among them)."""
    count = request.get("num_survivors", 0)
    survivors = count if isinstance(count, int) and not isinstance(count, bool) else 0
    if survivors < min_survivors:
        raise TooFewSurvivors(
            f"{survivors} sites survived, fewer than the {min_survivors} honest survivors this "
            "site's distributed-DP noise assumes; refusing to unmask (round discarded)",
            code=RefusalCode.TOO_FEW_SITES,
        )
