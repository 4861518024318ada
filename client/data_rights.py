"""A site's data-rights operations on its own files: withdraw records (``fedmm site
forget``), purge its caches (``fedmm site purge``), and read its audit log (``fedmm site
audit``, ``fedmm site status``).

What forgetting does: the record's file name is added (keyed-hashed) to the withdrawals
file (``client.record_withdrawals``); every later data load, every round of a running site
included, leaves it out of the training and held-out records; its de-identified copy is
removed from the cache now (and never stored again). What it cannot do: take the record's
influence out of models trained before. Their DP guarantee bounds it (at the epsilon the
site's ledger shows for the runs that used it); removing it completely means training a new
model without the record.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmm.client.site_config import SiteConfig

#: An unfinished cache build (a crashed process) older than this is removed by purge.
STALE_BUILD_SECONDS = 3600.0


class DataRightsError(ValueError):
    """A data-rights command cannot do what was asked; the message names the fix."""


def _site_settings(config: SiteConfig) -> Any:
    from fedmm.client.site_data import site_deid_settings

    return site_deid_settings(config.node_config())


@dataclass(frozen=True)
class ForgetResult:
    recorded: list[str]  # names newly withdrawn
    already: list[str]  # names withdrawn before
    cache_records_removed: int
    withdrawals_file: Path


def read_names_file(path: Path) -> list[str]:
    """File names, one a line (blank lines and lines starting with ``#`` skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise DataRightsError(f"--names-file {path}: cannot read it ({error.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def forget_records(
    config: SiteConfig, file_names: list[str], *, allow_missing: bool = False
) -> ForgetResult:
    """Withdraw the records ``file_names`` (as ``metadata.jsonl`` names them): recorded in
    the withdrawals file, removed from the site's de-identification cache now, and left out
    of every later round. A name the imagefolder's ``metadata.jsonl`` does not hold is an
    error (a typo would leave the record in use) unless ``allow_missing``."""
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.record_withdrawals import (
        METADATA_FILE,
        append_withdrawals,
        metadata_file_names,
        normalised_file_name,
        record_digest,
        withdrawal_key,
        withdrawn_digests,
    )

    names = [normalised_file_name(n) for n in file_names if n.strip()]
    if not names:
        raise DataRightsError("no record named: pass --file-name NAME or --names-file FILE")
    root = Path(str(config.get("data", "imagefolder")))
    try:
        present = set(metadata_file_names((root / METADATA_FILE).read_bytes()))
    except OSError as error:
        raise DataRightsError(
            f"[data] imagefolder: cannot read {root / METADATA_FILE} ({error.strerror})"
        ) from None
    unknown = [n for n in names if n not in present]
    if unknown and not allow_missing:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataRightsError(
            f"{len(unknown)} name(s) are not in {root / METADATA_FILE}: {shown}; check the "
            "spelling (the file_name as metadata.jsonl writes it), or pass --allow-missing "
            "to record them anyway (a record already deleted from the folder); nothing was "
            "recorded"
        )
    settings = _site_settings(config)
    secret = load_or_create_site_secret(settings.secret_file)
    path = config.withdrawals_file
    key = withdrawal_key(secret)
    before = withdrawn_digests(path, secret)
    already = [n for n in names if record_digest(n, key) in before]
    recorded = append_withdrawals(path, names, secret)
    removed = remove_withdrawn_from_cache(config, secret=secret)
    return ForgetResult(recorded, already, removed, path)


def remove_withdrawn_from_cache(config: SiteConfig, *, secret: bytes) -> int:
    """Remove every withdrawn record from every cache entry of the site's imagefolder; an
    entry that fails its integrity check is deleted whole; features derived from the records
    are deleted (:func:`remove_derived_features`). Returns the records removed."""
    from fedmm.client.deid.cache import DeidCache, EncryptedEntry, slot_name
    from fedmm.client.encrypted_cache import CacheIntegrityError
    from fedmm.client.record_withdrawals import withdrawal_key, withdrawn_digests
    from fedmm.client.site_data import remove_withdrawn_from_entry

    settings = _site_settings(config)
    if not settings.cache_dir.is_dir():
        return 0
    withdrawn = withdrawn_digests(config.withdrawals_file, secret)
    root = Path(str(config.get("data", "imagefolder"))).resolve()
    slot = slot_name(("imagefolder", str(root)), secret)
    cache = DeidCache(settings.cache_dir, secret, retention_days=settings.retention_days)
    removed = 0
    for info in cache.entries():
        if info.slot != slot:
            continue
        try:
            entry = EncryptedEntry(info.path, cache.key)
            removed += remove_withdrawn_from_entry(entry, withdrawn, withdrawal_key(secret))
        except CacheIntegrityError as error:
            cache.reject(info.path, error)
    remove_derived_features(settings.cache_dir)
    return removed


