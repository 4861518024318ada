"""A federation roster for the simulated sites, made for the run in its own folder.

Active-coordinator mode (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, section 6) needs every site to hold a roster
signing key and every site to have signed the roster (``common.secagg.roster``). A deployed
federation runs the ceremony of docs/site-guide.md; a simulation plays it for its sites, in
``<out>/site-roster/``:

- ``site-<id>/roster-signing-key``: site ``id``'s Ed25519 key (mode 0600, directory 0700);
- ``roster.json``: the roster listing ``site-0`` ... ``site-<n-1>``, signed by every site.

The keys are derived from the run's seed and the site's partition id (SHA-256 of both, as
the 32-byte Ed25519 private key), so that ``--resume`` and a second run in the same folder
find the same roster and the same pinned digest. They are simulation keys: anyone who knows
the seed knows them. A deployed site makes its key with ``fedmm site roster-key``, from the
operating system's randomness.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.client.secagg.site_signing_key import (
    load_site_signing_key,
    write_site_signing_key,
)
from fedmm.common.secagg.roster import (
    RosterError,
    add_site,
    create_roster,
    save_roster,
    sign_roster,
    verify_roster,
)

ROSTER_DIR = "site-roster"
ROSTER_FILE = "roster.json"
SIGNING_KEY_FILE = "roster-signing-key"
FEDERATION = "fedmm-simulation"


@dataclass(frozen=True)
class SimulatedRoster:
    """Where the simulation's roster and keys are, and the digest every site pins."""

    directory: Path
    digest: bytes

    @property
    def roster_file(self) -> Path:
        return self.directory / ROSTER_FILE

    def signing_key_file(self, partition_id: int) -> Path:
        return self.directory / site_name(partition_id) / SIGNING_KEY_FILE


def site_name(partition_id: int) -> str:
    """The roster name of a simulated site (its partition id)."""
    return f"site-{partition_id}"


def simulated_signing_key(*, seed: int, partition_id: int) -> Ed25519PrivateKey:
    """Site ``partition_id``'s key for a run with ``seed`` (deterministic; see the module)."""
    material = hashlib.sha256(
        f"fedmm/simulated-roster-key/v1|seed={seed}|site={partition_id}".encode()
    ).digest()
    return Ed25519PrivateKey.from_private_bytes(material)


def write_simulated_roster(out_dir: Path, *, num_sites: int, seed: int) -> SimulatedRoster:
    """The roster of ``num_sites`` simulated sites under ``out_dir``, signed by all of them.

    Key files already there are kept when they hold the key this seed gives (a resumed run),
    and refused otherwise: a folder is one federation."""
    directory = Path(out_dir) / ROSTER_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout = SimulatedRoster(directory=directory, digest=b"")
    keys = [simulated_signing_key(seed=seed, partition_id=site) for site in range(num_sites)]
    for site, key in enumerate(keys):
        path = layout.signing_key_file(site)
        public = key.public_key().public_bytes_raw()
        if path.exists():
            if load_site_signing_key(path).public_key().public_bytes_raw() != public:
                raise RosterError(
                    f"{path} holds another key than seed {seed} gives: use a new out folder "
                    "for a run with another seed"
                )
            continue
        write_site_signing_key(path, key)
    roster = create_roster(FEDERATION)
    for site, key in enumerate(keys):
        roster = add_site(
            roster, name=site_name(site), signing_key=key.public_key().public_bytes_raw()
        )
    for key in keys:
        roster = sign_roster(roster, private_key=key)
    verified = verify_roster(roster)
    save_roster(roster, layout.roster_file)
    return SimulatedRoster(directory=directory, digest=verified.digest)
