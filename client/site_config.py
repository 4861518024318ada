"""A site's deployment config (one TOML file), checked, and turned into SuperNode node config.

The file says where everything of the site lives; relative paths are relative to the file::

    [site]
    name = "hospital-a"                      # optional: a label for the coordinator

    [data]
    imagefolder = "/srv/fedmm/records"       # metadata.jsonl + images (never leaves the site)
    # withdrawals-file = "state/withdrawals.jsonl"  # `fedmm site forget`; beside the ledger

    [deidentification]                       # always applied to the imagefolder
    policy = "deid-policy.toml"              # client/deid policy (.toml/.json); default policy
    site-secret = "secrets/site-secret"      # keys the pseudonyms; 0600, made on first use
    cache-dir = "/var/cache/fedmm/deid"      # de-identified copy (encrypted); outside it
    cache-retention-days = 30                # older cache entries are rebuilt / purged

    [privacy]
    policy-file = "privacy-policy.toml"      # or inline: max-epsilon, delta, ...
    ledger-file = "state/privacy-ledger.json"
    # audit-log = "state/site-audit.jsonl"   # runs served; beside the ledger by default

    [supernode]
    auth-private-key = "keys/site-auth-key"  # from `fedmm site keygen`; 0600

    [secure-aggregation]                     # optional: the site's own minimums
    min-threshold = 2
    min-sites = 3                            # at least 3 (client/secagg/policy.py)
    spill-dir = "/var/lib/fedmm/spill"       # 0700; made by `fedmm site start`
    # Active-coordinator mode (docs/site-guide.md, the roster ceremony):
    # require-active-coordinator = true
    # roster-digest = "<64 hex digits>"      # `fedmm site roster verify` prints it
    # roster-file = "roster.json"            # the roster every site signed
    # signing-key-file = "keys/roster-key"   # `fedmm site roster-key`; 0600

    [pretrained]                             # optional: frozen pretrained encoders
    weights-dir = "/srv/fedmm/weights"       # the site's copies, by the run's file names

    [release]                                # required: the only code this site runs
    version = "0.1.0"
    digest = "sha256:..."                    # `fedmm site release-digest`

:func:`check_site_config` reports every problem at once, each naming the key and the fix,
and checks every path the site will use (readable, writable or creatable, private).
:func:`prepare_site_folders` makes the site's own folders (0700) before the SuperNode starts.
:meth:`SiteConfig.node_config` gives the ``--node-config`` keys ``client/app.py`` reads.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmm.client.privacy_policy import POLICY_KEYS as _PRIVACY_POLICY_KEYS
from fedmm.client.release_pin import ReleaseError, ReleasePin, normalise_digest
from fedmm.client.secagg.policy import POLICY_KEYS as _SECAGG_POLICY_KEYS

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "site": {"name": str},
    "data": {"imagefolder": str, "withdrawals-file": str},
    "deidentification": {
        "policy": str,
        "site-secret": str,
        "cache-dir": str,
        "cache-retention-days": (int, float),
    },
    "privacy": {
        "policy-file": str,
        "ledger-file": str,
        "audit-log": str,
        # Inline policy keys: the same as the policy file's [privacy] table.
        **{key: int if key == "min-honest-sites" else (int, float) for key in _PRIVACY_POLICY_KEYS},
    },
    "supernode": {"auth-private-key": str},
    "secure-aggregation": {
        "spill-dir": str,
        "roster-file": str,
        "signing-key-file": str,
        # The policy file's [secure-aggregation] keys, checked by client.secagg.policy.
        **{
            key: kind if kind in (int, bool, str) else (int, float)
            for key, kind in _SECAGG_POLICY_KEYS.items()
        },
    },
    "pretrained": {"weights-dir": str},
    "release": {"version": str, "digest": str},
}
_TYPE_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    (int, float): "a number",
}
_REQUIRED = (
    ("data", "imagefolder"),
    ("privacy", "ledger-file"),
    ("supernode", "auth-private-key"),
    ("release", "version"),
    ("release", "digest"),
)
_INLINE_PRIVACY = tuple(_PRIVACY_POLICY_KEYS)
_PATH_KEYS = {
    ("data", "imagefolder"),
    ("data", "withdrawals-file"),
    ("privacy", "audit-log"),
    ("deidentification", "policy"),
    ("deidentification", "site-secret"),
    ("deidentification", "cache-dir"),
    ("privacy", "policy-file"),
    ("privacy", "ledger-file"),
    ("supernode", "auth-private-key"),
    ("secure-aggregation", "spill-dir"),
    ("secure-aggregation", "roster-file"),
    ("secure-aggregation", "signing-key-file"),
    ("pretrained", "weights-dir"),
}


class SiteConfigError(ValueError):
    """The site config has problems; ``problems`` lists each, naming the key and the fix."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


