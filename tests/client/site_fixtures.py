"""A complete site on disk for the deployment tests: data, policies, key pair, config."""

from __future__ import annotations

import json
from pathlib import Path

from fedmm.client.site_keys import generate_site_key_pair
from fedmm.common.data.openclipart import OPENCLIPART_ROOT

GOOD = """
[site]
name = "site-a"

[data]
imagefolder = "data"

[deidentification]
policy = "deid-policy.toml"
site-secret = "secrets/site-secret"
cache-dir = "cache"

[privacy]
policy-file = "privacy-policy.toml"
ledger-file = "state/privacy-ledger.json"

[supernode]
auth-private-key = "keys/site-auth-key"

[secure-aggregation]
min-threshold = 3
min-sites = 3
spill-dir = "spill"
"""


def release_section() -> str:
    """``[release]`` pinning the installed release (its digest is computed once a process)."""
    from fedmm.client.release_pin import installed_release

    release = installed_release()
    return f'\n[release]\nversion = "{release.version}"\ndigest = "{release.digest}"\n'


def make_site(root: Path, text: str = GOOD) -> Path:
    """A complete site under ``root``: data, policies, key, config; returns the config.
    A config without ``[release]`` gets one pinning the installed release."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a bag"}) + "\n"
    )
    (root / "deid-policy.toml").write_text('face_mode = "blur"\n')
    (root / "privacy-policy.toml").write_text("[privacy]\nmax-epsilon = 2.0\ndelta = 1e-6\n")
    generate_site_key_pair(root / "keys")
    config = root / "site.toml"
    config.write_text(text if "[release]" in text else text + release_section())
    return config


def small_colour_drawings(count: int, modes: tuple[str, ...] = ("RGB",)) -> list[Path]:
    """``count`` small drawings of Debian's openclipart-png in one of Pillow's ``modes``
    (``RGB``: opaque, 8 of them; ``RGBA``: colour with transparency, most of them), in a fixed
    order (a few of its files are 100M+ pixels: skipped by size)."""
    from PIL import Image

    chosen = []
    for path in sorted((OPENCLIPART_ROOT / "png").glob("*/*.png")):
        if path.is_symlink() or path.stat().st_size > 100_000:
            continue
        with Image.open(path) as image:
            if image.mode in modes and max(image.size) < 600:
                chosen.append(path)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"openclipart-png has fewer than {count} small {modes} drawings")