def remove_derived_features(cache_dir: Path) -> int:
    """Delete every entry of features derived from the site's records (frozen-encoder and
    scattering features, ``client.feature_cache``, ``client.scattering_cache``), finished or
    not: they may hold a withdrawn record's features, and the next run rebuilds them from the
    records left. Returns the entries deleted."""
    from fedmm.client.feature_cache import FEATURES_DIR

    folder = Path(cache_dir) / FEATURES_DIR
    entries = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    for path in entries:
        shutil.rmtree(path, ignore_errors=True)
    return len(entries)


@dataclass
class PurgeResult:
    removed: list[tuple[str, str]] = field(default_factory=list)  # (entry, why)
    kept: list[tuple[str, str]] = field(default_factory=list)
    cache_dir: Path | None = None


def purge_caches(
    config: SiteConfig, *, dry_run: bool = False, now: float | None = None
) -> PurgeResult:
    """Remove the site's cache entries that are older than its retention period
    (``[deidentification] cache-retention-days``), of an older (unencrypted) format, or
    built from data, a policy, a secret or tools that have changed since (the
    imagefolder's entries whose key is not the current one); and unfinished builds left by
    a crashed process. ``dry_run``: say what would go, remove nothing."""
    from fedmm.client.deid.cache import CACHE_FORMAT, DeidCache
    from fedmm.client.deid.site_secret import load_or_create_site_secret
    from fedmm.client.site_data import imagefolder_cache_address

    settings = _site_settings(config)
    result = PurgeResult(cache_dir=settings.cache_dir)
    if not settings.cache_dir.is_dir():
        return result
    now = time.time() if now is None else now
    secret = load_or_create_site_secret(settings.secret_file)
    root = Path(str(config.get("data", "imagefolder"))).resolve()
    slot, key, _versions = imagefolder_cache_address(
        root, policy=settings.load_policy(), secret=secret
    )
    cache = DeidCache(settings.cache_dir, secret, retention_days=settings.retention_days)
    for info in cache.entries():
        name = info.path.name
        if info.format != CACHE_FORMAT:
            why = f"an older cache format ({info.format}: not encrypted)"
        elif info.age_days(now) > settings.retention_days:
            why = (
                f"{info.age_days(now):.1f} days old, past the retention period of "
                f"{settings.retention_days:g} days"
            )
        elif info.slot == slot and info.key != key:
            why = "built from data, a policy, a site secret or tools that have changed"
        else:
            reason = "the current entry" if info.slot == slot else "another dataset's entry"
            result.kept.append((name, f"{reason}, {info.age_days(now):.1f} days old"))
            continue
        result.removed.append((name, why))
        if not dry_run:
            shutil.rmtree(info.path, ignore_errors=True)
    for path in sorted(settings.cache_dir.glob(".*.tmp")):
        if now - path.stat().st_mtime > STALE_BUILD_SECONDS:
            result.removed.append((path.name, "an unfinished build (a crashed process)"))
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    return result


def audit_report(config: SiteConfig) -> dict[str, Any]:
    """The audit log as JSON: its path, the runs (summaries), the events."""
    from fedmm.client.site_audit import read_audit_log, summarise_runs

    log = read_audit_log(config.audit_log)
    return {
        "audit_log": str(config.audit_log),
        "exists": config.audit_log.exists(),
        "unreadable_lines": log.unreadable_lines,
        "runs": [run.to_dict() for run in summarise_runs(log.events)],
        "events": log.events,
    }


def data_rights_status(config: SiteConfig) -> dict[str, Any]:
    """What ``fedmm site status`` adds to the ledger: runs served (from the audit log),
    refusals by code, records withdrawn, cache entries and the retention period."""
    from fedmm.client.record_withdrawals import read_withdrawals
    from fedmm.client.site_audit import read_audit_log, summarise_runs

    log = read_audit_log(config.audit_log)
    runs = summarise_runs(log.events)
    refusals: dict[str, int] = {}
    for run in runs:
        for code, count in run.refusals.items():
            refusals[code] = refusals.get(code, 0) + count
    withdrawals = read_withdrawals(config.withdrawals_file)
    cache_dir = _site_settings(config).cache_dir
    entries = (
        [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if cache_dir.is_dir()
        else []
    )
    last = runs[-1] if runs else None
    return {
        "audit_log": str(config.audit_log),
        "runs_served": len(runs),
        "rounds_trained": sum(len(r.rounds_trained) for r in runs),
        "rounds_evaluated": sum(len(r.rounds_evaluated) for r in runs),
        "refusals": dict(sorted(refusals.items())),
        "last_run": None if last is None else last.to_dict(),
        "unreadable_audit_lines": log.unreadable_lines,
        "withdrawals_file": str(config.withdrawals_file),
        "records_withdrawn": len(withdrawals),
        "last_withdrawal": withdrawals[-1].withdrawn_at if withdrawals else None,
        "cache_dir": str(cache_dir),
        "cache_entries": len(entries),
        "cache_retention_days": config.cache_retention_days,
    }
