"""The privacy ledger survives ``context.state`` (a ConfigRecord) and its JSON file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedmm.client.privacy_ledger import PrivacyLedger, epsilon_of


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


def _spend_in_a_handler(ledger_file: str, round_: int, loaded, proceed, wait_s: float) -> None:
    """What a training handler process does with a persistent ledger: load it (through the
    ClientApp's own session), signal, maybe wait, record a round; the session saves it."""
    from flwr.app import Context, RecordDict

    from fedmm.client.ledger_session import ledger_session

    context = Context(
        run_id=1,
        node_id=1,
        node_config={"ledger-file": ledger_file},
        state=RecordDict(),
        run_config={},
    )
    with ledger_session(context) as ledger:
        loaded.set()
        proceed.wait(wait_s)
        ledger.rounds.append(round_)


def test_two_handler_processes_never_spend_one_ledger_state(tmp_path: Path) -> None:
    """The first process holds the ledger from load to save; the second, started while the
    first holds it, must load the first's saved state, not the stale one: both rounds land.
    Without the lock the second loads the empty ledger and one of the two rounds is lost."""
    import multiprocessing

    path = tmp_path / "ledger.json"
    PrivacyLedger(run_id=1).save(path)
    context = multiprocessing.get_context("fork")
    first_loaded, second_loaded, go = context.Event(), context.Event(), context.Event()
    go.set()
    first = context.Process(
        target=_spend_in_a_handler, args=(str(path), 1, first_loaded, second_loaded, 2.0)
    )
    first.start()
    assert first_loaded.wait(60)
    second = context.Process(
        target=_spend_in_a_handler, args=(str(path), 2, second_loaded, go, 0.0)
    )
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert PrivacyLedger.load(path).rounds == [1, 2]


def test_the_noisy_count_survives_both_stores(tmp_path: Path) -> None:
    for noisy in (-3.5, 0.0, 6012.25):
        ledger = PrivacyLedger(history=[(20.0, 1.0, 1)], noisy_count=noisy, count_releases=1)
        assert PrivacyLedger.from_record(ledger.to_record()) == ledger
        ledger.save(tmp_path / "ledger.json")
        assert PrivacyLedger.load(tmp_path / "ledger.json") == ledger
    ledger.start_run(ledger.run_id + 1)  # a new run draws its own count
    assert ledger.noisy_count is None and ledger.count_releases == 1
    assert "1 noisy record count(s)" in ledger.describe()


def test_a_run_refused_at_once_leaves_the_ledger_file_as_it_was(tmp_path: Path) -> None:
    """A site whose lifetime budget is spent refuses a new run: entering the run records
    nothing, so the file keeps the previous run's rounds and sigma, byte for byte; a run
    that records a round is saved with its own markers."""
    from flwr.app import Context, RecordDict

    from fedmm.client.ledger_session import ledger_session

    path = tmp_path / "ledger.json"
    PrivacyLedger(noise_multiplier=0.8, delta=1e-6, history=[(0.8, 0.5, 40)], rounds=[9]).save(path)
    before = path.read_bytes()

    def context() -> Context:
        return Context(
            run_id=5,
            node_id=1,
            node_config={"ledger-file": str(path)},
            state=RecordDict(),
            run_config={},
        )

    with ledger_session(context()) as ledger:
        ledger.start_run(5)  # ... and the budget check refuses
    assert path.read_bytes() == before

    with ledger_session(context()) as ledger:
        ledger.start_run(5)
        ledger.rounds.append(1)
    saved = PrivacyLedger.load(path)
    assert (saved.run_id, saved.rounds, saved.noise_multiplier) == (5, [1], None)
    assert saved.history == [(0.8, 0.5, 40)] and saved.run_start == 1