@dataclass(frozen=True)
class SiteConfig:
    source: Path
    values: dict[str, dict[str, Any]]
    warnings: tuple[str, ...] = field(default=())

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.values.get(section, {}).get(key, default)

    def path(self, section: str, key: str) -> Path | None:
        value = self.get(section, key)
        return None if value is None else Path(value)

    @property
    def auth_private_key(self) -> Path:
        return Path(self.values["supernode"]["auth-private-key"])

    @property
    def ledger_file(self) -> Path:
        return Path(self.values["privacy"]["ledger-file"])

    @property
    def withdrawals_file(self) -> Path:
        """Where ``fedmm site forget`` records withdrawn records: ``[data]
        withdrawals-file``, by default ``withdrawals.jsonl`` beside the ledger."""
        from fedmm.client.record_withdrawals import DEFAULT_NAME

        named = self.get("data", "withdrawals-file")
        return Path(named) if named else self.ledger_file.parent / DEFAULT_NAME

    @property
    def audit_log(self) -> Path:
        """The site's audit log of runs served: ``[privacy] audit-log``, by default
        ``site-audit.jsonl`` beside the ledger."""
        from fedmm.client.site_audit import DEFAULT_NAME

        named = self.get("privacy", "audit-log")
        return Path(named) if named else self.ledger_file.parent / DEFAULT_NAME

    @property
    def cache_retention_days(self) -> float:
        """Days a de-identification cache entry is kept: ``[deidentification]
        cache-retention-days`` (default 30)."""
        from fedmm.client.deid.cache import DEFAULT_RETENTION_DAYS

        return float(self.get("deidentification", "cache-retention-days", DEFAULT_RETENTION_DAYS))

    @property
    def release_pin(self) -> ReleasePin:
        return ReleasePin(self.values["release"]["version"], self.values["release"]["digest"])

    def node_config(self) -> dict[str, str | int | float]:
        """The SuperNode's node config: the keys ``client/app.py`` and ``site_data`` read."""
        out: dict[str, str | int | float] = {
            "imagefolder": str(self.get("data", "imagefolder")),
            "ledger-file": str(self.ledger_file),
            "withdrawals-file": str(self.withdrawals_file),
            "audit-log": str(self.audit_log),
        }
        if self.get("deidentification", "cache-retention-days") is not None:
            out["deid-cache-retention-days"] = self.cache_retention_days
        for key, node_key in (
            ("policy", "deid-policy"),
            ("site-secret", "site-secret"),
            ("cache-dir", "deid-cache-dir"),
        ):
            if self.get("deidentification", key) is not None:
                out[node_key] = str(self.get("deidentification", key))
        if self.get("privacy", "policy-file") is not None:
            out["policy-file"] = str(self.get("privacy", "policy-file"))
        if self.get("pretrained", "weights-dir") is not None:
            out["pretrained-weights-dir"] = str(self.get("pretrained", "weights-dir"))
        for key in _INLINE_PRIVACY:
            if self.get("privacy", key) is not None:
                out[f"privacy-{key}"] = float(self.get("privacy", key))
        for key in (*_SECAGG_POLICY_KEYS, "spill-dir", "roster-file", "signing-key-file"):
            value = self.get("secure-aggregation", key)
            if value is not None:
                out[f"secagg-{key}"] = value if isinstance(value, int | float) else str(value)
        return out

    def privacy_policy(self) -> Any:
        from fedmm.client.privacy_policy import SitePrivacyPolicy

        return SitePrivacyPolicy.for_site(self.node_config())


