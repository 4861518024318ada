"""The site's audit log: every run it served, every round it trained or evaluated in, and
every refusal, one JSON object a line, appended and never rewritten.

It answers a site's regulator and data subjects: which runs used the site's data, which
coordinator asked (its address and the SHA-256 fingerprint of the certificate the site
verified it with), how many records were used and held out, what epsilon was spent, under
which de-identification policy (its digest), and what the site refused and why (the public
code). It lives at the site (site config ``[privacy] audit-log``, by default
``site-audit.jsonl`` beside the privacy ledger; node config ``audit-log``), mode 0600, and
holds counts, digests and the site's own refusal reasons: no caption, image or secret.

Events (``event`` field):

- ``round``: a round the site computed a result for: ``task`` (``local_dp_sgd``,
  ``distributed_dp_step``, ``federated_eval``), ``records_used`` and ``records_held_out``,
  ``epsilon_run`` (this run's spend so far) and ``epsilon_lifetime`` (the ledger's), the
  ``deid_policy_sha256``, and ``withdrawn_records`` (how many the site has withdrawn).
- ``refusal``: a reply that refused: the ``message_type``, the public ``code``
  (``common.site_refusal``) and the ``reason`` as the site's log words it (it never leaves
  the site; for a failure, the exception's type only).

Every event carries ``time`` (UTC), ``run_id``, ``round``, ``coordinator_address`` and
``coordinator_certificate_sha256`` (null in simulation). Each event is one ``write`` to a
file opened with ``O_APPEND``, then fsynced before the reply leaves: a crash loses no event
that was written, and at most the line being written is torn; readers skip a torn line and
count it (:func:`read_audit_log`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from flwr.app import Context, Message

    Handler = Callable[[Message, Context], Message]

logger = logging.getLogger(__name__)

#: Node config keys: the audit log, and what ``fedmm site start`` knows of the coordinator.
AUDIT_LOG = "audit-log"
COORDINATOR_ADDRESS = "coordinator-address"
COORDINATOR_CERTIFICATE = "coordinator-certificate-sha256"
DEFAULT_NAME = "site-audit.jsonl"

EVENT_ROUND = "round"
EVENT_REFUSAL = "refusal"


def audit_log_path(node_config: Mapping[str, Any]) -> Path | None:
    """The audit log: node config ``audit-log`` (a deployed site's config always names it:
    ``client.site_config``); None for a site without one (a simulated site)."""
    if AUDIT_LOG in node_config:
        return Path(str(node_config[AUDIT_LOG]))
    return None


def certificate_sha256(path: Path) -> str:
    """SHA-256 fingerprints of the certificates in a PEM file (a CA bundle may hold
    several), as ``openssl x509 -noout -fingerprint -sha256`` prints them, comma-separated."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} holds no PEM certificate ({error})") from None
    return ",".join(
        ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256())) for cert in certificates
    )


