"""The site's privacy ledger for one message: from its ledger file, or from the run's state.

A site that names ``ledger-file`` in its node config keeps its ledger there across runs,
locked from load to save so two handler processes never spend one state
(``client.privacy_ledger.ledger_file_session``); otherwise the ledger lives in this run's
node state (``context.state``) and ends with the run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context

from fedmm.client.privacy_ledger import LEDGER_KEY, PrivacyLedger, ledger_file_session

#: Node config key: the file the site's ledger lives in across runs.
LEDGER_FILE = "ledger-file"


def ledger_file(context: Context) -> Path | None:
    """Where the ledger outlives the run: node config ``ledger-file`` (None: in node state)."""
    if LEDGER_FILE not in context.node_config:
        return None
    return Path(str(context.node_config[LEDGER_FILE]))


def recorded_anything(before: PrivacyLedger, after: PrivacyLedger) -> bool:
    """Whether ``after`` holds anything ``before`` did not: a charge, a round, a count or a
    calibration. Entering a new run and refusing it at once (its budget, the site's lifetime
    budget) records nothing: the file stays as it was, byte for byte."""
    if after == before:
        return False
    entered_only = (
        after.run_id != before.run_id
        and not after.knows_run(after.run_id)
        and after.history == before.history
        and after.distributed_history == before.distributed_history
        and after.count_releases == before.count_releases
    )
    return not entered_only


@contextlib.contextmanager
def ledger_session(context: Context) -> Iterator[PrivacyLedger]:
    """The site's ledger for one training message, saved when the block recorded something
    (:func:`recorded_anything`): from its file (locked from load to save, so two handler
    processes never spend one state), or from this run's node state when the site names no
    ledger file."""
    path = ledger_file(context)
    if path is not None:
        with ledger_file_session(path) as ledger:
            before = copy.deepcopy(ledger)
            yield ledger
            if recorded_anything(before, ledger):
                ledger.save(path)
                context.state.config_records[LEDGER_KEY] = ledger.to_record()
        return
    record = context.state.config_records.get(LEDGER_KEY)
    ledger = PrivacyLedger() if record is None else PrivacyLedger.from_record(record)
    before = copy.deepcopy(ledger)
    yield ledger
    if recorded_anything(before, ledger):
        context.state.config_records[LEDGER_KEY] = ledger.to_record()