def node_config_argument(node_config: Mapping[str, str | int | float]) -> str:
    """``--node-config`` text: space-separated ``key=value``, strings double-quoted."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, str):
            if '"' in value or "\n" in value or "\\" in value:
                raise ValueError(f"node config {key}: {value!r} may not contain quotes")
            parts.append(f'{key}="{value}"')
        elif isinstance(value, float) and math.isinf(value):
            parts.append(f"{key}={'inf' if value > 0 else '-inf'}")
        else:
            parts.append(f"{key}={json.dumps(value)}")
    return " ".join(parts)


def load_site_config(path: Path) -> SiteConfig:
    """Parse and check the structure (sections, keys, types); resolve relative paths.

    Raises :class:`SiteConfigError` listing every structural problem. Files are checked
    by :func:`check_site_config`.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(path, ["the file does not exist"]) from None
    except tomllib.TOMLDecodeError as err:
        raise SiteConfigError(path, [f"not valid TOML: {err}"]) from None
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    base = path.resolve().parent
    for section, table in document.items():
        if section not in _SCHEMA:
            problems.append(f"unknown section [{section}]; known: {', '.join(_SCHEMA)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section} must be a table ([{section}])")
            continue
        values[section] = {}
        for key, value in table.items():
            kind = _SCHEMA[section].get(key)
            if kind is None:
                problems.append(
                    f"[{section}] {key}: unknown key; known: {', '.join(_SCHEMA[section])}"
                )
                continue
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
                expected = _TYPE_NAMES[kind]
                problems.append(f"[{section}] {key}: expected {expected}, got {value!r}")
                continue
            if (section, key) in _PATH_KEYS:
                if not value.strip():
                    problems.append(f"[{section}] {key}: empty path")
                    continue
                value = str((base / Path(value).expanduser()).resolve())
                if '"' in value or "\\" in value or "\n" in value:
                    problems.append(
                        f"[{section}] {key}: the path may not contain quotes, backslashes or "
                        "newlines (they cannot pass through flower-supernode --node-config)"
                    )
                    continue
            if (section, key) == ("release", "digest"):
                try:
                    value = normalise_digest(value)
                except ReleaseError as err:
                    problems.append(f"[release] digest: {err}")
                    continue
            values[section][key] = value
    for section, key in _REQUIRED:
        if key not in values.get(section, {}) and f"[{section}] {key}" not in " ".join(problems):
            problems.append(f"[{section}] {key} is required ({_HELP[(section, key)]})")
    privacy = values.get("privacy", {})
    inline = [k for k in _INLINE_PRIVACY if k in privacy]
    if "policy-file" in privacy and inline:
        problems.append(
            f"[privacy] policy-file and inline keys ({', '.join(inline)}) both given: the "
            "file would win silently; keep one"
        )
    if problems:
        raise SiteConfigError(path, problems)
    return SiteConfig(source=path, values=values)


_HELP = {
    ("data", "imagefolder"): "the folder with metadata.jsonl and the images",
    ("privacy", "ledger-file"): "where the site keeps its privacy ledger across runs, "
    'e.g. "state/privacy-ledger.json"',
    ("supernode", "auth-private-key"): "the private key from `fedmm site keygen DIR`, "
    'e.g. "keys/site-auth-key"',
    ("release", "version"): 'the fedmm version this site runs, e.g. "0.1.0"',
    ("release", "digest"): "the digest of the release this site reviewed and installed; "
    "`fedmm site release-digest` prints it",
}


def _private_file_problem(path: Path, what: str, key: str) -> str | None:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return f"{key}: {what} {path} is not a regular file"
    if stat.S_IMODE(info.st_mode) & 0o077:
        return (
            f"{key}: {what} {path} is readable or writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); fix: chmod 600 {path}"
        )
    return None


def _writable_parent_problem(path: Path, key: str) -> str | None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: cannot create {path}: {parent} is not writable by this user"
    return None


