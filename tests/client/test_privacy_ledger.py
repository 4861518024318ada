"""The privacy ledger survives ``context.state`` (a ConfigRecord) and its JSON file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from client.privacy_ledger import PrivacyLedger, epsilon_of


def spent_ledger() -> PrivacyLedger:
    return PrivacyLedger(
        noise_multiplier=1.357421875,
        delta=1e-5,
        history=[(1.357421875, 1 / 24, 48), (2.0, 0.05, 7)],
        rounds=[1, 3],
    )


@pytest.mark.parametrize("ledger", [spent_ledger(), PrivacyLedger()], ids=["spent", "fresh"])
def test_config_record_round_trip(ledger: PrivacyLedger) -> None:
    record = ledger.to_record()
    assert isinstance(record, ConfigRecord)
    assert PrivacyLedger.from_record(record) == ledger
    # As it travels with the node's Context in deployment: through Flower's protobuf.
    wire = config_record_from_proto(config_record_to_proto(record))
    restored = PrivacyLedger.from_record(wire)
    assert restored == ledger
    assert restored.epsilon() == ledger.epsilon()


def test_round_trip_keeps_types_and_epsilon() -> None:
    restored = PrivacyLedger.from_record(spent_ledger().to_record())
    for sigma, q, steps in restored.history:
        assert type(sigma) is float and type(q) is float and type(steps) is int
    assert restored.epsilon() == pytest.approx(epsilon_of(spent_ledger().history, 1e-5))
    assert restored.epsilon() > 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "site" / "ledger.json"
    spent_ledger().save(path)
    assert PrivacyLedger.load(path) == spent_ledger()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]  # no temp left


def test_load_of_a_missing_file_is_a_fresh_ledger(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path / "none.json")
    assert ledger == PrivacyLedger()
    assert ledger.epsilon() == 0.0


def test_saved_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        spent_ledger().save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_overwriting_a_world_readable_ledger_makes_it_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{}", encoding="utf-8")
    path.chmod(0o644)
    spent_ledger().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivacyLedger.load(path) == spent_ledger()
