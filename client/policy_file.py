"""A site's own policy files, and the one error for a policy that cannot be used.

The site's privacy policy (``client.privacy_policy``), secure-aggregation policy
(``client.secagg.policy``) and de-identification policy (``client.deid.policy``) raise
:class:`PolicyError`, whose message names the file or key and the fix; the site must correct
its configuration before it takes part again.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class PolicyError(ValueError):
    """A site policy file or node config key is invalid; the message names it and the fix."""


def read_policy_file(path: Path, *, what: str) -> dict[str, Any]:
    """The TOML document of the site's policy file ``path`` (``what`` names it in errors)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise PolicyError(f"{what} {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{what} {path} is not valid TOML: {error}") from error