def check_site_config(path: Path) -> SiteConfig:
    """Load the config and check every file it names; raise :class:`SiteConfigError` with
    all problems, or return the config with its warnings."""
    config = load_site_config(path)
    problems: list[str] = []
    warnings: list[str] = []

    root = config.path("data", "imagefolder")
    assert root is not None
    if not root.is_dir():
        problems.append(f"[data] imagefolder: {root} is not a folder")
    elif not os.access(root, os.R_OK | os.X_OK):
        problems.append(f"[data] imagefolder: {root} is not readable by this user")
    elif not (root / "metadata.jsonl").is_file():
        problems.append(
            f"[data] imagefolder: {root} has no metadata.jsonl (one JSON object per line "
            'with "file_name" and "text")'
        )

    problems += _check_deidentification(config, root, warnings)
    problems += _check_data_rights_files(config)

    problems += _check_privacy(config, warnings)

    key_file = config.auth_private_key
    if not key_file.exists():
        problems.append(
            f"[supernode] auth-private-key: {key_file} does not exist; make a key pair with "
            f"`fedmm site keygen {key_file.parent}` and send the .pub file to the coordinator"
        )
    else:
        problem = _private_file_problem(key_file, "the authentication key", "[supernode]")
        if problem:
            problems.append(problem)
        else:
            from fedmm.client.site_keys import load_site_private_key

            try:
                load_site_private_key(key_file)
            except ValueError as err:
                problems.append(f"[supernode] auth-private-key: {err}")

    problems += _check_secure_aggregation_policy(config)
    spill = config.path("secure-aggregation", "spill-dir")
    if spill is None:
        warnings.append(
            "[secure-aggregation] no spill-dir: trained updates wait in the system's temporary "
            "folder (a private subfolder); name a folder of the site for a service"
        )
    else:
        problem = _folder_problem(spill, "[secure-aggregation] spill-dir")
        if problem:
            problems.append(problem)
    problems += _check_release(config)
    if problems:
        raise SiteConfigError(config.source, problems)
    return SiteConfig(config.source, config.values, tuple(warnings))


def _check_secure_aggregation_policy(config: SiteConfig) -> list[str]:
    """The site's secure-aggregation policy as the site will read it at every round."""
    from fedmm.client.policy_file import PolicyError
    from fedmm.client.secagg.policy import ClientSecAggPolicy

    try:
        policy = ClientSecAggPolicy.for_site(config.node_config())
    except PolicyError as err:
        return [f"[secure-aggregation] {err}"]
    return _check_roster(config, policy)


def _check_roster(config: SiteConfig, policy: Any) -> list[str]:
    """Active-coordinator mode: the roster file and signing key load, every site signed the
    roster, its digest is the pinned one and this site's key is in it."""
    from fedmm.client.secagg.site_identity import identity_from_node_config
    from fedmm.client.secagg.site_signing_key import SiteSigningKeyError
    from fedmm.common.secagg.roster import RosterError

    roster_file = config.path("secure-aggregation", "roster-file")
    key_file = config.path("secure-aggregation", "signing-key-file")
    if roster_file is None and key_file is None:
        if policy.require_active_coordinator:
            return [
                "[secure-aggregation] require-active-coordinator = true needs roster-file and "
                "signing-key-file (docs/site-guide.md, the roster ceremony)"
            ]
        return []
    if roster_file is None or key_file is None:
        return ["[secure-aggregation] roster-file and signing-key-file go together: set both"]
    if policy.pinned_roster_digest is None:
        return [
            "[secure-aggregation] roster-file needs roster-digest: pin the digest that "
            "`fedmm site roster verify` prints once every site signed"
        ]
    try:
        identity = identity_from_node_config(
            config.node_config(), pinned_digest=policy.pinned_roster_digest
        )
    except (RosterError, SiteSigningKeyError) as err:
        return [f"[secure-aggregation] {err}"]
    assert identity is not None
    return []


def _check_release(config: SiteConfig) -> list[str]:
    """The installed release is the pinned one (computing its digest takes a few seconds)."""
    from fedmm.client.release_pin import installed_release, pin_problems

    try:
        return pin_problems(config.release_pin, installed_release())
    except ReleaseError as err:
        return [f"[release] {err}"]


def _folder_problem(path: Path, key: str) -> str | None:
    """A site folder: an existing one is a private directory this user can write in; a
    missing one can be created (``fedmm site start`` makes it, 0700)."""
    if not path.exists():
        return _writable_parent_problem(path, key)
    if not path.is_dir():
        return f"{key}: {path} is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{key}: {path} is not writable by this user"
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"{key}: {path} is open to other users (mode {mode:04o}); fix: chmod 700 {path}"
    return None


def prepare_site_folders(config: SiteConfig) -> list[Path]:
    """Make the site's own folders that do not exist yet (0700): the spill folder and the
    ledger's folder. (The de-identification cache and the site secret's folder are made
    0700 where they are first used.) Returns the folders made."""
    made = []
    folders = [config.path("secure-aggregation", "spill-dir"), config.ledger_file.parent]
    for folder in folders:
        if folder is not None and not folder.exists():
            folder.mkdir(mode=0o700, parents=True)
            made.append(folder)
    return made