def policy_digest(policy_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a policy's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(policy_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _json_number(value: float | None) -> float | str | None:
    if value is None:
        return None
    return float(value) if math.isfinite(value) else "inf"


def audit_event(
    node_config: Mapping[str, Any],
    *,
    event: str,
    run_id: int,
    server_round: int | None,
    **fields: Any,
) -> dict[str, Any]:
    """One event with the fields every event carries."""
    out: dict[str, Any] = {
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": event,
        "run_id": str(run_id),  # uint64 run ids: kept exact as text
        "round": server_round,
        "coordinator_address": node_config.get(COORDINATOR_ADDRESS),
        "coordinator_certificate_sha256": node_config.get(COORDINATOR_CERTIFICATE),
    }
    for key, value in fields.items():
        out[key] = _json_number(value) if isinstance(value, float) else value
    return out


def append_audit_event(path: Path, event: Mapping[str, Any]) -> None:
    """Append ``event`` as one line: a single ``write`` with ``O_APPEND``, then ``fsync``."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = json.dumps(dict(event), sort_keys=True, allow_nan=False) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, after_torn_line(fd) + line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def after_torn_line(fd: int) -> bytes:
    """``b"\\n"`` when the file ends in a torn line (a crash mid-write), so the next line
    starts on a line of its own instead of being glued to the torn one; else ``b""``."""
    size = os.fstat(fd).st_size
    return b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""


def record_audit_event(node_config: Mapping[str, Any], event: Mapping[str, Any]) -> None:
    """Append ``event`` to the site's audit log, if it keeps one. A log that cannot be
    written is an error: a site that cannot account for a run must not serve it silently."""
    path = audit_log_path(node_config)
    if path is not None:
        append_audit_event(path, event)


@dataclass(frozen=True)
class AuditLog:
    """The events of an audit log, and how many lines could not be read (torn by a crash)."""

    events: list[dict[str, Any]]
    unreadable_lines: int = 0


def read_audit_log(path: Path) -> AuditLog:
    """Every event in ``path`` (none when it does not exist); torn or foreign lines are
    counted, not fatal."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return AuditLog([])
    events, bad = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
        else:
            bad += 1
    return AuditLog(events, bad)


@dataclass
class RunSummary:
    """What the audit log says of one run."""

    run_id: str
    first: str
    last: str
    coordinator_address: str | None = None
    coordinator_certificate_sha256: str | None = None
    rounds_trained: list[int] = field(default_factory=list)
    rounds_evaluated: list[int] = field(default_factory=list)
    records_used: int | None = None
    records_held_out: int | None = None
    epsilon_run: float | str | None = None
    epsilon_lifetime: float | str | None = None
    deid_policy_sha256: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarise_runs(events: list[dict[str, Any]]) -> list[RunSummary]:
    """One summary per run, in the order the runs first appear."""
    runs: dict[str, RunSummary] = {}
    for event in events:
        run_id = str(event.get("run_id"))
        time = str(event.get("time", ""))
        run = runs.setdefault(run_id, RunSummary(run_id=run_id, first=time, last=time))
        run.last = time
        run.coordinator_address = event.get("coordinator_address") or run.coordinator_address
        run.coordinator_certificate_sha256 = (
            event.get("coordinator_certificate_sha256") or run.coordinator_certificate_sha256
        )
        server_round = event.get("round")
        if event.get("event") == EVENT_REFUSAL:
            code = str(event.get("code"))
            run.refusals[code] = run.refusals.get(code, 0) + 1
            continue
        if event.get("event") != EVENT_ROUND:
            continue
        if event.get("task") == "federated_eval":
            if server_round not in run.rounds_evaluated:
                run.rounds_evaluated.append(server_round)
        elif server_round not in run.rounds_trained:
            run.rounds_trained.append(server_round)
        for key in ("records_used", "records_held_out", "epsilon_run", "epsilon_lifetime"):
            if event.get(key) is not None:
                setattr(run, key, event[key])
        digest = event.get("deid_policy_sha256")
        if digest and digest not in run.deid_policy_sha256:
            run.deid_policy_sha256.append(digest)
    return list(runs.values())


def audit_text(log: AuditLog) -> str:
    """The audit log as text: a block per run, then the events, one a line."""
    runs = summarise_runs(log.events)
    lines = [f"{len(runs)} run(s) served, {len(log.events)} event(s)"]
    if log.unreadable_lines:
        lines.append(f"{log.unreadable_lines} unreadable line(s) (torn by a crash) skipped")
    for run in runs:
        lines += [
            "",
            f"run {run.run_id}: {run.first} .. {run.last}",
            f"  coordinator       {run.coordinator_address or '-'}",
            f"  certificate       {run.coordinator_certificate_sha256 or '-'}",
            f"  rounds trained    {run.rounds_trained}",
            f"  rounds evaluated  {run.rounds_evaluated}",
            f"  records used      {_text(run.records_used)} "
            f"(held out {_text(run.records_held_out)})",
            f"  epsilon spent     {_text(run.epsilon_run)} in the run, "
            f"{_text(run.epsilon_lifetime)} lifetime",
            f"  de-id policy      {', '.join(run.deid_policy_sha256) or '-'}",
            "  refusals          "
            + (", ".join(f"{c} x{n}" for c, n in sorted(run.refusals.items())) or "none"),
        ]
    lines += ["", "events:"]
    for event in log.events:
        detail = (
            f"refused {event.get('message_type')} ({event.get('code')}"
            + (f": {event['reason']})" if event.get("reason") else ")")
            if event.get("event") == EVENT_REFUSAL
            else f"{event.get('task')} records {event.get('records_used')} used / "
            f"{event.get('records_held_out')} held out, "
            f"epsilon run {_text(event.get('epsilon_run'))}"
        )
        lines.append(
            f"  {event.get('time')} run {event.get('run_id')} round {event.get('round')}: {detail}"
        )
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _message_round(msg: Message) -> int | None:
    """The server round a request names (its ``config`` record), if it names one."""
    try:
        config = msg.content.config_records.get("config")
        value = None if config is None else config.get("server_round")
        return None if value is None else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def record_refusal(
    node_config: Mapping[str, Any],
    *,
    run_id: int,
    message: Message,
    code: str,
    reason: str | None = None,
) -> None:
    """Append a refusal of ``message`` with its public ``code`` and the site's ``reason``
    to the site's audit log."""
    record_audit_event(
        node_config,
        audit_event(
            node_config,
            event=EVENT_REFUSAL,
            run_id=run_id,
            server_round=_message_round(message),
            message_type=message.metadata.message_type,
            code=code,
            reason=reason,
        ),
    )


def audit_site_replies(msg: Message, context: Context, call_next: Handler) -> Message:
    """A Flower mod: every refusal the site sends (and every failure, as ``site-error``)
    goes into the site's audit log with its public code, before the reply leaves."""
    from fedmm.client.site_replies import take_refusal_detail
    from fedmm.common.site_refusal import RECORD_STATUS, RefusalCode, refusal_code_of

    if audit_log_path(context.node_config) is None:
        return call_next(msg, context)

    def refusal(code: str, reason: str | None) -> None:
        record_refusal(
            context.node_config, run_id=context.run_id, message=msg, code=code, reason=reason
        )

    try:
        reply = call_next(msg, context)
    except Exception as error:
        refusal(RefusalCode.SITE_ERROR.value, type(error).__name__)
        raise
    detail = take_refusal_detail(msg)
    if reply.has_content():
        code = refusal_code_of(reply.content.config_records.get(RECORD_STATUS))
        if code is not None:
            refusal(code, detail)
    return reply