def _check_deidentification(
    config: SiteConfig, root: Path | None, warnings: list[str]
) -> list[str]:
    """The site's imagefolder is always de-identified (``client/site_data.py``): with the
    named policy, else the default one."""
    from fedmm.client.deid.policy import PolicyError, load_policy

    problems = []
    policy = config.path("deidentification", "policy")
    if policy is None:
        warnings.append(
            "[deidentification] no policy: the default de-identification policy applies "
            "(docs/deidentification.md)"
        )
    elif not policy.is_file():
        problems.append(f"[deidentification] policy: {policy} does not exist")
    else:
        try:
            load_policy(policy)
        except PolicyError as err:
            problems.append(f"[deidentification] policy: {err}")
    for key, default in (("site-secret", "~/.config/fedmm/site-secret"),
                         ("cache-dir", "~/.cache/fedmm/deid")):  # fmt: skip
        if config.get("deidentification", key) is None:
            warnings.append(
                f"[deidentification] no {key}: {default} of the user running the SuperNode "
                "is used; name it explicitly for a service"
            )
    secret = config.path("deidentification", "site-secret")
    if secret is not None:
        if secret.exists():
            problem = _private_file_problem(secret, "the site secret", "[deidentification]")
            if problem:
                problems.append(problem)
        else:
            problem = _writable_parent_problem(secret, "[deidentification] site-secret")
            if problem:
                problems.append(problem)
    cache = config.path("deidentification", "cache-dir")
    if cache is not None and root is not None and (cache == root or root in cache.parents):
        problems.append(
            f"[deidentification] cache-dir: {cache} is inside the imagefolder {root}; "
            "choose a folder outside it"
        )
    elif cache is not None:
        problem = _folder_problem(cache, "[deidentification] cache-dir")
        if problem:
            problems.append(problem)
    return problems


def _check_data_rights_files(config: SiteConfig) -> list[str]:
    """The withdrawals file and the audit log: private files (0600), or creatable; a
    retention period of more than zero days."""
    problems = []
    retention = config.get("deidentification", "cache-retention-days")
    if retention is not None and not (math.isfinite(retention) and retention > 0):
        problems.append(
            f"[deidentification] cache-retention-days: {retention!r} must be a number of "
            "days > 0 (default 30)"
        )
    for key, path, what in (
        ("[data] withdrawals-file", config.withdrawals_file, "the withdrawals file"),
        ("[privacy] audit-log", config.audit_log, "the audit log"),
    ):
        if path.exists():
            problem = _private_file_problem(path, what, key)
        else:
            problem = _writable_parent_problem(path, key)
        if problem:
            problems.append(problem)
    return problems


def _check_privacy(config: SiteConfig, warnings: list[str]) -> list[str]:
    from fedmm.client.privacy_ledger import PrivacyLedger
    from fedmm.client.privacy_policy import PolicyError

    problems = []
    policy = None
    policy_file = config.path("privacy", "policy-file")
    if policy_file is not None and not policy_file.is_file():
        problems.append(f"[privacy] policy-file: {policy_file} does not exist")
    else:
        try:
            policy = config.privacy_policy()
        except PolicyError as err:
            problems.append(f"[privacy] {err}")
    if (
        policy is not None
        and policy_file is None
        and not any(config.get("privacy", k) is not None for k in _INLINE_PRIVACY)
    ):
        warnings.append(
            f"[privacy] no policy-file and no inline keys: the defaults apply (max-epsilon "
            f"{policy.max_epsilon:g}, delta {policy.delta:g})"
        )
    if policy is not None and not math.isfinite(policy.max_epsilon):
        warnings.append("[privacy] max-epsilon = inf: this site allows training without DP")
    ledger_file = config.ledger_file
    if ledger_file.exists():
        problem = _private_file_problem(ledger_file, "the privacy ledger", "[privacy]")
        if problem:
            problems.append(problem)
        try:
            PrivacyLedger.load(ledger_file)
        except (ValueError, KeyError, TypeError) as err:
            problems.append(
                f"[privacy] ledger-file: {ledger_file} is not a privacy ledger ({err!r}); "
                "never delete or edit it to regain budget"
            )
    else:
        problem = _writable_parent_problem(ledger_file, "[privacy] ledger-file")
        if problem:
            problems.append(problem)
    return problems
